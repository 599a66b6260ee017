"""Bytes per device of the learned soup's stack and of the flat layout's mean, 8 CPU devices.

  python -m benchmarks.learned_soup_memory            # N=16 (and N=12, not divisible by 8)
  python -m benchmarks.learned_soup_memory --n 16 --devices 8

XLA_FLAGS=--xla_force_host_platform_device_count=D is set before jax is imported.
For N perturbed copies of the default tiny ViT (P parameters):
  stack_ingredients(ingredients, mesh)  sum of addressable_shards' nbytes per device vs the
                                        design figure N * P * 4 / D
  RunningMean(Layout.flat(mesh))        the same per device vs P * 4 / D (the flat layout's
                                        running mean and ingredient each take this much)
And the compiled learned-soup step (by layer, AdamW, the batch split over the devices):
XLA's memory analysis per device (compiled.memory_analysis(): arguments + outputs -
aliased + temporaries) for the tiny ViT at N=16 and ViT-B/32 (88M params) at N=72
(--aot), with the mixed soup kept split over the devices (learned.soup_shardings) and
replicated, next to the design figure N * P * 4 / D. Compiled from abstract shapes:
nothing of N=72 x 353 MB is allocated.
Pure bookkeeping (no timing), so a busy machine does not change it.
Results: benchmarks/results/learned_soup_memory.json.
"""

from __future__ import annotations

import argparse
import os
import sys

from benchmarks import common


def per_device_bytes(tree) -> dict:
  import jax
  out: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


def replicated_leaves(tree) -> list[str]:
  from soup import trees as tree_lib
  return [k for k, v in tree_lib.flatten_with_names(tree).items()
          if v.sharding.is_fully_replicated and len(v.sharding.device_set) > 1]


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--n", default="16,12", help="ingredient counts")
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--aot", default="tiny:16,vitb32:72", help="model:N pairs for the compiled "
                  "step's memory analysis ('' skips)")
  ap.add_argument("--batch", type=int, default=256, help="held-out batch of the compiled step")
  ap.add_argument("--out", default="learned_soup_memory")
  a = ap.parse_args()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={a.devices}").strip()
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import fashion_mnist
  from soup import mesh as mesh_lib, models
  from soup.soups import average, learned

  assert len(jax.devices()) == a.devices, jax.devices()
  config = fashion_mnist.get_config()
  model = models.build(config.model, 10)
  base = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"])
  p = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(base))
  mesh = mesh_lib.make_mesh()
  d = mesh.shape[mesh_lib.DATA_AXIS]
  rng = np.random.default_rng(0)
  rows, out = [], {"params": p, "devices": d, "stack": {}, "flat_mean": None}
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
  running = average.RunningMean(average.Layout.flat(mesh), average.open_source(base).specs)
  running.add(base)
  per = list(per_device_bytes(running.mean).values())
  design = p * 4 / d
  out["flat_mean"] = {"per_device": [int(v) for v in per], "design": design}
  rows.append(["flat layout's mean, one model", p * 4, min(per), max(per), f"{design:.1f}",
               f"{max(per) / design:.5f}", 0])
  print(f"tiny ViT: P = {p} params, D = {d} devices\n")
  print(common.table(["array", "total bytes (unsharded)", "min bytes/device", "max bytes/device",
                      "design bytes/device", "max / design", "replicated leaves"], rows))
  aot_rows = []
  out["compiled_step"] = []
  for pair in filter(None, a.aot.split(",")):
    size, n = pair.split(":")
    for sharded_soup in (True, False):
      r = step_memory(size, int(n), mesh, a.batch, sharded_soup)
      out["compiled_step"].append(r)
      aot_rows.append([size, r["params"], r["n"], d, "split" if sharded_soup else "replicated",
                       r["argument_bytes"], r["temp_bytes"], r["output_bytes"], r["alias_bytes"],
                       r["peak_bytes"], f"{r['design_bytes']:.4g}",
                       f"{r['peak_bytes'] / r['design_bytes']:.3f}", f"{r['compile_s']:.1f}"])
  if aot_rows:
    print(f"\nCompiled learned-soup step (by layer, batch {a.batch} split over {d} devices), "
          "per device, bytes:\n")
    print(common.table(["model", "P", "N", "devices", "mixed soup", "arguments", "temporaries",
                        "outputs", "aliased", "peak (args + outputs - aliased + temps)",
                        "design N*P*4/D", "peak / design", "compile s"], aot_rows))
  print("wrote", common.write_results(a.out, out), file=sys.stderr)


MODELS = {
    "tiny": (dict(num_classes=10, patch_size=7, width=64, depth=4, num_heads=4, mlp_dim=256),
             (28, 28, 1)),
    "vitb32": (dict(num_classes=1000, patch_size=32, width=768, depth=12, num_heads=12,
                    mlp_dim=3072), (224, 224, 3)),
}


def step_memory(size: str, n: int, mesh, batch: int, sharded_soup: bool) -> dict:
  """XLA's per-device memory analysis of the learned-soup step, from abstract shapes."""
  import time

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from soup import mesh as mesh_lib
  from soup.models.vit import ViT
  from soup.soups import learned
  kwargs, image = MODELS[size]
  model = ViT(**kwargs)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image))))["params"]
  axis, d = mesh_lib.DATA_AXIS, mesh.shape[mesh_lib.DATA_AXIS]
  stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      (n, *x.shape), jnp.float32,
      sharding=NamedSharding(mesh, learned.stack_spec((n, *x.shape), d, axis))), params)
  batch_sharding = NamedSharding(mesh, P(axis))
  padded = learned.batch_size_on(mesh, batch, axis)
  x = jax.ShapeDtypeStruct((padded, *image), jnp.float32, sharding=batch_sharding)
  y = jax.ShapeDtypeStruct((padded,), jnp.int32, sharding=batch_sharding)
  mask = jax.ShapeDtypeStruct((padded,), jnp.float32, sharding=batch_sharding)
  variables = learned.init_mixing(len(jax.tree.leaves(params)), n, by_layer=True)
  optimizer = optax.adamw(0.05, weight_decay=0.0)
  opt_state = optimizer.init(variables)
  step = learned.make_step(lambda p, images: model.apply({"params": p}, images), optimizer, True,
                           learned.soup_shardings(stacked, mesh, axis) if sharded_soup else None)
  t = time.perf_counter()
  compiled = step.lower(variables, opt_state, stacked, x, y, mask).compile()
  compile_s = time.perf_counter() - t
  ma = compiled.memory_analysis()
  p = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
  r = {"model": size, "n": n, "params": p, "devices": d, "batch": padded,
       "sharded_soup": sharded_soup, "argument_bytes": int(ma.argument_size_in_bytes),
       "output_bytes": int(ma.output_size_in_bytes), "alias_bytes": int(ma.alias_size_in_bytes),
       "temp_bytes": int(ma.temp_size_in_bytes), "design_bytes": n * p * 4 / d,
       "compile_s": compile_s}
  r["peak_bytes"] = r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
  print(f"[{size} N={n}] soup {'split' if sharded_soup else 'replicated'}: peak "
        f"{r['peak_bytes'] / 2**20:.1f} MiB per device, design {r['design_bytes'] / 2**20:.1f} MiB "
        f"({compile_s:.0f}s to compile)", file=sys.stderr)
  return r


if __name__ == "__main__":
  main()
