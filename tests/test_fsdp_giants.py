"""The giant CLIP towers (ViT-bigG-14, ViT-g-14): configs against open_clip's, parameter
counts, the converter on shrunken copies, and the bigG config's smoke run under FSDP."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soup.models import clip, convert
from tests.conftest import block_weights, free_port, run_python, run_python_together

pytestmark = pytest.mark.slow  # The pipeline or several processes: -m 'not slow' skips it.

# open_clip src/open_clip/model_configs/{ViT-bigG-14,ViT-g-14}.json (commit 89fb801) and the
# parameter counts (millions) of docs/model_profile.csv in the same repository.
OPEN_CLIP = {
    "ViT-bigG-14": dict(embed_dim=1280,
                        vision=dict(image_size=224, layers=48, width=1664, head_width=104,
                                    mlp_ratio=4.9231, patch_size=14),
                        text=dict(context_length=77, vocab_size=49408, width=1280, heads=20,
                                  layers=32),
                        mparams=(2539.57, 1844.91, 694.66)),
    "ViT-g-14": dict(embed_dim=1024,
                     vision=dict(image_size=224, layers=40, width=1408, head_width=88,
                                 mlp_ratio=4.3637, patch_size=14),
                     text=dict(context_length=77, vocab_size=49408, width=1024, heads=16,
                               layers=24),
                     mparams=(1366.68, 1012.65, 354.03)),
}


def _block_count(width, mlp):
  # ln_1, attn in_proj (fused qkv) and out_proj, ln_2, mlp c_fc and c_proj (with biases).
  return 2 * width + 3 * width * width + 3 * width + width * width + width + 2 * width + \
      width * mlp + mlp + mlp * width + width


def open_clip_counts(arch):
  """(all, image tower, text tower) parameters of open_clip's CLIP for this architecture."""
  v, t, e = arch["vision"], arch["text"], arch["embed_dim"]
  w, grid, mlp = v["width"], v["image_size"] // v["patch_size"], int(v["width"] * v["mlp_ratio"])
  image = (w * 3 * v["patch_size"] ** 2 + w + (grid * grid + 1) * w + 2 * w
           + v["layers"] * _block_count(w, mlp) + 2 * w + w * e)
  tw = t["width"]
  text = (t["vocab_size"] * tw + t["context_length"] * tw + t["layers"] * _block_count(tw, 4 * tw)
          + 2 * tw + tw * e)
  return image + text + 1, image, text  # + logit_scale.


def _shapes(cfg):
  return jax.eval_shape(clip.CLIP(cfg).init, jax.random.key(0),
                        jnp.zeros((1, cfg.image_size, cfg.image_size, 3)),
                        jnp.zeros((1, cfg.context_length), jnp.int32))


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", list(OPEN_CLIP))
def test_config_and_parameter_counts_match_open_clip(name):
  arch, cfg = OPEN_CLIP[name], clip.get_config(name)
  v, t = arch["vision"], arch["text"]
  assert (cfg.embed_dim, cfg.image_size, cfg.patch_size) == (arch["embed_dim"], 224, 14)
  assert (cfg.vision_width, cfg.vision_layers) == (v["width"], v["layers"])
  assert cfg.vision_width // cfg.vision_heads == v["head_width"]
  assert cfg.vision_mlp_dim == int(v["width"] * v["mlp_ratio"])
  assert (cfg.text_width, cfg.text_layers, cfg.text_heads) == (t["width"], t["layers"], t["heads"])
  assert (cfg.context_length, cfg.vocab_size, cfg.act) == (77, 49408, "gelu")
  params = _shapes(cfg)["params"]
  counts = (_count(params), _count(params["visual"]), _count(params["text"]))
  assert counts == open_clip_counts(arch)
  assert [round(c / 1e6, 2) for c in counts] == list(arch["mparams"])
  assert clip.get_config(name.replace("-14", "/14")) == cfg


