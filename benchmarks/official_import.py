"""Importing one released checkpoint and evaluating it, timed; the whole job projected.

  python -m benchmarks.official_import                      # about 5 minutes on 2 CPU cores
  python -m benchmarks.official_import --dtypes=float32,bfloat16   # on a GPU: both dtypes

1. Import. Writes one random-weight file in the released layout at ViT-B/32 size
   (soup.models.official.released_state_dict: image tower, the text keys ModelWrapper keeps,
   a 1000-class head; float32, as the release) under --dir, then times, warm page cache:
   a plain read of the file, a plain torch.load(weights_only=True), and the import
   (official.import_released into a fresh workdir: sha256, read, convert, check, save the Orbax
   ingredient), with its steps apart; and the rerun that finds it imported (sha256 + verify).
2. Evaluation. The imported model through the experiment's own evaluation (Resources.evaluate:
   every split of mock ImageNet at 224 px, decoded by the Grain pipeline, held-out in memory),
   and the jitted forward pass alone on one batch, per --dtypes.
3. The projection of the whole job (every model and soup on the real splits) from those
   numbers and the stated assumptions (PROJECTION below).
Prints markdown; writes benchmarks/results/official_import.json.
"""

from __future__ import annotations

import os

# As soup.main: two host devices split each batch on a 2-core CPU.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

# Images per model: ImageNet val, the held-out ImageNet2p, and the five shifts as scored
# (ObjectNet: the images of its 113 ImageNet classes).
SPLITS = {"ImageNet": 50_000, "ImageNet2p": 26_000, "ImageNetV2": 10_000,
          "ImageNetSketch": 50_889, "ImageNetR": 30_000, "ObjectNet": 18_574, "ImageNetA": 7_500}
MODELS = 72
# Assumptions of the projection (docs/benchmarks.md repeats them).
PROJECTION = {
    # Eval decode (resize + center crop) per vCPU: section "ImageNet input on Grain" measured
    # 186-229 img per CPU-second per worker here, 292 on a quiet core.
    "decode_img_per_vcpu_s": 250,
    # One process's intake of uint8 batches onto the devices: benchmarks/evaluate_many.py
    # --parts intake, with soup.main's allocator (docs/benchmarks.md, "The host allocator").
    "intake_img_s": 49_700,
    "mfu": 0.3,  # Of the dense bf16 peak, for the forward pass (an assumption, not measured).
    "disk_gb_s": 1.0,  # Ingredient reads and logits writes, not hidden behind compute.
    "machines": {
        "1 GPU (A100 80GB, 12 vCPUs)": dict(peak_tflops=312, vcpus=12),
        "1 GPU (H100 80GB, 16 vCPUs)": dict(peak_tflops=989, vcpus=16),
        "TPU v4-8 (4 chips, 240 vCPUs)": dict(peak_tflops=4 * 275, vcpus=240),
    },
}
MODEL_BYTES, LOGITS_BYTES_PER_IMAGE = 353e6, 1000 * 4


def write_released_file(path: Path, seed: int = 0) -> int:
  """A random ViT-B/32 ModelWrapper state dict, torch.save'd; returns its size in bytes."""
  import torch

  from soup.data import imagenet_mock
  from soup.models import official
  # OpenAI's ViT-B/32 shapes; text_layers=0: ModelWrapper deletes the text transformer anyway.
  clip_sd = imagenet_mock.tiny_clip_state_dict(
      seed, image=224, patch=32, width=768, layers=12, embed=512, text_width=512,
      text_layers=0, context=77, vocab=49408)
  rng = np.random.default_rng(seed)
  sd = official.released_state_dict(
      clip_sd, (0.05 * rng.standard_normal((1000, 512))).astype(np.float32),
      np.zeros(1000, np.float32))
  path.parent.mkdir(parents=True, exist_ok=True)
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path)
  return path.stat().st_size


