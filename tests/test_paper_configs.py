"""The paper-scale configs: the sweep fitted to hparam_info.json, every config builds, is
locked and trains one step (ImageNet ones on mock data and tiny weights in the real
file formats), and the pretrained loaders. The sweep launcher: tests/test_launch.py."""

import json
import math
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from scipy import stats

import configs
from soup import models, train
from soup.data import randaugment
from soup.models import convert, pretrained, zeroshot
from soup.models.imagenet_classnames import IMAGENET_CLASSNAMES

ROOT = Path(__file__).resolve().parents[1]
# The image configs (upstream, probe grid, image batches). The text config, glue_bert.py, has
# its own tests: tests/test_glue.py (every stage) and tests/test_bad_overrides.py (its args).
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.py")
                 if not p.name.startswith("_") and p.stem != "glue_bert")
PAPER = json.loads((ROOT / "tests" / "data" / "paper" / "hparam_info.json").read_text())
MEMBERS = [v for k, v in PAPER.items() if k != "model_0"]
N = len(MEMBERS)  # 71
SWEEP_KEYS = {"lr", "weight_decay", "epochs", "label_smoothing", "mixup", "aug_strength", "aug",
              "seed"}


def load(path):
  return configs.module_of(path)


CLIP = load(ROOT / "configs" / "clip_vit_b32_imagenet.py")


# --- The sweep against the paper's 71 sampled members ------------------------------


def test_paper_file_is_the_71_members_plus_lp_init():
  assert N == 71 and PAPER["model_0"] == {"info": "LP initialization"}


def _check_log_range(values, lo, hi):
  """All values inside [lo, hi], log-uniformity on it not rejected, and neither end too far.

  For n log-uniform draws on a range of width W (in log), the chance that an end
  is at least g from the nearest draw is (1 - g/W)^n; a range reaching much
  further than the draws (p < 0.05) would not be what the file was drawn from.
  """
  logs = np.log(values)
  width = math.log(hi) - math.log(lo)
  assert lo <= values.min() and values.max() <= hi
  for gap in (logs.min() - math.log(lo), math.log(hi) - logs.max()):
    assert (1 - gap / width) ** len(values) > 0.05
  u = (logs - math.log(lo)) / width
  assert stats.kstest(u, "uniform").pvalue > 0.05


def test_lr_and_weight_decay_ranges_fit_the_file():
  s = CLIP.get_config().sweep
  _check_log_range(np.array([m["lr"] for m in MEMBERS]), *s.lr)
  _check_log_range(np.array([m["wd"] for m in MEMBERS]), *s.weight_decay)
  for too_narrow in ((1e-4, 0.5), (7e-5, 0.5)):  # README's rounded range misses 7 of the 71.
    with pytest.raises(AssertionError):
      _check_log_range(np.array([m["wd"] for m in MEMBERS]), *too_narrow)
  with pytest.raises(AssertionError):  # Too wide: the draws would not stop so far from 1e-6.
    _check_log_range(np.array([m["wd"] for m in MEMBERS]), 1e-6, 0.6)


def test_epochs_and_nonzero_ranges_fit_the_file():
  s = CLIP.get_config().sweep
  epochs = [m["epochs"] for m in MEMBERS]
  assert (min(epochs), max(epochs)) == tuple(s.epochs) == (4, 16)
  assert set(epochs) == set(range(4, 17))
  for key, ours in (("mix", s.mixup), ("smoothing", s.label_smoothing)):
    nonzero = np.array([m[key] for m in MEMBERS if m[key]])
    assert ours[0] == 0 and nonzero.max() <= ours[1] <= nonzero.max() * (1 + 2 / len(nonzero))
  ms = [randaugment.parse(m["aug"]).magnitude for m in MEMBERS if m["aug"]]
  assert (min(ms), max(ms)) == tuple(s.randaug_m) == (1, 20)


@pytest.fixture(scope="module")
def big_sweep():
  """10,000 draws of the sampler: its probabilities, to within about +-0.01."""
  config = CLIP.get_config()
  with config.unlocked():
    config.sweep.num_members = 10_000
  return CLIP.get_sweep(config)


def _within_3_se(file_count, n, p):
  """The file's share (n draws) is within 3 binomial standard errors of our probability p.

  With 71 (or 44) draws the file's shares are themselves noisy (SE 0.06 at p = 0.5);
  3 SE is a 0.3% false alarm rate per check, while still rejecting e.g. a p of 0.25
  for zero mixup (39/71 observed).
  """
  return abs(file_count / n - p) <= 3 * math.sqrt(p * (1 - p) / n)


