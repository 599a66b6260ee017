"""GPU benchmark: ViT-B/32 bf16 train step (images/s, MFU) and the averager's bandwidth.

Run through benchmarks/gpu.sh on a machine with a GPU and a CUDA jax:
  bash benchmarks/gpu.sh                    # ViT-B/32, 224x224x3, 1000 classes, bf16
  bash benchmarks/gpu.sh --batch-per-device 128 --peak-tflops 989
  python -m benchmarks.gpu_bench --tiny     # a small model on any backend (CPU check)

Train step: soup.train.make_train_step with soup.models.vit.ViT(patch 32, width 768,
depth 12, heads 12, mlp 3072, dtype=bfloat16) (params and optimizer state in float32,
compute in bf16), augmentation + mixup + label smoothing on, state donated and
replicated, batch split over all devices (soup.mesh.make_mesh()). Images/s is the
median over repeats of `--steps` steps. MFU = analytic model FLOPs per step (matmuls,
3x forward; common.vit_forward_flops) / step time / peak bf16 FLOP/s of the devices
(looked up from the device kind, or --peak-tflops per device). XLA's cost_analysis FLOPs
are reported beside it.

Averaging: --avg-n ingredients of the same model (random float32 params) saved with
soup.checkpoints.save_ingredient under a temp dir (page cache warm), then
soup.soups.weighted_average(paths, layout=...) with the host layout (verify=True/False; the
running mean in numpy) and the flat layout (the running mean split over the GPUs, restored
into device memory): GB/s of ingredient bytes averaged; and the on-device update alone (the
jitted running-mean update on arrays already on the device), in GB/s of ingredient bytes.
Results: benchmarks/results/gpu.json (gpu_tiny.json with --tiny).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

# Dense bf16 peak TFLOP/s per device (vendor datasheets, no sparsity).
PEAK_BF16_TFLOPS = [
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
    ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("V100", 125.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("T4", 65.0),
]

FULL = dict(patch_size=32, width=768, depth=12, num_heads=12, mlp_dim=3072, num_classes=1000,
            image=(224, 224, 3))
TINY = dict(patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=128, num_classes=10,
            image=(32, 32, 3))


def peak_flops(device_kind: str, override_tflops: float | None) -> tuple[float | None, str]:
  if override_tflops:
    return override_tflops * 1e12, "--peak-tflops"
  for key, tflops in PEAK_BF16_TFLOPS:
    if key.lower() in device_kind.lower():
      return tflops * 1e12, f"table ({key})"
  return None, "unknown device kind: pass --peak-tflops"


def bench_train(cfg: dict, batch_per_device: int, steps: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from soup import mesh as mesh_lib, train
  from soup.data import fashion_mnist
  from soup.models.vit import ViT

  mesh = mesh_lib.make_mesh()
  d = mesh.shape[mesh_lib.DATA_AXIS]
  batch = batch_per_device * d
  model = ViT(num_classes=cfg["num_classes"], patch_size=cfg["patch_size"], width=cfg["width"],
              depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_dim=cfg["mlp_dim"],
              dtype=jnp.bfloat16)
  params = model.init(jax.random.key(0), jnp.zeros((1, *cfg["image"]), jnp.float32))["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x).astype(jnp.float32)
  init_state, step_fn = train.make_train_step(apply_fn, cfg["num_classes"],
                                              augment_fn=fashion_mnist.augment,
                                              preprocess_fn=fashion_mnist.normalize,
                                              grad_clip=1.0, weight_decay_mask="matrices")
  replicated = mesh_lib.replicated(mesh)
  state = jax.device_put(init_state(params), replicated)
  hp = jax.device_put(train.Hyper(lr=1e-3, weight_decay=0.1, label_smoothing=0.1, mixup=0.2,
                                  aug_strength=0.5, total_steps=100_000,
                                  warmup_steps=100).as_arrays(), replicated)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, *cfg["image"]), dtype=np.uint8)
  labels = rng.integers(0, cfg["num_classes"], (batch,), dtype=np.int32)
  x, y = mesh_lib.global_batch(mesh, images, labels)
  t = time.perf_counter()
  compiled = jax.jit(step_fn, donate_argnums=0).lower(state, x, y, hp, 0).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float((cost or {}).get("flops", float("nan")))
  holder = {"state": state}

  def run():
    s = holder["state"]
    for _ in range(steps):
      s, metrics = compiled(s, x, y, hp, 0)
    jax.block_until_ready((s, metrics))
    holder["state"] = s

  run()  # Warm-up.
  step_s = common.median([t / steps for t in common.timeit(run, repeats)])
  flops = common.vit_forward_flops(batch, cfg["image"], cfg["patch_size"], cfg["width"],
                                   cfg["depth"], cfg["mlp_dim"], cfg["num_classes"])["train_step"]
  nparams = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  return {"devices": d, "device_kind": jax.devices()[0].device_kind, "batch": batch,
          "params": nparams, "compile_s": compile_s, "step_s": step_s,
          "images_per_s": batch / step_s, "model_flops_per_step": flops,
          "xla_flops_per_step_per_device": xla_flops, "achieved_model_flops_per_s": flops / step_s}


def bench_average(cfg: dict, n: int, repeats: int, workdir: str | None) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from soup import checkpoints
  from soup.models.vit import ViT
  from soup.soups import average

  model = ViT(num_classes=cfg["num_classes"], patch_size=cfg["patch_size"], width=cfg["width"],
              depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_dim=cfg["mlp_dim"])
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *cfg["image"]))))
  rng = np.random.default_rng(0)
  tmp = Path(tempfile.mkdtemp(prefix="soup_gpu_avg_", dir=workdir))
  try:
    paths = []
    for i in range(n):
      params = jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32) * 0.02,
                            shapes["params"])
      checkpoints.save_ingredient(tmp / f"ing_{i}", params)
      paths.append(str(tmp / f"ing_{i}"))
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    for p in tmp.rglob("*"):  # Warm the page cache.
      if p.is_file():
        p.read_bytes()
    out = {"n": n, "model_bytes": model_bytes, "backend": jax.default_backend()}
    for verify in (True, False):
      average.weighted_average(paths[:2], verify=verify)  # Set-up.
      ts = common.timeit(lambda: average.weighted_average(paths, verify=verify), repeats)
      out[f"stream_verify_{verify}_s"] = common.median(ts)
      out[f"stream_verify_{verify}_gb_per_s"] = n * model_bytes / common.median(ts) / 1e9
    # The flat layout: the running mean on the devices (split over all of them).
    from soup import mesh as mesh_lib
    flat = average.Layout.flat(mesh_lib.make_mesh())
    average.weighted_average(paths[:2], layout=flat)
    ts = common.timeit(lambda: average.weighted_average(paths, layout=flat), repeats)
    out["sharded_s"] = common.median(ts)
    out["sharded_gb_per_s"] = n * model_bytes / common.median(ts) / 1e9
    # The update alone, device-resident.
    mean = average._first(jax.device_put(params))
    x = jax.device_put(params)
    jax.block_until_ready((mean, x))
    iters = 20

    def updates():
      m = mean
      for _ in range(iters):
        m = average.running_update(m, x, np.float32(0.5))
      jax.block_until_ready(m)
    updates()
    upd = common.median([t / iters for t in common.timeit(updates, repeats)])
    out["device_update_s"] = upd
    out["device_update_gb_per_s"] = model_bytes / upd / 1e9
    return out
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tiny", action="store_true",
                  help="a small model: checks the script on any backend")
  ap.add_argument("--batch-per-device", type=int, default=0,
                  help="default 256 (16 with --tiny)")
  ap.add_argument("--steps", type=int, default=0,
                  help="steps per timed repeat (default 20, 3 tiny)")
  ap.add_argument("--repeats", type=int, default=0, help="default 5 (2 tiny)")
  ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak per device")
  ap.add_argument("--avg-n", type=int, default=0, help="ingredients to average (default 8, 2 tiny)")
  ap.add_argument("--avg-dir", default=None, help="where to write them (default: the temp dir)")
  ap.add_argument("--skip-train", action="store_true")
  ap.add_argument("--skip-average", action="store_true")
  a = ap.parse_args()
  cfg = TINY if a.tiny else FULL
  batch = a.batch_per_device or (16 if a.tiny else 256)
  steps = a.steps or (3 if a.tiny else 20)
  repeats = a.repeats or (2 if a.tiny else 5)
  avg_n = a.avg_n or (2 if a.tiny else 8)

  import jax
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}",
        file=sys.stderr)
  results = {"config": cfg, "tiny": a.tiny}
  name = "ViT-B/32" if not a.tiny else "tiny ViT"
  if not a.skip_train:
    tr = bench_train(cfg, batch, steps, repeats)
    peak, source = peak_flops(tr["device_kind"], a.peak_tflops)
    tr["peak_flops_per_device"], tr["peak_source"] = peak, source
    tr["mfu"] = tr["achieved_model_flops_per_s"] / (peak * tr["devices"]) if peak else None
    results["train"] = tr
    print(f"\n{name} train step, bf16, {tr['devices']} x {tr['device_kind']}\n")
    print(common.table(
        ["global batch", "step ms", "images/s", "model TFLOP/step", "XLA TFLOP/step/device",
         "achieved TFLOP/s", "peak TFLOP/s (source)", "MFU"],
        [[tr["batch"], tr["step_s"] * 1e3, tr["images_per_s"], tr["model_flops_per_step"] / 1e12,
          tr["xla_flops_per_step_per_device"] / 1e12, tr["achieved_model_flops_per_s"] / 1e12,
          f"{peak / 1e12 if peak else 'n/a'} ({source})",
          f"{100 * tr['mfu']:.1f}%" if tr["mfu"] is not None else "n/a"]]))
  if not a.skip_average:
    av = bench_average(cfg, avg_n, repeats, a.avg_dir)
    results["average"] = av
    print(f"\nweighted_average of {av['n']} {name} ingredients "
          f"({av['model_bytes'] / 2**20:.1f} MiB each), backend {av['backend']}, page cache warm\n")
    print(common.table(
        ["host verify s", "GB/s", "host no-verify s", "GB/s", "flat on devices (verify) s",
         "GB/s", "device update ms", "GB/s"],
        [[av["stream_verify_True_s"], av["stream_verify_True_gb_per_s"],
          av["stream_verify_False_s"], av["stream_verify_False_gb_per_s"], av["sharded_s"],
          av["sharded_gb_per_s"],
          av["device_update_s"] * 1e3, av["device_update_gb_per_s"]]]))
  print("wrote", common.write_results("gpu_tiny" if a.tiny else "gpu", results), file=sys.stderr)


if __name__ == "__main__":
  main()