def released_config(num_members: int = 0):
  import configs
  config = configs.module_of(common.ROOT / "configs" / "clip_vit_b32_imagenet.py").get_config(
      "released")
  config.sweep.num_members = num_members
  return config


def time_import(folder: Path, work: Path, repeats: int, wait_s: float, retries: int) -> dict:
  import torch

  import configs
  from soup import checkpoints
  from soup.models import convert, official, pretrained
  sweep_fn = configs.module_of(common.ROOT / "configs" / "clip_vit_b32_imagenet.py").get_sweep
  config = released_config()
  file = folder / "model_0.pt"
  cfg = pretrained.clip_config(config.model)
  shapes = official.expected_shapes(cfg, 1000)

  def plain_read():
    with open(file, "rb") as f:
      return len(f.read())

  def plain_torch_load():
    return len(torch.load(file, map_location="cpu", weights_only=True))

  def full_import():
    shutil.rmtree(work, ignore_errors=True)
    summary = official.import_released(folder, work, config, sweep_fn, log=lambda _: None)
    assert summary.ok and summary.imported == ["model_0"], summary.text()

  def rerun_import():  # Finds it imported: sha256 + reading and verifying the ingredient.
    summary = official.import_released(folder, work, config, sweep_fn, log=lambda _: None)
    assert summary.skipped == ["model_0"], summary.text()

  def steps():
    out = {}
    t = time.perf_counter()
    with open(file, "rb") as f:
      hashlib.file_digest(f, "sha256")
    out["sha256"] = time.perf_counter() - t
    t = time.perf_counter()
    sd = official.read_checkpoint(file)
    out["read (torch.load, weights_only, mmap)"] = time.perf_counter() - t
    t = time.perf_counter()
    params, _ = official.convert_checkpoint(sd, cfg, 1000, file.name)
    convert.check_params_match(params, shapes)
    out["convert + check"] = time.perf_counter() - t
    t = time.perf_counter()
    checkpoints.save_ingredient(work.parent / "steps_ingredient", params)
    out["save_ingredient"] = time.perf_counter() - t
    return out

  timings = {}
  for name, fn in (("plain read (f.read)", plain_read), ("plain torch.load", plain_torch_load),
                   ("import (official.import_released)", full_import),
                   ("rerun: already imported, verified", rerun_import)):
    runs, others = [], []
    for _ in range(repeats):
      t = time.perf_counter()
      _, other = common.quiet_call(fn, wait_s, retries)
      runs.append(time.perf_counter() - t)
      others.append(other)
    timings[name] = {"median_s": common.median(runs), "runs_s": runs, "others_cpu": others}
  step_runs = [common.quiet_call(steps, wait_s, retries)[0] for _ in range(repeats)]
  timings["steps"] = {k: common.median([r[k] for r in step_runs]) for k in step_runs[0]}
  return timings