@pytest.mark.parametrize("name", list(OPEN_CLIP))
def test_counts_equal_open_clip_model(name):
  open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is not installed here "
                                  "(requirements-test.txt installs it in CI)")
  torch = pytest.importorskip("torch")
  from open_clip.model import CLIP as OpenCLIP
  model_cfg = open_clip.get_model_config(name)
  assert model_cfg["vision_cfg"] == OPEN_CLIP[name]["vision"]
  assert model_cfg["text_cfg"] == OPEN_CLIP[name]["text"]
  with torch.device("meta"):  # Shapes only: no 10 GB allocation.
    model = OpenCLIP(**model_cfg)
  params = _shapes(clip.get_config(name))["params"]
  assert sum(p.numel() for p in model.parameters()) == _count(params)
  assert sum(p.numel() for p in model.visual.parameters()) == _count(params["visual"])


# --- The converter on shrunken copies (same layer pattern, small width) --------------

# Head widths that differ between the towers and from 64, and open_clip's MLP ratios.
SHRUNK = {
    "ViT-bigG-14": dict(embed_dim=24, vision=dict(image_size=28, layers=2, width=52, head_width=13,
                                                  mlp_ratio=4.9231, patch_size=14),
                        text=dict(context_length=12, vocab_size=64, width=40, heads=5, layers=2)),
    "ViT-g-14": dict(embed_dim=16, vision=dict(image_size=28, layers=2, width=44, head_width=11,
                                               mlp_ratio=4.3637, patch_size=14),
                     text=dict(context_length=12, vocab_size=64, width=32, heads=4, layers=2)),
}


def shrunk_state_dict(arch, seed=0):
  """Random weights with open_clip's key names and layouts for a shrunken architecture."""
  v, t, e = arch["vision"], arch["text"], arch["embed_dim"]
  rng = np.random.default_rng(seed)
  n = lambda *s, std=0.05: (std * rng.standard_normal(s)).astype(np.float32)
  w, tw, grid = v["width"], t["width"], v["image_size"] // v["patch_size"]
  sd = {"visual.conv1.weight": n(w, 3, v["patch_size"], v["patch_size"], std=0.02),
        "visual.class_embedding": n(w), "visual.positional_embedding": n(grid * grid + 1, w),
        "visual.ln_pre.weight": 1 + n(w), "visual.ln_pre.bias": n(w),
        "visual.ln_post.weight": 1 + n(w), "visual.ln_post.bias": n(w),
        "visual.proj": n(w, e, std=0.2), "token_embedding.weight": n(t["vocab_size"], tw, std=0.02),
        "positional_embedding": n(t["context_length"], tw, std=0.01),
        "ln_final.weight": 1 + n(tw), "ln_final.bias": n(tw), "text_projection": n(tw, e, std=0.2),
        "logit_scale": np.array(math.log(1 / 0.07), np.float32)}
  for i in range(v["layers"]):
    sd.update(block_weights(rng, f"visual.transformer.resblocks.{i}", w, int(w * v["mlp_ratio"])))
  for i in range(t["layers"]):
    sd.update(block_weights(rng, f"transformer.resblocks.{i}", tw, 4 * tw))
  return sd


def shrunk_inputs(arch, batch=2):
  rng = np.random.default_rng(1)
  size, t = arch["vision"]["image_size"], arch["text"]
  images = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
  text = np.zeros((batch, t["context_length"]), np.int64)
  for row, length in enumerate((4, 9)[:batch]):
    text[row, : length + 2] = [t["vocab_size"] - 2, *rng.integers(1, t["vocab_size"] - 2, length),
                               t["vocab_size"] - 1]  # SOT ... EOT (the largest id).
  return images, text


