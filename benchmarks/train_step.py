"""Achieved FLOP/s of the default tiny-ViT train step vs a matmul, 1 and 2 host devices.

  python -m benchmarks.train_step               # devices 1 and 2, a few minutes on 2 cores
  python -m benchmarks.train_step --devices 1 --steps 20 --repeats 3

Each device count runs in a fresh subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=D set before jax is imported.
In that process:
  step     soup.train.make_train_step of configs/fashion_mnist.py's model (ViT patch 7,
           width 64, depth 4, 4 heads, mlp 256; batch 128 of 28x28x1; augmentation,
           mixup and label smoothing on, as in a sweep member), jitted with the state
           donated, replicated state and batch split over the mesh as in soup.train.train.
           FLOPs per step: the compiled module's cost_analysis() (D=1 compile; the
           whole global step), cross-checked with an analytic matmul count
           (common.vit_forward_flops, 3x forward).
  matmul   a float32 square matmul with the step's analytic FLOP count (2 n^3 = step FLOPs)
           and one of the step's own largest shape ([B*T, 64] @ [64, 256]), timed in the
           same process: the achievable FLOP/s the step is compared against.
  eval     soup.evaluate.Evaluator (batch 500) logits on 10,000 images: images/s.
Each subprocess waits for no soup.main / pytest process and is rerun if other processes
took > 5% of the CPUs meanwhile (common.quiet_call). Target (issue): step FLOP/s >= 60% of
the matmul's. Results: benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks import common
from benchmarks.common import timeit


def worker(args: dict) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import fashion_mnist
  from soup import evaluate, mesh as mesh_lib, models, train
  from soup.data.fashion_mnist import augment, normalize

  config = fashion_mnist.get_config()
  batch = config.finetune.batch_size
  mesh = mesh_lib.make_mesh()
  model = models.build(config.model, 10)
  params = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"])
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  fns = train.make_train_step(
      apply_fn, 10, augment_fn=augment, preprocess_fn=normalize,
      grad_clip=config.finetune.grad_clip, weight_decay_mask=config.finetune.weight_decay_mask)
  init_state, step_fn = fns
  # The step the sweep runs: train.compile_step's jit, state layout and batch split.
  step = train.compile_step(fns, params, mesh)
  replicated = mesh_lib.replicated(mesh)
  state = jax.device_put(init_state(jax.tree.map(jnp.array, params)),
                         step.state_sharding)  # Donated.
  hyper = train.Hyper(lr=1e-3, weight_decay=0.1, label_smoothing=0.1, mixup=0.2,
                      aug_strength=0.5, total_steps=10_000, warmup_steps=50)
  hp = jax.device_put(hyper.as_arrays(), replicated)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, (batch,), dtype=np.int32)
  x, y = mesh_lib.global_batch(mesh, images, labels)

  step_jit = step.fn
  t = time.perf_counter()
  compiled = step_jit.lower(state, x, y, hp, 0).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", float("nan")))
  analytic = common.vit_forward_flops(batch, (28, 28, 1), config.model.patch_size,
                                      config.model.width, config.model.depth,
                                      config.model.mlp_dim, 10)

  holder = {"state": state}

  def run_steps():
    s = holder["state"]
    for _ in range(args["steps"]):
      s, metrics = compiled(s, x, y, hp, 0)
    jax.block_until_ready(s)
    holder["state"] = s

  run_steps()  # Warm-up.
  step_s = [t / args["steps"] for t in timeit(run_steps, args["repeats"])]

  # Matmul references, same process, same devices visible.
  def matmul_bench(m, k, n, iters):
    a = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
    b = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32))
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()

    def go():
      for _ in range(iters):
        out = f(a, b)
      out.block_until_ready()
    ts = [t / iters for t in timeit(go, args["repeats"])]
    return {"shape": [m, k, n], "flops": 2.0 * m * k * n, "s": common.median(ts), "raw": ts}

  n_sq = round((analytic["train_step"] / 2) ** (1 / 3))  # Same size for every device count.
  square = matmul_bench(n_sq, n_sq, n_sq, max(3, args["steps"] // 2))
  tokens = analytic["tokens"]
  own = matmul_bench(batch * tokens, config.model.width, config.model.mlp_dim, 200)

  # Evaluation throughput (Evaluator, batch 500) on 10,000 images.
  ev = evaluate.Evaluator(lambda p, im: model.apply({"params": p}, normalize(im)),
                          mesh, config.eval.batch_size)
  eval_images = rng.integers(0, 256, (10_000, 28, 28, 1), dtype=np.uint8)
  ev.logits(params, eval_images[:1000])  # Compile.
  eval_s = timeit(lambda: ev.logits(params, eval_images), args["repeats"])

  sweep = sweep_throughput(train, step, step_fn, params, x, y, images, labels,
                           args.get("members", 4), args["steps"], args["repeats"])

  return {"devices": len(jax.devices()), "batch": batch, "compile_s": compile_s,
          "sweep": sweep,
          "xla_flops": xla_flops, "analytic_flops": analytic["train_step"],
          "step_s": common.median(step_s), "step_raw": step_s,
          "square_matmul": square, "own_matmul": own,
          "eval_images_per_s": 10_000 / common.median(eval_s), "eval_raw": eval_s}


def sweep_throughput(train, step, step_fn, params, x, y, images, labels, members: int,
                     steps: int, repeats: int) -> dict:
  """Member-steps per second of K sweep members: one after another through the run's own
  compiled step (`step`, from train.compile_step: how soup.experiment's sweep runs them, on
  the mesh-split batch x, y), against the K stacked on a leading axis and vmapped in one
  jitted step (each with its own hyperparameters, batch and seed)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  hypers = [train.Hyper(lr=lr, weight_decay=0.1, label_smoothing=0.1 * (k % 2),
                        mixup=0.2 * (k % 2), aug_strength=0.5, total_steps=10_000,
                        warmup_steps=50).as_arrays()
            for k, lr in enumerate(np.geomspace(5e-4, 5e-3, members))]
  one, init_state = step.fn, step.init_state
  states = [jax.device_put(init_state(jax.tree.map(jnp.array, params)), step.state_sharding)
            for _ in range(members)]
  holder = {"states": states}

  def sequential():
    out = []
    for k, s in enumerate(holder["states"]):
      for _ in range(steps):
        s, _ = one(s, x, y, hypers[k], k)
      out.append(s)
    jax.block_until_ready(out)
    holder["states"] = out

  stacked_step = jax.jit(jax.vmap(step_fn), donate_argnums=0)
  stack = lambda trees: jax.tree.map(lambda *v: jnp.stack(v), *trees)  # noqa: E731
  stacked = {"state": stack([init_state(jax.tree.map(jnp.array, params))
                             for _ in range(members)]),
             "x": jnp.stack([jnp.asarray(images)] * members),
             "y": jnp.stack([jnp.asarray(labels)] * members),
             "hp": stack(hypers), "seed": jnp.arange(members)}

  def vmapped():
    s = stacked["state"]
    for _ in range(steps):
      s, _ = stacked_step(s, stacked["x"], stacked["y"], stacked["hp"], stacked["seed"])
    jax.block_until_ready(s)
    stacked["state"] = s

  sequential(), vmapped()  # Compile and warm up.
  seq, vm = [], []
  for _ in range(repeats):  # Interleaved, so drift in the machine hits both alike.
    seq += timeit(sequential, 1)
    vm += timeit(vmapped, 1)
  rate = lambda ts: members * steps / common.median(ts)  # noqa: E731
  return {"members": members, "steps": steps, "sequential_member_steps_per_s": rate(seq),
          "stacked_member_steps_per_s": rate(vm), "speedup": rate(vm) / rate(seq),
          "sequential_raw": seq, "stacked_raw": vm}


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  ap.add_argument("--devices", default="1,2")
  ap.add_argument("--steps", type=int, default=30, help="steps per timed repeat")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--quiet-wait-s", type=float, default=300, help="before each subprocess, wait up "
                  "to this long for no soup.main / pytest process")
  ap.add_argument("--retries", type=int, default=2, help="reruns of a contended subprocess")
  ap.add_argument("--members", type=int, default=4, help="sweep members, sequential vs stacked")
  ap.add_argument("--out", default="train_step")
  a = ap.parse_args()
  if a.worker:
    print(json.dumps(worker(json.loads(a.worker))))
    return
  busy = common.busy_processes()
  runs = []
  for d in [int(x) for x in a.devices.split(",")]:
    flags = (os.environ.get("XLA_FLAGS", "")
             + f" --xla_force_host_platform_device_count={d}").strip()
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--worker",
           json.dumps({"steps": a.steps, "repeats": a.repeats, "members": a.members})]
    r, other = common.quiet_call(lambda: common.run_json(cmd, env={"XLA_FLAGS": flags}),
                                 a.quiet_wait_s, a.retries)
    r["other_cpu_frac"] = other
    runs.append(r)
    print(f"devices={d}: step {r['step_s'] * 1e3:.2f} ms", file=sys.stderr)
  # FLOPs of the global step: the 1-device compile's count where it ran, else this run's.
  base = next((r for r in runs if r["devices"] == 1), runs[0])
  rows = []
  for r in runs:
    flops = base["xla_flops"]
    achieved = flops / r["step_s"]
    sq = r["square_matmul"]["flops"] / r["square_matmul"]["s"]
    own = r["own_matmul"]["flops"] / r["own_matmul"]["s"]
    r.update(achieved_flops_per_s=achieved, square_flops_per_s=sq, own_flops_per_s=own,
             fraction_of_square=achieved / sq, fraction_of_own=achieved / own)
    rows.append([r["devices"], r["step_s"] * 1e3, r["batch"] / r["step_s"], flops / 1e9,
                 r["analytic_flops"] / 1e9, achieved / 1e9,
                 f"{sq / 1e9:.4g} (n={r['square_matmul']['shape'][0]})", achieved / sq,
                 own / 1e9, achieved / own, r["eval_images_per_s"],
                 f"{100 * r['other_cpu_frac']:.0f}%"])
  text = common.table(
      ["devices", "step ms", "train images/s", "step GFLOP (XLA)", "step GFLOP (analytic)",
       "step GFLOP/s", "square matmul GFLOP/s", "step / square", "[B*T,64]@[64,256] GFLOP/s",
       "step / that matmul", "eval images/s (batch 500)", "others' CPU"], rows)
  print(text)
  print(common.table(
      ["devices", "members", "sequential member-steps/s", "stacked (vmapped) member-steps/s",
       "stacked / sequential"],
      [[r["devices"], r["sweep"]["members"], r["sweep"]["sequential_member_steps_per_s"],
        r["sweep"]["stacked_member_steps_per_s"], r["sweep"]["speedup"]] for r in runs]))
  for r in runs:
    print(f"devices={r['devices']}: XLA cost_analysis of this compile: {r['xla_flops'] / 1e9:.4g} "
          f"GFLOP; compile {r['compile_s']:.1f}s", file=sys.stderr)
  print("wrote", common.write_results(a.out, {"target_fraction": 0.6, "busy_at_start": busy,
                                               "runs": runs}), file=sys.stderr)


if __name__ == "__main__":
  main()