def time_evaluation(work: Path, mock_root: Path, batch: int, dtypes: list[str], iters: int) -> dict:
  import jax
  import jax.numpy as jnp

  from soup import checkpoints, resources
  from soup.data import imagenet_mock
  from soup.models import clip, pretrained
  if not (mock_root / "imagenet2012_heldout.npz").exists():
    imagenet_mock.write_datasets(mock_root)
  config = released_config()
  config.data.update(data_dir=str(mock_root / "tfds"),
                     objectnet_dir=str(mock_root / "objectnet-1.0"),
                     heldout_file=str(mock_root / "imagenet2012_heldout.npz"), heldout_per_class=1,
                     num_workers=2, cache_dir=str(mock_root / "label_cache"))
  config.eval.batch_size = batch
  params = checkpoints.load_ingredient(work / "models" / "model_0" / "ingredient")
  res = resources.Resources(config)
  splits = res.splits()
  images = sum(len(s.labels) for s in splits.values())
  held = splits[res.columns.held_out]
  t = time.perf_counter()
  res.evaluator.logits(params, held.images[:batch])  # Compiles.
  compile_s = time.perf_counter() - t
  evaluate_s, other = common.quiet_call(lambda: common.timeit(lambda: res.evaluate(params), 1)[0],
                                        0, 0)
  out = {"evaluate_stage": {"images": images, "seconds": evaluate_s,
                            "img_per_s": images / evaluate_s, "compile_s": compile_s,
                            "others_cpu": other, "batch": batch,
                            "splits": {c: len(s.labels) for c, s in splits.items()}}}
  cfg = pretrained.clip_config(config.model)
  x = held.images[:batch]
  for dtype in dtypes:
    model = clip.CLIPImageClassifier(config=cfg, num_classes=1000, dtype=getattr(jnp, dtype))
    fn = jax.jit(lambda p, x, model=model: model.apply({"params": p}, res.task.preprocess(x)))
    jax.block_until_ready(fn(params, x))
    runs = []
    for _ in range(iters):
      t = time.perf_counter()
      jax.block_until_ready(fn(params, x))
      runs.append(time.perf_counter() - t)
    out[f"forward_{dtype}"] = {"batch": batch, "median_s": common.median(runs),
                               "img_per_s": batch / common.median(runs)}
  out["backend"] = jax.default_backend()
  out["devices"] = [str(d) for d in jax.devices()]
  return out