def test_shares_of_zero_and_none_match_the_file(big_sweep):
  share = lambda pred: np.mean([pred(m) for m in big_sweep])
  checks = {
      "zero mixup": (sum(m["mix"] == 0 for m in MEMBERS), share(lambda m: m["mixup"] == 0)),
      "zero smoothing": (sum(m["smoothing"] == 0 for m in MEMBERS),
                         share(lambda m: m["label_smoothing"] == 0)),
      "aug None": (sum(m["aug"] is None for m in MEMBERS), share(lambda m: m["aug"] is None)),
  }
  assert [c for c, _ in checks.values()] == [39, 39, 27]
  for name, (count, p) in checks.items():
    assert _within_3_se(count, N, p), (name, count, p)
  assert not _within_3_se(39, N, 0.25)  # The tolerance has teeth.
  # RandAugment's N among augmented members: 21, 18, 5 of 44 in the file.
  augmented = [randaugment.parse(m["aug"]).num_layers for m in big_sweep if m["aug"]]
  file_n = [randaugment.parse(m["aug"]).num_layers for m in MEMBERS if m["aug"]]
  for n in (0, 1, 2):
    assert _within_3_se(file_n.count(n), len(file_n), np.mean(np.array(augmented) == n))


def test_the_71_member_sweep():
  config = CLIP.get_config()
  members = CLIP.get_sweep(config)
  s = config.sweep
  assert len(members) == 71 and all(set(m) == SWEEP_KEYS for m in members)
  assert len({m["seed"] for m in members}) == 71
  for m in members:
    assert s.lr[0] <= m["lr"] <= s.lr[1]
    assert s.weight_decay[0] <= m["weight_decay"] <= s.weight_decay[1]
    assert 4 <= m["epochs"] <= 16 and m["aug_strength"] == 0.0
    assert 0 <= m["label_smoothing"] <= 0.23 and 0 <= m["mixup"] <= 0.9
    assert m["aug"] is None or re.fullmatch(r"rand-m([1-9]|1\d|20)-n[012]", m["aug"])
  assert CLIP.get_sweep(config) == members  # Seeded.
  with config.unlocked():
    config.sweep.num_members = 80
  assert CLIP.get_sweep(config)[:71] == members  # Growing the sweep keeps the first members.


# --- Every config builds, is locked, and trains one step -------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_and_is_locked(path):
  module = load(path)
  for arg in ("", "smoke"):
    config = module.get_config(arg) if arg else module.get_config()
    for key in ("data", "model", "init", "upstream", "probe", "finetune", "sweep", "eval", "soups",
                "stages", "seed", "experiment"):
      assert key in config, key
    with pytest.raises(AttributeError, match="Did you mean"):
      config.finetune.batchsize = 3
    with pytest.raises(AttributeError):
      config.data.imgae_size = 3
    members = module.get_sweep(config)
    assert len(members) == config.sweep.num_members
    assert SWEEP_KEYS - {"aug"} <= set(members[0])  # fashion_mnist has no RandAugment.
  with pytest.raises(ValueError, match="smoke"):
    module.get_config("smok")


def test_protocol_switches_default_to_the_official_code():
  """Each difference from the official code is a field, official by default."""
  from soup.models.vit import ACTIVATIONS
  from soup.soups import greedy
  for arg in ("", "smoke"):
    clip = CLIP.get_config(arg)
    assert clip.finetune.weight_decay_mask == "all"  # finetune.py: AdamW on every parameter.
    assert (clip.soups.greedy_tie_order, clip.soups.greedy_comparison) == ("reversed", ">")
    assert clip.probe.kind == "linear_probe" and 0 < clip.probe.validation_fraction < 1
    vit = load(ROOT / "configs" / "vit_b16_imagenet.py").get_config(arg)
    assert vit.model.activation == "gelu_tanh"  # big_vision's nn.gelu(x).
    assert vit.finetune.weight_decay_mask == "all"
  for path in CONFIGS:  # Every config's values are accepted by the code that reads them.
    config = load(path).get_config()
    train.decay_mask({}, config.finetune.weight_decay_mask)
    greedy.ranked({"a": 1.0}, config.soups.greedy_tie_order)
    assert config.model.get("activation", "gelu") in ACTIVATIONS
    assert min(config.probe.l2_grid) > 0 and config.probe.max_iterations > 0


