"""The default's pretrained start: the shipped files, their provenance, and what they know."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fashion_mnist as fm_config
from soup import aggregate, checkpoints
from soup.data import fashion_mnist, fashion_mnist_splits
from soup.linear_probe import accuracy, fit_probe
from soup.models import convert, export, pretrained
from soup.models.vit import ViT


def test_shipped_weights_match_their_provenance_and_the_default_model():
  config = fm_config.get_config()
  info = json.loads(fm_config.WEIGHTS.with_suffix(".json").read_text())
  assert export.sha256(fm_config.WEIGHTS) == info["sha256"]
  assert info["config"]["model"] == dict(config.model)
  assert info["config"]["upstream"] == dict(config.upstream)
  assert "upstream_here" in info["command"]
  backbone = pretrained.load_pretrained(config)  # Checks every key and shape against the model.
  assert "head" not in backbone and "stem" in backbone
  flat = dict(np.load(fm_config.WEIGHTS))
  np.testing.assert_array_equal(backbone["stem"]["kernel"], flat["stem/kernel"])


def test_shipped_start_is_self_supervised_on_images_never_scored():
  """Provenance: SimCLR (no labels), on exactly the 58k images that are not held out."""
  config = fm_config.get_config()
  info = json.loads(fm_config.WEIGHTS.with_suffix(".json").read_text())
  assert info["config"]["upstream"]["objective"] == "simclr"
  made, now = info["config"]["data"], config.data
  for key in ("split_seed", "held_out_examples", "upstream_includes_finetune"):
    assert made[key] == now[key], key
  # The upstream saw fine-tuning + upstream images; the cut between them does not matter.
  assert (made["finetune_examples"] + made["upstream_examples"]
          == now.finetune_examples + now.upstream_examples == 58_000)


@pytest.mark.slow
def test_shipped_start_knows_the_images_without_their_labels(fashion_mnist_ready):
  """A probe on the shipped features beats one on a random backbone's by far (9 points at
  full scale), on a slice; it need not beat pixels: fine-tuning does that work."""
  config = fm_config.get_config()
  splits = fashion_mnist_splits.experiment_splits(config.data)
  train_x, train_y = splits["finetune"].images[:2000], splits["finetune"].labels[:2000]
  test_x, test_y = splits["test"].images[:2000], splits["test"].labels[:2000]
  model = ViT(num_classes=0, **{k: v for k, v in config.model.items() if k != "name"})
  shipped = pretrained.load_pretrained(config)
  sample = fashion_mnist.normalize(jnp.asarray(train_x[:2]))
  random = model.init(jax.random.key(0), sample)["params"]

  def probe_accuracy(params):
    features = jax.jit(lambda x: model.apply({"params": params}, fashion_mnist.normalize(x)))
    probe = fit_probe(np.asarray(features(train_x)), train_y, 10, l2_grid=(1e-4, 1e-3))
    return accuracy(probe.head, np.asarray(features(test_x)), test_y)

  start, chance_features = probe_accuracy(shipped), probe_accuracy(random)
  assert start > chance_features + 0.05, (start, chance_features)


def test_supervised_upstream_loads_the_earlier_start_with_its_own_provenance():
  config = fm_config.get_config("supervised_upstream")
  info = json.loads(fm_config.SUPERVISED_WEIGHTS.with_suffix(".json").read_text())
  assert config.init.path == str(fm_config.SUPERVISED_WEIGHTS)
  assert export.sha256(fm_config.SUPERVISED_WEIGHTS) == info["sha256"]
  assert info["config"]["data"]["upstream_examples"] == config.data.upstream_examples == 48_000
  assert config.data.finetune_examples == 10_000 and not config.data.upstream_includes_finetune
  assert {k: v for k, v in config.upstream.items() if k in info["config"]["upstream"]} \
      == info["config"]["upstream"]
  assert "head" not in pretrained.load_pretrained(config)


def test_export_writes_a_loadable_npz_with_provenance(tmp_path):
  model = ViT(num_classes=7, patch_size=7, width=16, depth=1, num_heads=2, mlp_dim=32,
              stem_channels=4)
  params = model.init(jax.random.key(1), jnp.zeros((1, 28, 28, 1)))["params"]
  workdir = tmp_path / "w"
  checkpoints.save_ingredient(workdir / "upstream" / "ingredient", params, {"task": "test"})
  (workdir / "config.json").write_text(json.dumps({"seed": 3, "model": {"width": 16}}))
  info = export.export(workdir, tmp_path / "out" / "up.npz", command="made by a test")
  assert info["sha256"] == export.sha256(tmp_path / "out" / "up.npz")
  assert info["config"] == {"seed": 3, "model": {"width": 16}}
  loaded = convert.vit_from_big_vision_npz(tmp_path / "out" / "up.npz", drop_head=True)
  expected = {k: v for k, v in params.items() if k != "head"}
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(expected))
  with pytest.raises(FileNotFoundError, match="pretrain"):
    export.export(tmp_path / "empty", tmp_path / "x.npz")


def test_seeds_without_a_shared_upstream_need_a_config_that_pretrains(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    aggregate.main([f"--root={tmp_path}", "--seeds=2", "--noshare_upstream"])
  assert e.value.code == 2
  assert "upstream_here" in capsys.readouterr().err


def test_upstream_here_changes_only_where_the_start_comes_from():
  default, here = fm_config.get_config(), fm_config.get_config("upstream_here")
  assert (default.init.source, here.init.source) == ("pretrained", "upstream")
  a, b = default.to_dict(), here.to_dict()
  a.pop("init"), b.pop("init")
  assert a == b  # So `:upstream_here` re-makes the shipped start with the settings it records.


def test_noshare_upstream_is_accepted_for_a_config_that_pretrains(tmp_path):
  # Gets past the flag check (argparse alone would spell it --no-share_upstream) to the runs.
  with pytest.raises(SystemExit, match="run the seeds first"):
    aggregate.main([f"--root={tmp_path}", "--noshare_upstream", "--aggregate_only",
                    "--config=configs/fashion_mnist.py:upstream_here"])