def _convert(arch, sd):
  return convert.clip_from_state_dict(sd, act="gelu", head_width=arch["vision"]["head_width"],
                                      text_head_width=arch["text"]["width"]
                                      // arch["text"]["heads"])


@pytest.mark.parametrize("name", list(SHRUNK))
def test_converter_reads_shrunken_giant_shapes_and_head_widths(name):
  arch = SHRUNK[name]
  sd = shrunk_state_dict(arch)
  cfg, params = _convert(arch, sd)
  v, t = arch["vision"], arch["text"]
  assert cfg.vision_heads == v["width"] // v["head_width"] and cfg.text_heads == t["heads"]
  assert cfg.vision_mlp_dim == int(v["width"] * v["mlp_ratio"]) and cfg.act == "gelu"
  images, text = shrunk_inputs(arch)
  features = clip.encode_image(clip.CLIP(cfg), params, images)
  assert features.shape == (2, arch["embed_dim"]) and np.all(np.isfinite(features))
  # One head width for both towers cannot describe these models.
  with pytest.raises(ValueError, match="head_width"):
    convert.clip_from_state_dict(sd, act="gelu", head_width=v["head_width"])


@pytest.mark.parametrize("name", list(SHRUNK))
def test_converter_on_shrunken_giant_matches_open_clip(name):
  pytest.importorskip("open_clip", reason="open_clip_torch is not installed here "
                      "(requirements-test.txt installs it in CI)")
  torch = pytest.importorskip("torch")
  from open_clip.model import CLIP as OpenCLIP
  arch = SHRUNK[name]
  torch.manual_seed(0)
  reference = OpenCLIP(arch["embed_dim"], arch["vision"], arch["text"], quick_gelu=False).eval()
  # open_clip zero-initializes some projections; random values make the check meaningful.
  with torch.no_grad():
    for p in reference.parameters():
      p.add_(0.02 * torch.randn_like(p))
  sd = {k: v.numpy() for k, v in reference.state_dict().items()}
  cfg, params = _convert(arch, sd)
  images, text = shrunk_inputs(arch)
  with torch.no_grad():
    want_image = reference.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    want_text = reference.encode_text(torch.from_numpy(text)).numpy()
  model = clip.CLIP(cfg)
  np.testing.assert_allclose(clip.encode_image(model, params, images), want_image,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(clip.encode_text(model, params, text), want_text,
                             rtol=1e-4, atol=1e-5)


def test_remat_keeps_params_and_gradients():
  cfg = clip.get_config("tiny", act="gelu")
  images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  plain, remat = (clip.CLIPImageClassifier(c, num_classes=5)
                  for c in (cfg, cfg.replace(remat=True)))
  params = plain.init(jax.random.key(0), images)["params"]
  assert jax.tree.structure(remat.init(jax.random.key(0), images)["params"]) == \
      jax.tree.structure(params)
  loss = lambda model: jax.grad(lambda p: jnp.sum(model.apply({"params": p}, images) ** 2))
  params["head"]["kernel"] += 0.1  # A zero head would zero every other gradient.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               loss(remat)(params), loss(plain)(params))


# --- The config -------------------------------------------------------------------


def _config_module():
  from configs import clip_vit_bigg14_imagenet
  return clip_vit_bigg14_imagenet


def test_giant_config_arguments():
  module = _config_module()
  from soup import sharding
  for arg, variant in (("", "ViT-bigG-14"), ("ViT-g-14", "ViT-g-14"), ("smoke", "tiny"),
                       ("ViT-g-14,smoke", "tiny")):
    config = module.get_config(arg)
    assert (config.model.variant, config.model.act) == (variant, "gelu")
    assert tuple(config.sharding_rules) == sharding.FSDP
  config = module.get_config("ViT-g-14")
  assert "ViT-g-14" in config.init.path and config.sweep.num_members == 58
  assert [m["epochs"] for m in module.get_sweep(config)] and set(
      m["epochs"] for m in module.get_sweep(config)) <= set(range(4, 9))
  with pytest.raises(ValueError, match="ViT-g-14"):
    module.get_config("ViT-H-14")


def _bigg_smoke(workdir, mock, extra_env=None, rank=None, port=None):
  """`python -m soup.main` on the bigG config's smoke argument, pointed at `mock`; with
  `rank`, one of 2 jax.distributed processes (its own JAX_PROCESS_ID)."""
  args = ["--config=configs/clip_vit_bigg14_imagenet.py:smoke", f"--workdir={workdir}",
          f"--config.data.data_dir={mock['data_dir']}",
          f"--config.data.objectnet_dir={mock['objectnet_dir']}",
          f"--config.data.heldout_file={mock['heldout_file']}",
          f"--config.data.cache_dir={mock['cache_dir']}",
          f"--config.init.path={mock['clip_path']}", f"--config.init.bpe_path={mock['bpe_path']}",
          # In-process decoding (Grain's worker processes have their own tests), one alpha,
          # larger batches and no mid-run train states: the same stages and recipes, the
          # same code paths, in a third of the time.
          "--config.data.num_workers=0", "--config.soups.learned.epochs=1",
          "--config.soups.wise_ft.alphas=(0.5,)", "--config.finetune.checkpoint_every_steps=1000",
          "--config.finetune.batch_size=128", "--config.soups.learned.batch_size=256"]
  if rank is None:
    return ["-m", "soup.main", *args]
  join = ("import os, runpy, sys; os.environ['JAX_PROCESS_ID'] = sys.argv.pop(1); "
          "sys.argv[0] = 'soup.main'; runpy.run_module('soup.main', run_name='__main__')")
  return ["-c", join, str(rank), *args, "--distributed"]


def _rows(workdir):
  rows = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _leaves(nested):
  """The numbers of a nested dict of weights, in key order."""
  if isinstance(nested, dict):
    return [x for k in sorted(nested) for x in _leaves(nested[k])]
  return [nested]


def _ingredient_reads(workdir, process):
  """Bytes this process read of the soup ingredients (members, model_0, saved soups)."""
  reads = json.loads((workdir / f"reads.process{process}.json").read_text())
  return sum(n for path, n in reads.items()
             if "/models/" in path or "/soups/" in path)


def test_bigg_smoke_runs_every_stage_on_8_devices_and_on_2_processes_alike(tmp_path):
  """The giant config end to end under its FSDP rules: one process with 8 devices, and 2
  processes x 4 devices, give the same results rows; each of the 2 processes reads at most
  0.55 of the ingredient bytes that the single process reads (the reader's own count)."""
  from soup.data import imagenet_mock
  mock = imagenet_mock.write_all(tmp_path / "mock")
  mock["cache_dir"] = str(tmp_path / "mock" / "cache")
  one = tmp_path / "one_process"
  run_python(_bigg_smoke(one, mock), {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  two = tmp_path / "two_processes"
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_NUM_PROCESSES": "2",
         "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}"}
  run_python_together([_bigg_smoke(two, mock, rank=r) for r in (0, 1)], env, timeout=600)

  rows, rows_two = _rows(one), _rows(two)
  assert {r["recipe"] for r in rows} >= {"uniform_soup", "greedy_soup", "learned_soup",
                                         "learned_soup_by_layer", "model_stock", "wise_ft"}
  # Identical rows: every accuracy, per-example correctness, interval, selection and ratio.
  # The learned soups' mixing weights and temperature are trained values: the train steps'
  # all-reduces sum in another order over gloo (2 processes) than in one process, so the
  # float32 params agree to rounding, and so do these.
  learned = ("weights", "temperature")
  assert ([{k: v for k, v in r.items() if k not in learned} for r in rows_two]
          == [{k: v for k, v in r.items() if k not in learned} for r in rows])
  for a, b in zip(rows, rows_two):
    if "temperature" in a:
      np.testing.assert_allclose(b["temperature"], a["temperature"], atol=1e-4)
      np.testing.assert_allclose(_leaves(b["weights"]), _leaves(a["weights"]), atol=1e-4)
  # The members were saved shard by shard: the split leaves' chunks are 1/8 of them.
  info = json.loads((two / "models" / "model_1" / "ingredient" / "ingredient.json").read_text())
  split = [fp for fp in info["fingerprints"].values() if fp["chunk"] != fp["shape"]]
  assert len(split) > 0.9 * len(info["fingerprints"]), info["fingerprints"]
  assert all(math.prod(fp["shape"]) == 8 * math.prod(fp["chunk"]) for fp in split)
  single = _ingredient_reads(one, 0)
  for process in (0, 1):
    share = _ingredient_reads(two, process) / single
    print(f"process {process} of 2 read {share:.3f} of the single process's ingredient bytes")
    assert 0.3 < share <= 0.55, share