def smoke_config(path, mock_imagenet):
  config = load(path).get_config("smoke")
  if config.data.name == "imagenet":  # Point the smoke config at this test's mock files.
    config.data.data_dir = mock_imagenet["data_dir"]
    config.data.objectnet_dir = mock_imagenet["objectnet_dir"]
    config.data.heldout_file = mock_imagenet["heldout_file"]
    config.data.cache_dir = mock_imagenet["cache_dir"]
    config.init.path = mock_imagenet["clip_path" if config.model.name == "clip" else "vit_path"]
    if config.model.name == "clip":
      config.init.bpe_path = mock_imagenet["bpe_path"]
  return config


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_smoke_config_trains_one_step(path, mock_imagenet, request):
  from soup.resources import make_task
  module = load(path)
  config = smoke_config(path, mock_imagenet)
  if config.data.name == "fashion_mnist":
    request.getfixturevalue("fashion_mnist_ready")
  task = make_task(config.data)
  model = models.build(config.model, task.num_classes)
  size = config.data.get("image_size", 28)
  channels = 3 if config.data.name == "imagenet" else 1
  # Shapes only (compiling model.init would cost as much as the step); random small
  # weights where nothing is imported, and a zero head.
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          np.zeros((1, size, size, channels), np.float32))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  params["head"] = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes["head"])
  if config.init.source == "pretrained":
    backbone = pretrained.load_pretrained(config)
    convert.check_params_match(backbone, {k: v for k, v in shapes.items() if k != "head"})
    params = {**backbone, "head": params["head"]}
  hp = module.get_sweep(config)[0]
  images, labels = task.finetune_batch(config.finetune.batch_size, hp["seed"], 0, hp)
  assert images.dtype == np.uint8 and len(images) == config.finetune.batch_size
  init_state, step_fn = train.make_train_step(
      lambda p, x: model.apply({"params": p}, x), task.num_classes, augment_fn=task.augment,
      preprocess_fn=task.preprocess, grad_clip=config.finetune.grad_clip,
      weight_decay_mask=config.finetune.weight_decay_mask)
  hyper = train.Hyper(lr=hp["lr"], weight_decay=hp["weight_decay"],
                      label_smoothing=hp["label_smoothing"], mixup=hp["mixup"],
                      aug_strength=hp["aug_strength"], total_steps=10, warmup_steps=2)
  state, metrics = jax.jit(step_fn)(init_state(params), images, labels, hyper.as_arrays(),
                                    hp["seed"])
  # A zero head gives uniform logits: the loss is ln(classes) whatever smoothing or mixup.
  assert float(metrics["loss"]) == pytest.approx(math.log(task.num_classes), rel=1e-4)
  assert int(state["step"]) == 1 and np.abs(np.asarray(state["params"]["head"]["kernel"])).max() > 0


# --- Pretrained weights in the expected formats ----------------------------------------


def test_clip_image_tower_loads_without_head(mock_imagenet):
  config = smoke_config(ROOT / "configs" / "clip_vit_b32_imagenet.py", mock_imagenet)
  params = pretrained.load_pretrained(config)
  assert set(params) == {"visual"}
  _, full = convert.clip_from_state_dict(convert.load_state_dict(mock_imagenet["clip_path"]),
                                         head_width=16)
  jax.tree.map(np.testing.assert_array_equal, params["visual"], full["visual"])


def test_clip_errors_say_what_to_do(mock_imagenet, tmp_path):
  config = smoke_config(ROOT / "configs" / "clip_vit_b32_imagenet.py", mock_imagenet)
  config.init.path = str(tmp_path / "absent.safetensors")
  with pytest.raises(pretrained.WeightsMissingError, match="open_clip.*--config.init.path"):
    pretrained.load_pretrained(config)
  config.init.path = mock_imagenet["clip_path"]
  config.model.variant = "ViT-B/32"
  with pytest.raises(ValueError, match="image_size=32 in the file, 224 in config.model"):
    pretrained.load_pretrained(config)
  config.model.variant = "tiny"
  config.init.bpe_path = str(tmp_path / "absent.txt.gz")
  with pytest.raises(pretrained.WeightsMissingError, match="bpe_simple_vocab_16e6"):
    pretrained.zeroshot_head(config)


def test_zeroshot_head_from_the_text_tower(mock_imagenet):
  config = smoke_config(ROOT / "configs" / "clip_vit_b32_imagenet.py", mock_imagenet)
  # All 80 templates x 1000 classes take minutes on 2 CPU cores: 2 x 100 show the path.
  templates, names = zeroshot.IMAGENET_TEMPLATES[:2], IMAGENET_CLASSNAMES[:100]
  head = pretrained.zeroshot_head(config, classnames=names, templates=templates)
  assert head["kernel"].shape == (16, 100) and not head["bias"].any()
  np.testing.assert_allclose(np.linalg.norm(head["kernel"], axis=0), 1 / 0.07, rtol=1e-5)
  from soup.models import clip
  cfg, params = convert.clip_from_state_dict(convert.load_state_dict(mock_imagenet["clip_path"]),
                                             head_width=16)
  kernel, _ = zeroshot.build_zeroshot_head(clip.CLIP(cfg), params, names, templates,
                                           bpe_path=mock_imagenet["bpe_path"])
  np.testing.assert_allclose(head["kernel"], kernel, rtol=1e-6)
  vit = smoke_config(ROOT / "configs" / "vit_b16_imagenet.py", mock_imagenet)
  with pytest.raises(ValueError, match="linear_probe"):
    pretrained.zeroshot_head(vit)


def test_vit_checkpoint_drops_head_and_resizes_positions(mock_imagenet):
  config = smoke_config(ROOT / "configs" / "vit_b16_imagenet.py", mock_imagenet)
  params = pretrained.load_pretrained(config)
  raw = dict(np.load(mock_imagenet["vit_path"]))
  assert "head/kernel" in raw and "head" not in params
  # 6x6 -> 4x4 patches.
  assert raw["pos_embedding"].shape[1] == 36 and params["pos_embedding"].shape[1] == 16
  np.testing.assert_allclose(params["pos_embedding"],
                             convert.resize_pos_embedding(raw["pos_embedding"], 4), rtol=1e-6)
  np.testing.assert_array_equal(params["embedding"]["kernel"], raw["embedding/kernel"])

