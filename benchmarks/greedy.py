"""Greedy soup: total time vs the sum of its held-out evaluations (overhead target < 5%).

  python -m benchmarks.greedy                 # N=12 tiny-ViT ingredients, 2000 held-out images
  python -m benchmarks.greedy --repeats 3

Ingredients: the default tiny ViT (configs/fashion_mnist.py) at one random init,
perturbed 12 times (Gaussian noise of 0-20% of each leaf's std, so the held-out
accuracies spread out and greedy both accepts and skips), saved with
soup.checkpoints.save_ingredient. Held-out: 2000 random 28x28x1 uint8 images
labelled by the unperturbed model's predictions (so accuracy is meaningful).
`evaluate` is soup.evaluate.Evaluator(batch 500) on soup.mesh.make_mesh(), wrapped
to time each call. The per-ingredient held-out scores (greedy's input) are computed
before and not timed.

Three variants of greedy_soup, each timed `--repeats` times (medians):
  paths, verify   ingredients as checkpoint paths, fingerprints verified (the experiment's default)
  paths, no verify
  in memory       ingredients as param trees: the loop's own overhead without loading
overhead = total / sum(evaluate calls) - 1 (median over repeats). Each run waits for no
soup.main / pytest process and is rerun if other processes took > 5% of the CPUs
(common.quiet_call); the largest share left is reported. Results: benchmarks/results/greedy.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--n", type=int, default=12)
  ap.add_argument("--held-out", type=int, default=2000)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--quiet-wait-s", type=float, default=300, help="before each run, wait up to "
                  "this long for no soup.main / pytest process")
  ap.add_argument("--retries", type=int, default=2, help="reruns of a contended run")
  ap.add_argument("--out", default="greedy")
  a = ap.parse_args()
  busy = common.busy_processes()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import fashion_mnist
  from soup import checkpoints, evaluate, mesh as mesh_lib, models
  from soup.data.fashion_mnist import normalize
  from soup.soups import greedy

  config = fashion_mnist.get_config()
  model = models.build(config.model, 10)
  base = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"])
  mesh = mesh_lib.make_mesh()
  ev = evaluate.Evaluator(lambda p, x: model.apply({"params": p}, normalize(x)), mesh,
                          config.eval.batch_size)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (a.held_out, 28, 28, 1), dtype=np.uint8)
  labels = np.argmax(ev.logits(base, images), -1).astype(np.int32)

  ingredients = {}
  for i in range(a.n):
    scale = 0.2 * (i + 1) / a.n
    ingredients[f"m{i:02d}"] = jax.tree.map(
        lambda x: (x + scale * (np.std(x) + 1e-3) * rng.standard_normal(x.shape)).astype(x.dtype),
        base)
  tmp = Path(tempfile.mkdtemp(prefix="soup_bench_greedy_"))
  try:
    paths = {}
    for name, params in ingredients.items():
      checkpoints.save_ingredient(tmp / name, params)
      paths[name] = str(tmp / name)
    scores = {n: ev.accuracy(p, images, labels) for n, p in ingredients.items()}

    eval_times: list[float] = []

    def timed_evaluate(params):
      t = time.perf_counter()
      acc = ev.accuracy(params, images, labels)
      eval_times.append(time.perf_counter() - t)
      return acc

    variants = {"paths, verify": (paths, True), "paths, no verify": (paths, False),
                "in memory": (ingredients, False)}
    greedy.greedy_soup(ingredients, scores, timed_evaluate)  # Warm-up: compiles the updates.
    raw = {v: [] for v in variants}

    def run(sources, verify):
      eval_times.clear()
      t = time.perf_counter()
      result = greedy.greedy_soup(sources, scores, timed_evaluate, verify=verify)
      total = time.perf_counter() - t
      return {"total_s": total, "eval_s": sum(eval_times), "evals": len(eval_times),
              "kept": len(result.ingredients)}

    for _ in range(a.repeats):
      for v, (sources, verify) in variants.items():  # Interleaved: same machine state.
        r, other = common.quiet_call(lambda: run(sources, verify), a.quiet_wait_s, a.retries)
        raw[v].append({**r, "other_cpu_frac": other})
    rows, out = [], {}
    for v, runs in raw.items():
      total = common.median([r["total_s"] for r in runs])
      evals = common.median([r["eval_s"] for r in runs])
      overhead = common.median([r["total_s"] / r["eval_s"] - 1 for r in runs])
      out[v] = {"total_s": total, "eval_s": evals, "overhead": overhead, "runs": runs}
      other = max(r["other_cpu_frac"] for r in runs)
      rows.append([v, a.n, runs[0]["evals"], runs[0]["kept"], total, evals, total - evals,
                   f"{100 * overhead:.1f}%", "yes" if overhead < 0.05 else "no",
                   f"{100 * other:.0f}%"])
    print(common.table(["ingredients", "N", "evaluations", "kept", "total s", "sum of evals s",
                        "outside evals s", "overhead", "< 5%", "others' CPU (max)"], rows))
    print("wrote", common.write_results(a.out, {
        "n": a.n, "held_out": a.held_out, "eval_batch": config.eval.batch_size,
        "devices": len(jax.devices()), "target_overhead": 0.05, "busy_at_start": busy,
        "variants": out}), file=sys.stderr)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
