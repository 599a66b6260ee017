"""Bytes per device of the learned soup's ingredient stack and of shard_flat, 8 CPU devices.

  python benchmarks/learned_soup_memory.py            # N=16 (and N=12, not divisible by 8)
  python benchmarks/learned_soup_memory.py --n 16 --devices 8

XLA_FLAGS=--xla_force_host_platform_device_count=D is set before jax is imported.
For N perturbed copies of the default tiny ViT (P parameters):
  stack_ingredients(ingredients, mesh)  sum of addressable_shards' nbytes per device vs the
                                        design figure N * P * 4 / D
  shard_flat(one model, mesh)           the same per device vs P * 4 / D (sharded_average's
                                        running mean and ingredient each take this much)
Pure bookkeeping (no timing), so a busy machine does not change it.
Results: benchmarks/results/learned_soup_memory.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def per_device_bytes(tree) -> dict:
  import jax
  out: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


def replicated_leaves(tree) -> list[str]:
  from soup import checkpoints
  return [k for k, v in checkpoints.flatten_with_names(tree).items()
          if v.sharding.is_fully_replicated and len(v.sharding.device_set) > 1]


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--n", default="16,12", help="ingredient counts")
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--out", default="learned_soup_memory")
  a = ap.parse_args()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={a.devices}").strip()
  import jax
  import jax.numpy as jnp
  import numpy as np
  from configs import fashion_mnist
  from soup import mesh as mesh_lib
  from soup import models
  from soup.soups import average, learned

  assert len(jax.devices()) == a.devices, jax.devices()
  config = fashion_mnist.get_config()
  model = models.build(config.model, 10)
  base = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"])
  p = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(base))
  mesh = mesh_lib.make_mesh()
  d = mesh.shape[mesh_lib.DATA_AXIS]
  rng = np.random.default_rng(0)
  rows, out = [], {"params": p, "devices": d, "stack": {}, "shard_flat": None}
  for n in [int(x) for x in a.n.split(",")]:
    ingredients = [jax.tree.map(lambda x: (x + 0.01 * rng.standard_normal(x.shape)).astype(x.dtype),
                                base) for _ in range(n)]
    stacked = learned.stack_ingredients(ingredients, mesh)
    per = per_device_bytes(stacked)
    design = n * p * 4 / d
    vals = list(per.values())
    reps = replicated_leaves(stacked)
    out["stack"][n] = {"per_device": [int(v) for v in vals], "design": design,
                       "replicated_leaves": reps}
    rows.append([f"stack_ingredients, N={n}", n * p * 4, min(vals), max(vals), f"{design:.1f}",
                 f"{max(vals) / design:.5f}", len(reps)])
    del stacked
  flat = average.shard_flat(base, mesh)
  per = list(per_device_bytes(flat).values())
  design = p * 4 / d
  out["shard_flat"] = {"per_device": [int(v) for v in per], "design": design}
  rows.append(["shard_flat, one model", p * 4, min(per), max(per), f"{design:.1f}",
               f"{max(per) / design:.5f}", 0])
  print(f"tiny ViT: P = {p} params, D = {d} devices\n")
  print(common.table(["array", "total bytes (unsharded)", "min bytes/device", "max bytes/device",
                      "design bytes/device", "max / design", "replicated leaves"], rows))
  print("wrote", common.write_results(a.out, out), file=sys.stderr)


if __name__ == "__main__":
  main()
