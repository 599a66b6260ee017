"""Paper-size dress rehearsal: every soup recipe on 72 ViT-B/32-sized ingredients (25 GB).

  python -m benchmarks.paper_size                   # N=72, about 15-25 minutes here
  python -m benchmarks.paper_size --n 6 --keep      # a smoke run

Writes an initialization and N fine-tunes with the real parameter shapes of
ViT-B/32 (88M params, 353 MB each; more bytes in all than this machine has RAM, so
the page cache cannot hold them) with soup.checkpoints.save_ingredient, then runs
each recipe from the checkpoint paths in a fresh subprocess, as soup/recipes.py calls it
(the one averager, in the run's layout: Layout.of_run(mesh), the host's for a config without
sharding rules), reporting its wall time and its peak RSS above the subprocess's RSS after
imports (VmHWM), as a multiple of one model's float32 bytes:
  uniform       weighted_average(paths, layout=...), verified; its soup is saved (WiSE-FT's
                endpoint)
  greedy        greedy_soup(paths) with held-out scores given (ingredient i ranked i-th)
                and a cheap evaluator: the ViT-B/32 forward pass on --eval-images images
                labelled by the initialization; overhead = time outside the evaluations
  model_stock   model_stock(init path, paths, layout)
  learned       one step of the learned soup by layer on 8 simulated CPU devices
                (XLA_FLAGS=--xla_force_host_platform_device_count=8), on --learned-n
                ingredients: the stack is N*P*4 bytes of device memory by design, and
                simulated devices are host RAM, so N=72 (25 GB) cannot run here; the
                step is also compiled for N=72 from abstract shapes, and XLA's per-device
                memory analysis is reported next to N*P*4/8
  wise_ft       wise_ft(init path, uniform soup path, alpha, layout) for --alphas
Target: no recipe above 3x one model of host RAM (the learned soup's device stack
aside). Checks free disk first; deletes its files at the end unless --keep.
Results: benchmarks/results/paper_size.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from benchmarks import common

VITB32 = dict(num_classes=1000, patch_size=32, width=768, depth=12, num_heads=12, mlp_dim=3072)
IMAGE = (224, 224, 3)


def model_and_shapes():
  import jax
  import jax.numpy as jnp

  from soup import trees
  from soup.models.vit import ViT
  model = ViT(**VITB32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *IMAGE))))["params"]
  return model, {k: tuple(v.shape) for k, v in trees.flatten_with_names(shapes).items()}


def write_ingredients(workdir: Path, n: int) -> dict:
  """theta_0 and n fine-tunes theta_0 + s_i (c + r_i): c a shared direction, r_i the
  same noise rolled by a different offset (nearly orthogonal, cheap to make), so that
  pairwise cosines are ~0.3 and every recipe has something to decide."""
  import numpy as np

  from soup import checkpoints, trees as tree_lib
  _, shapes = model_and_shapes()
  rng = np.random.default_rng(0)
  def normal(scale):
    return {k: rng.standard_normal(s, dtype=np.float32) * np.float32(scale)
            for k, s in shapes.items()}

  base, common_dir, noise = normal(0.02), normal(1e-3), normal(1.5e-3)
  t = time.perf_counter()
  checkpoints.save_ingredient(workdir / "model_0", tree_lib.unflatten(base), {"index": 0})
  paths = []
  for i in range(n):
    scale = np.float32(0.5 + i / n)
    flat = {k: base[k] + scale * (common_dir[k] + np.roll(noise[k], 7919 * (i + 1)))
            for k in shapes}
    path = workdir / f"model_{i + 1}"
    checkpoints.save_ingredient(path, tree_lib.unflatten(flat), {"index": i + 1})
    paths.append(str(path))
    del flat
  return {"init": str(workdir / "model_0"), "paths": paths, "write_s": time.perf_counter() - t,
          "params": sum(int(np.prod(s)) for s in shapes.values())}


# --- Workers (fresh subprocesses) -------------------------------------------


def worker(recipe: str, args: dict) -> dict:
  import jax
  import numpy as np

  from soup import mesh as mesh_lib, soups
  from soup.soups import learned
  extra = {"allocator": common.ALLOCATOR}  # soup.main's, set when common was imported.
  layout = soups.Layout.of_run(mesh_lib.make_mesh())  # What the recipes get (no rules here).
  rss_base = common.rss_mib()[0]
  paths, init = args["paths"], args["init"]
  if recipe == "greedy":
    import jax.numpy as jnp

    from soup import checkpoints, memory
    model, _ = model_and_shapes()
    images = np.random.default_rng(1).standard_normal((args["eval_images"], *IMAGE), np.float32)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    labels = np.argmax(np.asarray(apply(checkpoints.load_ingredient(init), images)), -1)
    eval_times: list[float] = []

    def evaluate(params):
      t = time.perf_counter()
      accuracy = float(jnp.mean(jnp.argmax(apply(params, images), -1) == labels))
      eval_times.append(time.perf_counter() - t)
      return accuracy

    memory.release_free_memory()
    rss_base = common.rss_mib()[0]  # After the evaluator's compile and its warm-up call.
  common.reset_peak_rss()
  t = time.perf_counter()
  if recipe == "uniform":
    from soup import checkpoints
    soup = soups.weighted_average(paths, layout=layout)
    wall = time.perf_counter() - t
    cur, peak = common.rss_mib()
    t_save = time.perf_counter()
    checkpoints.save_ingredient(args["soup_path"], soup, {"ingredients": len(paths)})
    extra["save_s"] = time.perf_counter() - t_save
    extra["save_peak_mib"] = common.rss_mib()[1]
    return {"wall_s": wall, "peak_mib": peak, "rss_base_mib": rss_base, "rss_end_mib": cur, **extra}
  elif recipe == "greedy":
    scores = {p: 1.0 - i / 1000 for i, p in enumerate(paths)}  # Ranked in order.
    result = soups.greedy_soup({p: p for p in paths}, scores, evaluate, layout=layout)
    wall = time.perf_counter() - t
    extra.update(kept=len(result.ingredients), evaluations=len(eval_times),
                 eval_s=sum(eval_times), overhead=wall / sum(eval_times) - 1)
  elif recipe == "model_stock":
    _, ratios = soups.model_stock(init, paths, layout)
    wall = time.perf_counter() - t
    t_values = np.array(list(ratios.values()))
    extra.update(t_min=float(t_values.min()), t_median=float(np.median(t_values)),
                 t_max=float(t_values.max()))
  elif recipe == "wise_ft":
    for alpha in args["alphas"]:
      soups.wise_ft(init, args["soup_path"], alpha, layout)
    wall = time.perf_counter() - t
    extra["alphas"] = args["alphas"]
  elif recipe == "learned":
    model, _ = model_and_shapes()
    mesh = mesh_lib.make_mesh()
    n = args["learned_n"]
    rng = np.random.default_rng(2)
    images = rng.standard_normal((mesh.shape[mesh_lib.DATA_AXIS], *IMAGE), np.float32)
    labels = rng.integers(0, 1000, len(images)).astype(np.int32)
    stacked = learned.stack_ingredients(paths[:n], mesh)
    extra["stack_s"] = time.perf_counter() - t
    extra["stack_bytes"] = sum(x.size * 4 for x in jax.tree.leaves(stacked))
    result = learned.learned_soup(paths[:n], lambda p, x: model.apply({"params": p}, x), images,
                                  labels, by_layer=True, epochs=1, batch_size=len(images),
                                  mesh=mesh, stacked=stacked)
    wall = time.perf_counter() - t
    extra.update(devices=len(jax.devices()), n=n, steps=len(result.losses),
                 loss=result.losses[-1])
  else:
    raise ValueError(recipe)
  cur, peak = common.rss_mib()
  return {"wall_s": wall, "peak_mib": peak, "rss_base_mib": rss_base, "rss_end_mib": cur, **extra}


def aot_worker(args: dict) -> dict:
  import jax

  from benchmarks import learned_soup_memory
  from soup import mesh as mesh_lib
  return learned_soup_memory.step_memory("vitb32", args["n"], mesh_lib.make_mesh(), args["batch"],
                                         sharded_soup=True) | {"devices": len(jax.devices())}


def run_worker(recipe: str, args: dict, devices: int = 0) -> dict:
  env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"} if devices else None
  load = common.uptime()
  t = time.perf_counter()
  out = common.run_json([sys.executable, "-m", "benchmarks.paper_size", "--worker", recipe,
                         "--args", json.dumps(args)], env=env, timeout=3600)
  out.update(process_s=time.perf_counter() - t, load_before=load, load_after=common.uptime())
  print(f"[{recipe}] {out}", file=sys.stderr)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  ap.add_argument("--args", help=argparse.SUPPRESS)
  ap.add_argument("--n", type=int, default=72)
  ap.add_argument("--learned-n", type=int, default=8, help="ingredients of the learned-soup "
                  "step that runs (8 simulated devices; its stack is N x 353 MB of host RAM)")
  ap.add_argument("--eval-images", type=int, default=4)
  ap.add_argument("--alphas", default="0.5")
  ap.add_argument("--recipes", default="uniform,greedy,model_stock,learned,wise_ft")
  ap.add_argument("--workdir", default="/tmp/soup_paper_size")
  ap.add_argument("--keep", action="store_true")
  ap.add_argument("--out", default="paper_size")
  a = ap.parse_args()
  if a.worker:
    if a.worker == "aot":
      print(json.dumps(aot_worker(json.loads(a.args))))
    else:
      print(json.dumps(worker(a.worker, json.loads(a.args))))
    return
  workdir = Path(a.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  model_bytes = 88_224_232 * 4
  need = (a.n + 3) * model_bytes * 1.02
  free = shutil.disk_usage(workdir).free
  if need > 0.9 * free:
    sys.exit(f"Not enough disk under {workdir}: {need / 2**30:.1f} GiB needed, "
             f"{free / 2**30:.1f} GiB free.")
  results = {"n": a.n, "load_at_start": common.uptime(), "busy_at_start": common.busy_processes(),
             "free_disk_gib": free / 2**30, "recipes": {}}
  t_total = time.perf_counter()
  try:
    data = write_ingredients(workdir, a.n)
    results["write_s"] = data["write_s"]
    results["bytes_on_disk"] = sum(os.path.getsize(os.path.join(r, f))
                                   for r, _, fs in os.walk(workdir) for f in fs)
    print(f"wrote {a.n + 1} ingredients ({results['bytes_on_disk'] / 1e9:.1f} GB) in "
          f"{data['write_s']:.0f}s", file=sys.stderr)
    args = {"paths": data["paths"], "init": data["init"],
            "soup_path": str(workdir / "uniform_soup"),
            "eval_images": a.eval_images, "alphas": [float(x) for x in a.alphas.split(",")],
            "learned_n": min(a.learned_n, a.n)}
    for recipe in a.recipes.split(","):
      results["recipes"][recipe] = run_worker(recipe, args, 8 if recipe == "learned" else 0)
    if "learned" in a.recipes:
      results["learned_aot"] = run_worker("aot", {"n": a.n, "batch": 256}, 8)
  finally:
    if not a.keep:
      shutil.rmtree(workdir, ignore_errors=True)
  results["total_s"] = time.perf_counter() - t_total
  results["load_at_end"] = common.uptime()
  mib = model_bytes / 2**20
  rows = []
  for recipe, r in results["recipes"].items():
    peak = (r["peak_mib"] - r["rss_base_mib"]) / mib
    note = {"greedy": f"{r.get('evaluations')} evaluations ({r.get('eval_s', 0):.1f}s), "
                      f"{r.get('kept')} kept, overhead {100 * r.get('overhead', 0):.1f}%",
            "model_stock": f"t in [{r.get('t_min', 0):.3f}, {r.get('t_max', 0):.3f}], "
                           f"median {r.get('t_median', 0):.3f}",
            "uniform": f"+ {r.get('save_s', 0):.1f}s to save the soup",
            "learned": f"N={r.get('n')} on {r.get('devices')} devices, {r.get('steps')} step; "
                       f"stack {r.get('stack_bytes', 0) / 2**30:.2f} GiB (= "
                       f"{r.get('stack_bytes', 0) / model_bytes:.1f} models) built in "
                       f"{r.get('stack_s', 0):.1f}s",
            "wise_ft": f"alphas {r.get('alphas')}"}[recipe]
    rows.append([recipe, r["wall_s"], r["process_s"], peak, "yes" if peak <= 3 else "no",
                 note, r["load_before"]])
  print(f"N = {a.n} ViT-B/32-sized ingredients + theta_0; "
        f"{results.get('bytes_on_disk', 0) / 1e9:.1f}"
        f" GB written in {results.get('write_s', 0):.0f}s; total {results['total_s']:.0f}s\n")
  print(common.table(["recipe", "wall s", "process s (with imports, compiles)",
                      "peak RSS x model", "<= 3x", "notes", "load avg before"], rows))
  aot = results.get("learned_aot")
  if aot:
    print(f"\nlearned soup step compiled for N={aot['n']} on {aot['devices']} devices (batch "
          f"{aot['batch']}): per-device peak {aot['peak_bytes'] / 2**30:.2f} GiB (arguments "
          f"{aot['argument_bytes'] / 2**30:.2f}, temporaries {aot['temp_bytes'] / 2**30:.2f}), "
          f"design N*P*4/8 = {aot['design_bytes'] / 2**30:.2f} GiB, ratio "
          f"{aot['peak_bytes'] / aot['design_bytes']:.3f}")
  print("wrote", common.write_results(a.out, results), file=sys.stderr)


if __name__ == "__main__":
  main()
