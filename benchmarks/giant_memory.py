"""Per-chip memory of the real ViT-bigG-14 fine-tuning step under FSDP (and replicated).

Compiles the trainer's step (soup/train.py: CLIP ViT-bigG-14 image tower + 1000-class
head, AdamW, float32 as configs/clip_vit_bigg14_imagenet.py runs it) for a mesh of N
simulated CPU devices from abstract inputs (jax.ShapeDtypeStruct: nothing is
allocated), and reads XLA's compiled memory analysis of the per-device program:

  params, optimizer   the state's bytes on one device, summed from its shardings;
  arguments           the step's inputs on one device (state + batch shard);
  temp                XLA's scratch: activations kept for the backward pass, gathered
                      params, gradients (the "activations" column);
  peak                arguments + outputs - donated (aliased) + temp.

Targets: v4-8 (4 chips, 32 GiB HBM each), 8x H100 (80 GB each), v4-32 (16 chips).
Batch 1 per device, 224 px. CPU programs are scheduled by the CPU backend, so temp is
an estimate of what TPU/GPU XLA needs (their schedulers overlap the gathers differently).

  python -m benchmarks.giant_memory [--variant=ViT-bigG-14] [--targets=v4-8,8xH100,v4-32]
  python -m benchmarks.giant_memory --targets=v4-8 --replicated_on= --layers=4 \
      --batch_per_device=1,2          # the activation bytes one more example adds, per block
Writes benchmarks/results/giant_memory_<variant>[_L<layers>][_b<batches>]_<targets>.json
after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

TARGETS = {"v4-8": (4, 32 * 2**30), "8xH100": (8, 80 * 10**9), "v4-32": (16, 32 * 2**30)}
# 16 CPU devices; LLVM's expensive passes off: the memory analysis comes from buffer
# assignment on the optimized HLO, before code generation, and compiles take minutes less.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=16 "
                      "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0")

from benchmarks import common  # noqa: E402


def shard_bytes(tree, shardings) -> int:
  """Bytes one device holds of `tree` laid out as `shardings` (the largest shard)."""
  import jax
  import numpy as np
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shape = sharding.shard_shape(leaf.shape)
    total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
  return total


def measure(variant: str, devices: int, rules, batch_per_device: int = 1, layers: int = 0,
            remat: bool = False, image_size: int = 224, classes: int = 1000) -> dict:
  import jax
  import jax.numpy as jnp

  from soup import mesh as mesh_lib, train
  from soup.models import clip

  mesh = mesh_lib.make_mesh(devices)
  config = clip.get_config(variant, remat=remat)
  if layers:  # A shallower tower of the same width: per-block costs, for the batch slope.
    config = config.replace(vision_layers=layers)
  model = clip.CLIPImageClassifier(config, num_classes=classes)
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, image_size, image_size, 3)))["params"]
  fns = train.make_train_step(
      lambda p, x: model.apply({"params": p}, x), classes, augment_fn=lambda k, x, s: x,
      preprocess_fn=lambda x: x.astype(jnp.float32) / 255.0, grad_clip=1.0,
      weight_decay_mask="matrices")
  step = train.compile_step(fns, params, mesh, rules)
  layout = step.state_sharding
  state = jax.eval_shape(step.init_state, params)
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                state, layout)
  batch, repl = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  n = devices * batch_per_device
  images = jax.ShapeDtypeStruct((n, image_size, image_size, 3), jnp.uint8, sharding=batch)
  labels = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=batch)
  hp = {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=repl)
        for k in train.Hyper(lr=0.0, weight_decay=0.0).as_arrays()}
  seed = jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)
  t = time.time()
  compiled = step.fn.lower(
      abstract_state, images, labels, hp, seed).compile()
  compile_s = time.time() - t
  m = compiled.memory_analysis()
  out = {
      "variant": variant, "layers": config.vision_layers, "devices": devices,
      "batch_per_device": batch_per_device, "remat": remat, "rules": [list(r) for r in rules],
      "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
      "params_bytes": shard_bytes(state["params"], layout["params"]),
      "optimizer_bytes": shard_bytes(state["opt_state"], layout["opt_state"]),
      "argument_bytes": int(m.argument_size_in_bytes),
      "output_bytes": int(m.output_size_in_bytes),
      "alias_bytes": int(m.alias_size_in_bytes),
      "temp_bytes": int(m.temp_size_in_bytes),
      "code_bytes": int(m.generated_code_size_in_bytes),
      "compile_s": round(compile_s, 1),
  }
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                       + out["temp_bytes"])
  return out


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--variant", default="ViT-bigG-14")
  parser.add_argument("--targets", default="v4-8,8xH100,v4-32")
  parser.add_argument("--replicated_on", default="8xH100",
                      help="Also compile the replicated (default) layout on these targets.")
  parser.add_argument("--batch_per_device", default="1", help="Comma-separated batch sizes.")
  parser.add_argument("--layers", type=int, default=0,
                      help="Override the tower's depth (0: the real model).")
  parser.add_argument("--remat", action="store_true", help="Rematerialize each block.")
  args = parser.parse_args(argv)
  from soup import sharding
  gib = lambda b: b / 2**30
  rows = []
  for target in args.targets.split(","):
    devices, chip_bytes = TARGETS[target]
    layouts = [("fsdp", sharding.FSDP)]
    if target in args.replicated_on.split(","):
      layouts.append(("replicated", sharding.REPLICATED))
    for (name, rules), batch in [(layout, int(b)) for layout in layouts
                                 for b in args.batch_per_device.split(",")]:
      row = {"target": target, "layout": name, "chip_bytes": chip_bytes,
             **measure(args.variant, devices, rules, batch, args.layers, args.remat)}
      row["fits"] = row["peak_bytes"] <= chip_bytes
      rows.append(row)
      write(args, rows)  # After every row: a compile takes minutes.
      print(f"{target:7s} {name:10s} L{row['layers']} b{batch}/device params "
            f"{gib(row['params_bytes']):6.2f} GiB  optimizer "
            f"{gib(row['optimizer_bytes']):6.2f}  temp {gib(row['temp_bytes']):6.2f}  peak "
            f"{gib(row['peak_bytes']):6.2f} / {gib(chip_bytes):5.1f} GiB  "
            f"(compile {row['compile_s']} s)", flush=True)


def write(args, rows):
  command = " ".join(["python -m benchmarks.giant_memory"] + sys.argv[1:])
  result = {"benchmark": "giant_memory", "machine": common.machine(),
            "busy": common.busy_processes(), "command": command,
            "xla_flags": os.environ["XLA_FLAGS"], "rows": rows}
  common.RESULTS.mkdir(parents=True, exist_ok=True)
  suffix = (f"_L{args.layers}" if args.layers else "") + ("_remat" if args.remat else "") + (
      f"_b{args.batch_per_device.replace(',', '-')}" if args.batch_per_device != "1" else "")
  name = f"giant_memory_{args.variant}{suffix}_{args.targets.replace(',', '-')}.json"
  (common.RESULTS / name).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