def projection(import_s: float, cpu_img_s: float) -> dict:
  """Hours for the whole job per machine (see PROJECTION; docs/benchmarks.md's table).

  Evaluate stage: all 72 models in one group, so each image is decoded and taken in once
  (one pass: the slowest of compute, decode and intake bounds it), then the disk: each
  ingredient read twice (verified, then loaded) and every model's logits written.
  Soups (configs/clip_vit_b32_imagenet.py's recipes): the greedy soup's 71 held-out
  evaluations and the learned soups' 2 x 5 epochs on held-out (x 3 for the backward pass);
  8 soups on every split (uniform, greedy, learned x 2, Model Stock, WiSE-FT's 3 alphas
  between its ends, one group); the streamed splits are decoded once and kept in memory
  (`Task.keep_eval_decoded`), so only the first soup decodes. Ensembles reuse logits.
  """
  flops = common.vit_forward_flops(1, (224, 224, 3), 32, 768, 12, 3072, 1000)["forward"]
  per_model = sum(SPLITS.values())
  held = SPLITS["ImageNet2p"]
  streamed = per_model - held  # Decoded per pass; the held-out set is decoded once.
  soups_held = 71 * held + 2 * 5 * held * 3
  soups_full = 8
  rows = {}
  for name, m in PROJECTION["machines"].items():
    model_img_s = PROJECTION["mfu"] * m["peak_tflops"] * 1e12 / flops
    decode_img_s = PROJECTION["decode_img_per_vcpu_s"] * m["vcpus"]
    intake_img_s = PROJECTION["intake_img_s"]
    compute_s = MODELS * per_model / model_img_s
    decode_s = (streamed + held) / decode_img_s
    intake_s = per_model / intake_img_s
    disk_s = MODELS * (2 * MODEL_BYTES + per_model * LOGITS_BYTES_PER_IMAGE) / (
        PROJECTION["disk_gb_s"] * 1e9)
    evaluate_s = max(compute_s, decode_s, intake_s) + disk_s
    one_soup = per_model / min(model_img_s, intake_img_s)
    soups_s = (max(streamed / decode_img_s, one_soup) + (soups_full - 1) * one_soup
               + soups_held / model_img_s)
    bound = max({"compute": compute_s, "decode": decode_s, "intake": intake_s}.items(),
                key=lambda kv: kv[1])[0]
    rows[name] = {"model_img_s": model_img_s, "decode_img_s": decode_img_s,
                  "compute_min": compute_s / 60, "decode_min": decode_s / 60,
                  "intake_min": intake_s / 60, "disk_min": disk_s / 60, "bound": bound,
                  "evaluate_h": evaluate_s / 3600, "soups_h": soups_s / 3600,
                  "import_h": MODELS * import_s / 3600,
                  "total_min": (evaluate_s + soups_s + MODELS * import_s) / 60}
  rows["this CPU (2 cores), measured rate"] = {
      "model_img_s": cpu_img_s, "decode_img_s": None,
      "evaluate_h": MODELS * per_model / cpu_img_s / 3600,
      "soups_h": (soups_held + soups_full * per_model) / cpu_img_s / 3600,
      "import_h": MODELS * import_s / 3600}
  return {"images_per_model": per_model, "forward_gflop_per_image": flops / 1e9,
          "assumptions": PROJECTION, "machines": rows}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--dir", default="/tmp/soup_official_bench")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--eval_batch", type=int, default=64)
  ap.add_argument("--forward_iters", type=int, default=5)
  ap.add_argument("--dtypes", default="float32", help="forward-pass dtypes, comma-separated")
  ap.add_argument("--quiet-wait-s", type=float, default=60)
  ap.add_argument("--retries", type=int, default=1)
  ap.add_argument("--keep", action="store_true", help="keep the files under --dir")
  args = ap.parse_args(argv)
  root = Path(args.dir)
  folder = root / "release"
  size = write_released_file(folder / "model_0.pt")
  print(f"wrote {folder / 'model_0.pt'}: {size / 1e6:.1f} MB")
  imports = time_import(folder, root / "workdir", args.repeats, args.quiet_wait_s, args.retries)
  evaluation = time_evaluation(root / "workdir", root / "mock", args.eval_batch,
                               args.dtypes.split(","), args.forward_iters)
  import_s = imports["import (official.import_released)"]["median_s"]
  proj = projection(import_s, evaluation["evaluate_stage"]["img_per_s"])

  read_s = imports["plain read (f.read)"]["median_s"]
  print(f"\n### Import of one {size / 1e6:.0f} MB released file (medians of {args.repeats})\n")
  print(common.table(["what", "s", "MB/s", "x plain read", "others' CPU"],
                     [[k, v["median_s"], size / 1e6 / v["median_s"], v["median_s"] / read_s,
                       f"{100 * max(v['others_cpu']):.0f}%"]
                      for k, v in imports.items() if k != "steps"]))
  print("\nimport steps (s): " + ", ".join(f"{k} {v:.2f}" for k, v in imports["steps"].items()))
  ev = evaluation["evaluate_stage"]
  print(f"\n### Evaluation, ViT-B/32 at 224 px ({evaluation['backend']})\n")
  rows = [["Resources.evaluate, every mock split", ev["images"], ev["img_per_s"]]]
  rows += [[f"forward only, {k[8:]}, batch {v['batch']}", v["batch"], v["img_per_s"]]
           for k, v in evaluation.items() if k.startswith("forward_")]
  print(common.table(["what", "images", "img/s"], rows))
  print(f"\n### Projection: {MODELS} models x {proj['images_per_model']:,} images, then the "
        "soups\n")
  print(common.table(["machine", "model img/s", "decode img/s", "evaluate h", "soups h",
                      "import h"],
                     [[k, v["model_img_s"], v["decode_img_s"] or "-", v["evaluate_h"],
                       v["soups_h"], v["import_h"]] for k, v in proj["machines"].items()]))
  path = common.write_results("official_import", {"file_bytes": size, "import": imports,
                                                  "evaluation": evaluation, "projection": proj,
                                                  "args": vars(args)})
  print(f"\nresults: {path}")
  if not args.keep:
    shutil.rmtree(root / "release", ignore_errors=True)
    shutil.rmtree(root / "workdir", ignore_errors=True)
    shutil.rmtree(root / "steps_ingredient", ignore_errors=True)


if __name__ == "__main__":
  main()
