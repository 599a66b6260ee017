"""Evaluating many models: decode once, uint8 in.

  python -m benchmarks.evaluate_many [--models 1,4,16 --eval-examples 32 --repeats 2]

Three measurements, each side by side in one run:

  stage     the evaluate stage's own function, `Resources.evaluate_many` (what
            soup/experiment.py `evaluate` calls per group), on mock ImageNet at
            224 px (soup/data/imagenet_mock.py with photo-like 500x375 JPEGs in the
            five streamed test splits, ObjectNet's small PNGs, the held-out set in
            memory), Grain decoding in 2 worker processes, for N models as one group
            against the same N one by one (`Resources.evaluate`, the stage before
            groups; --one-by-one). Host CPU-seconds per model-image: this process (dispatch,
            transfer, and here the forward itself) plus the decoding workers'. The
            model is CLIP's tiny tower at 224 px with patch 32 (about 13 MFLOP per
            image) so that the host's share shows, not the CPU's matmuls;
  intake    one process building batches from decoded uint8 images and putting them on
            the mesh (`mesh.global_batch`, as the evaluator and the train step do): as
            uint8 (normalized inside jit, the code's way) against float32 normalized on
            the host; ImageNet at 224 px and Fashion-MNIST's 28x28x1. The process's
            allocator is set as soup.main sets it (benchmarks/common.py);
            SOUP_GLIBC_DEFAULTS=1 measures glibc's defaults instead;
  group     a group as the run evaluates it (a Python loop over the group's params, each
            model the same compiled forward: `Evaluator.logits_of_batches_many`) against
            one jitted vmap over the stacked params, on the default Fashion-MNIST model.

Medians of `repeats` interleaved runs. Writes benchmarks/results/evaluate_many.json
(evaluate_many_PARTS.json for --parts).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")  # soup.main's.

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.input_pipeline import cpu_seconds, spawned_workers  # noqa: E402
from configs import clip_vit_b32_imagenet, fashion_mnist  # noqa: E402
from soup import evaluate as evaluate_lib, mesh as mesh_lib, models  # noqa: E402
from soup.data import fashion_mnist as fashion_task, imagenet, imagenet_mock  # noqa: E402
from soup.resources import Resources  # noqa: E402

SIZE = 224


def noisy_models(model, sample: np.ndarray, count: int) -> list:
  """`count` random models (noise on every leaf: the heads start at zero)."""
  out = []
  for seed in range(count):
    params = jax.device_get(model.init(jax.random.key(seed), sample)["params"])
    rng = np.random.default_rng(seed)
    out.append(jax.tree.map(lambda x: (x + rng.normal(0, 0.05, x.shape)).astype(x.dtype),
                            params))
  return out


class CpuClock:
  """CPU-seconds of this process and of its decoding workers (live ones from /proc, those
  that ended from RUSAGE_CHILDREN)."""

  def __init__(self):
    self.own, self.workers = time.process_time(), self._workers()
    self.pids = spawned_workers()

  @staticmethod
  def _workers() -> float:
    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    live = 0.0
    try:
      live = cpu_seconds(spawned_workers())
    except OSError:  # A worker ended between the listing and the read.
      pass
    return ended.ru_utime + ended.ru_stime + live

  def read(self) -> dict:
    """CPU-seconds since the start, and how many worker processes are new since then (a
    pass that seeks its stream back to the start restarts Grain's workers)."""
    return dict(own=time.process_time() - self.own, workers=self._workers() - self.workers,
                new_workers=len(spawned_workers() - self.pids))


def stage(args) -> dict:
  root = Path(tempfile.mkdtemp(prefix="soup_eval_many_"))
  t = time.time()
  mock = imagenet_mock.write_datasets(root, eval_examples=args.eval_examples, photo_eval=True)
  print(f"mock ImageNet written in {time.time() - t:.0f}s", file=sys.stderr)
  config = clip_vit_b32_imagenet.get_config("smoke")
  with config.unlocked():
    config.data.update(data_dir=mock["data_dir"], objectnet_dir=mock["objectnet_dir"],
                       heldout_file=mock["heldout_file"], image_size=SIZE, num_workers=2,
                       cache_dir=str(root / "labels"))
    config.model.update(image_size=SIZE, patch_size=32)
    config.eval.batch_size = args.batch
  res = Resources(config)
  t = time.time()
  splits = res.splits()  # Builds the task: the held-out set decoded into memory.
  print(f"task ready in {time.time() - t:.0f}s", file=sys.stderr)
  images = sum(len(s) for s in splits.values())
  streamed = sum(len(s) for s in splits.values() if s.images is None)
  sample = np.zeros((1, SIZE, SIZE, 3), np.uint8)
  group = noisy_models(res.model(res.num_classes), sample, max(args.models))
  res.evaluate(group[0])  # Compile; start the decoding workers.

  # The forward alone (in-memory batches, no decode): on an accelerator it leaves the host.
  forward_images = np.zeros((4 * args.batch, SIZE, SIZE, 3), np.uint8)
  res.evaluator.logits(group[0], forward_images)
  one_by_one = args.one_by_one
  raw: dict[str, list] = {}
  identical, grouped = True, []
  for _ in range(args.repeats):
    clock = CpuClock()
    res.evaluator.logits(group[0], forward_images)
    raw.setdefault("forward", []).append(clock.read()["own"] / len(forward_images))
    extra = [(one_by_one, "one by one")] if one_by_one else []
    for n, way in [*((n, "group") for n in args.models), *extra]:
      clock, t = CpuClock(), time.perf_counter()
      if way == "group":
        logits = res.evaluate_many(group[:n])
      else:
        logits = [res.evaluate(p) for p in group[:n]]
      wall, cpu = time.perf_counter() - t, clock.read()
      raw.setdefault(f"{n}/{way}", []).append(dict(wall=wall, **cpu))
      if way == "one by one":
        identical &= all(np.array_equal(a[c], b[c]) for a, b in zip(grouped, logits) for c in a)
      elif n == one_by_one:
        grouped = logits
  res.task.close()
  forward_us = 1e6 * common.median(raw.pop("forward"))
  rows, summary = [], {"forward_us_per_image": forward_us}
  for key, runs in raw.items():
    n, way = int(key.split("/")[0]), key.split("/")[1]
    m = {k: common.median([r[k] for r in runs])
         for k in ("wall", "own", "workers", "new_workers")}
    per = n * images
    s = summary[key] = dict(
        m, cpu_us_per_model_image=1e6 * (m["own"] + m["workers"]) / per,
        own_us_per_model_image=1e6 * m["own"] / per,
        decode_us_per_model_image=1e6 * m["workers"] / per,
        host_us_per_model_image=1e6 * (m["own"] + m["workers"]) / per - forward_us,
        model_images_per_s=per / m["wall"])
    rows.append([n, way, f"{m['wall']:.2f}", f"{s['model_images_per_s']:.0f}",
                 f"{s['own_us_per_model_image']:.0f}", f"{s['decode_us_per_model_image']:.0f}",
                 f"{s['cpu_us_per_model_image']:.0f}", f"{s['host_us_per_model_image']:.0f}",
                 f"{m['new_workers']:.0f}"])
  print(f"\nstage: {images} images per model ({streamed} streamed, decoded by 2 workers; "
        f"{images - streamed} in memory), batch {args.batch}; group logits equal one by one's "
        f"bitwise: {identical}")
  print(f"forward alone (this CPU, in memory): {forward_us:.0f} us of CPU per image")
  print(common.table(["N", "way", "wall s", "model-img/s", "this process us/model-img",
                      "decode us/model-img", "all CPU us/model-img",
                      "host CPU us/model-img (all - forward)", "workers started"], rows))
  return dict(images=images, streamed=streamed, identical=identical, summary=summary, raw=raw)


def intake(args) -> dict:
  """One process: batches gathered from decoded uint8 images and put on the mesh."""
  mesh = mesh_lib.make_mesh()
  cases = {"imagenet": ((SIZE, SIZE, 3), 256, imagenet.CLIP_MEAN, imagenet.CLIP_STD),
           "fashion_mnist": ((28, 28, 1), 500, (0.286,), (0.353,))}
  rng = np.random.default_rng(0)
  raw: dict[str, list] = {}
  for _ in range(args.repeats):
    for name, (shape, batch, mean, std) in cases.items():
      pool = rng.integers(0, 256, (2 * batch, *shape), dtype=np.uint8)
      mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
      for dtype in ("uint8", "float32"):
        def one_batch():
          rows = rng.integers(0, len(pool), batch)
          x = pool[np.sort(rows)]  # The batch, as the pipeline hands it over.
          if dtype == "float32":  # Normalized on the host instead of in jit.
            x = (x.astype(np.float32) / 255.0 - mean) / std
          jax.block_until_ready(mesh_lib.global_batch(mesh, x))

        # A run hands over thousands of batches: the first few pay the allocator's first touch
        # of fresh pages (tens of MB a batch), timed apart as the cold figure.
        t = time.perf_counter()
        for _ in range(args.intake_warmup):
          one_batch()
        cold = args.intake_warmup * batch / max(time.perf_counter() - t, 1e-9)
        steps, t, cpu = args.intake_batches, time.perf_counter(), time.process_time()
        for _ in range(steps):
          one_batch()
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        # The floor: one copy of the batch as it is handed over (the gather is one).
        x = pool[:batch]
        t = time.perf_counter()
        for _ in range(steps):
          x.copy()
        copy = time.perf_counter() - t
        raw.setdefault(f"{name}/{dtype}", []).append(
            dict(img_per_s=steps * batch / wall, cpu_us_per_image=1e6 * cpu / (steps * batch),
                 first_batches_img_per_s=cold, one_copy_img_per_s=steps * batch / copy,
                 bytes_per_image=int(np.prod(shape)) * np.dtype(dtype).itemsize))
  med = {k: {m: common.median([r[m] for r in v]) for m in v[0]} for k, v in raw.items()}
  rows = [[k.split("/")[0], k.split("/")[1], f"{v['bytes_per_image']:.0f}",
           f"{v['img_per_s']:.0f}", f"{v['cpu_us_per_image']:.1f}",
           f"{v['first_batches_img_per_s']:.0f}", f"{v['one_copy_img_per_s']:.0f}"]
          for k, v in med.items()]
  print("\nintake: one process gathers a batch of decoded images and puts it on the "
        f"{mesh.size}-device mesh")
  print(common.table(["data", "crosses as", "bytes/img", "img/s", "CPU us/img",
                      f"img/s, first {args.intake_warmup} batches",
                      "floor: one uint8 copy, img/s"], rows))
  return dict(medians=med, raw=raw)


def loop_vs_vmap(args) -> dict:
  """The run's group (a loop over params) against one vmapped forward, same batches."""
  config = fashion_mnist.get_config()
  mesh = mesh_lib.make_mesh()
  model = models.build(config.model, 10)
  apply_fn = lambda p, x: model.apply({"params": p}, fashion_task.normalize(x))  # noqa: E731
  batch = config.eval.batch_size
  evaluator = evaluate_lib.Evaluator(apply_fn, mesh, batch)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.loop_batches * batch, 28, 28, 1), dtype=np.uint8)
  group = noisy_models(model, images[:1], max(args.models))
  vmapped = jax.jit(jax.vmap(apply_fn, in_axes=(0, None)),
                    out_shardings=mesh_lib.replicated(mesh))

  def stacked_logits(stack):
    out = []
    for i in range(0, len(images), batch):
      out.append(np.asarray(vmapped(stack, mesh_lib.global_batch(mesh, images[i:i + batch]))))
    return np.concatenate(out, axis=1)

  batches = lambda: (images[i:i + batch] for i in range(0, len(images), batch))  # noqa: E731
  raw: dict[str, list] = {}
  diff = {}
  for n in args.models:
    if n == 1:
      continue
    stack = jax.device_put(jax.tree.map(lambda *xs: jnp.stack(xs), *group[:n]),
                           mesh_lib.replicated(mesh))
    loop = evaluator.logits_of_batches_many(group[:n], batches())  # Compile both.
    diff[n] = float(np.max(np.abs(np.stack(loop) - stacked_logits(stack))))
    for _ in range(args.repeats):
      for way in ("loop", "vmap"):
        t, cpu = time.perf_counter(), time.process_time()
        if way == "loop":
          evaluator.logits_of_batches_many(group[:n], batches())
        else:
          stacked_logits(stack)
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        raw.setdefault(f"{n}/{way}", []).append(
            dict(model_img_per_s=n * len(images) / wall, cpu_us=1e6 * cpu / (n * len(images))))
  med = {k: {m: common.median([r[m] for r in v]) for m in v[0]} for k, v in raw.items()}
  rows = [[k.split("/")[0], k.split("/")[1], f"{v['model_img_per_s']:.0f}", f"{v['cpu_us']:.1f}",
           f"{diff[int(k.split('/')[0])]:.1e}"] for k, v in med.items()]
  print(f"\ngroup: the default Fashion-MNIST model, {len(images)} images, batch {batch}, "
        f"{mesh.size} devices")
  print(common.table(["N", "group as", "model-img/s", "CPU us/model-img",
                      "max |loop - vmap| logit"], rows))
  return dict(medians=med, max_abs_diff=diff, raw=raw)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", type=lambda s: [int(v) for v in s.split(",")],
                      default=[1, 4, 16])
  parser.add_argument("--eval-examples", type=int, default=32,
                      help="images of each streamed mock test split")
  parser.add_argument("--batch", type=int, default=64, help="eval batch of the stage")
  parser.add_argument("--one-by-one", type=int, default=0,
                      help="also evaluate this many models one by one, as the stage did before "
                      "groups (N=1's group is that call; a check of bitwise equality)")
  parser.add_argument("--intake-batches", type=int, default=20)
  parser.add_argument("--intake-warmup", type=int, default=5,
                      help="batches before the timed ones (their rate is the cold figure)")
  parser.add_argument("--loop-batches", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--parts", default="stage,intake,group")
  args = parser.parse_args(argv)
  parts = args.parts.split(",")
  print(f"allocator: {common.ALLOCATOR}", file=sys.stderr)
  print(f"load average {common.load_average()}", file=sys.stderr)
  out = dict(machine=common.machine(), date=time.strftime("%Y-%m-%d %H:%M:%S"), args=vars(args),
             code=common.code_version(), load_before=common.load_average())
  t = time.time()
  if "stage" in parts:
    out["stage"] = stage(args)
  if "intake" in parts:
    out["intake"] = intake(args)
  if "group" in parts:
    out["group"] = loop_vs_vmap(args)
  out.update(load_after=common.load_average(), seconds=time.time() - t)
  print(f"\n{time.time() - t:.0f}s; load average before {out['load_before']}, after "
        f"{out['load_after']}")
  name = "evaluate_many" + ("" if len(parts) == 3 else "_" + "_".join(parts))
  name += "_glibc_defaults" if common.ALLOCATOR == "glibc defaults" else ""
  print(f"wrote {common.write_results(name, out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
