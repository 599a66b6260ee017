"""GLUE fine-tuning and evaluation throughput of the run's own compiled step, and the
paper-size sweep projected onto one GPU.

  python -m benchmarks.glue_throughput                     # MiniLM, lengths 16-128, a few minutes
  python -m benchmarks.glue_throughput --steps 6 --lengths 32,128

What is timed (in one process, on whatever devices soup.main would use):
  step   soup.train.make_train_step + compile_step, as the sweep stage builds them
         (configs/glue_bert.py's model: BertClassifier of the checkpoint, mean pooling, AdamW,
         clip 1.0, decay on matrices), on batches of `--batch` token rows padded to each
         length: examples/s and tokens/s (median of --steps steps after a warm-up), and the
         compiled step's FLOPs (XLA cost_analysis) as achieved GFLOP/s.
  eval   soup.evaluate.Evaluator (the evaluate stage's) at batch 64: examples/s.
  matmul a float32 [B*L, H] @ [H, 4H] matmul of the step's largest shape, the same process:
         the GFLOP/s the CPU reaches on the step's own kind of work.
Projection: the paper's sweep (32 members per task, epochs {2,3,4}, batch {16,32}, BERT-base,
max_length 128) from each task's real token lengths (../shared/glue, padded to the length
buckets as the run pads them) and BERT-base's FLOPs per token (6 x non-embedding params +
attention), at a stated fraction of a GPU's dense peak. Results: benchmarks/results/
glue_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks import common

MINILM = os.path.expanduser("~/checkpoints/all-MiniLM-L6-v2")
# BERT-base (bert-base-uncased): 12 layers, width 768, MLP 3072.
BERT_BASE = dict(layers=12, width=768, mlp=3072)
GPUS = {"H100 SXM (bf16 dense 989 TFLOP/s)": 989e12, "A100 (bf16 dense 312 TFLOP/s)": 312e12}
MFU = 0.30  # Assumed fraction of peak for a 110M-parameter encoder at batch 16-32.
# Assumed floor of one jitted BERT-base train step on a GPU at short lengths, whatever its
# FLOPs (kernel launches and the 110M-parameter AdamW update): small batches of short
# sentences are bound by the step count, not by compute.
STEP_FLOOR_S = 0.010


def flops_per_token(layers: int, width: int, mlp: int, length: int) -> float:
  """Training FLOPs per token: 3 x forward; forward = 2 x (4 w^2 + 2 w mlp) per layer plus
  attention's QK^T and AV (2 x 2 x L x w per layer)."""
  forward = layers * (2 * (4 * width * width + 2 * width * mlp) + 4 * length * width)
  return 3.0 * forward


def measure(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from soup import evaluate, mesh as mesh_lib, train
  from soup.models import bert

  mesh = mesh_lib.make_mesh()
  if Path(MINILM, "model.safetensors").exists():
    config, encoder = bert.load_hf_checkpoint(MINILM)
    source = MINILM
  else:  # The same shapes, random weights: the timing does not depend on the values.
    config = bert.BertConfig(30522, 384, 6, 12, 1536, 512, 2, 1e-12)
    encoder, source = None, "random weights of MiniLM's shape"
  model = bert.BertClassifier(config=config, num_classes=2, pooling="mean")
  dummy = jnp.zeros((2, 2, 8), jnp.int32)
  params = jax.device_get(model.init(jax.random.key(0), dummy)["params"])
  if encoder is not None:
    params["bert"] = encoder
  fns = train.make_train_step(lambda p, x: model.apply({"params": p}, x), 2,
                              augment_fn=lambda rng, x, s: x, preprocess_fn=lambda x: x,
                              grad_clip=1.0, weight_decay_mask="matrices")
  step = train.compile_step(fns, params, mesh)
  hyper = train.Hyper(lr=5e-5, weight_decay=0.01, total_steps=1000, warmup_steps=10)
  hp = jax.device_put(hyper.as_arrays(), mesh_lib.replicated(mesh))
  evaluator = evaluate.Evaluator(lambda p, x: model.apply({"params": p}, x), mesh, 64)
  rng = np.random.default_rng(0)
  out = {"checkpoint": source, "batch": args.batch, "devices": len(jax.devices()),
         "lengths": {}}
  for length in args.lengths:
    tokens = rng.integers(1000, 30000, (args.batch, 2, length)).astype(np.int32)
    tokens[:, 1] = 0
    labels = rng.integers(0, 2, args.batch).astype(np.int32)
    x, y = mesh_lib.global_batch(mesh, tokens, labels)
    state = jax.jit(step.init_state, out_shardings=step.state_sharding)(
        jax.tree.map(np.copy, params))
    lowered = step.fn.lower(state, x, y, hp, 0)
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    state, _ = step.fn(state, x, y, hp, 0)  # Warm-up (compile).
    jax.block_until_ready(state)
    times = []
    for i in range(args.steps):
      t = time.perf_counter()
      state, metrics = step.fn(state, x, y, hp, i + 1)
      jax.block_until_ready(metrics["loss"])
      times.append(time.perf_counter() - t)
    step_s = common.median(times)
    eval_tokens = np.concatenate([tokens] * 2)
    evaluator.logits(params, eval_tokens)  # Warm-up.
    eval_s = common.median(common.timeit(lambda: evaluator.logits(params, eval_tokens), 3))
    m = jnp.asarray(rng.normal(size=(args.batch * length, config.hidden_size)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(config.hidden_size, config.intermediate_size)), jnp.float32)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(m, w).block_until_ready()
    mm_s = common.median(common.timeit(lambda: matmul(m, w).block_until_ready(), 5))
    out["lengths"][str(length)] = {
        "step_s": step_s, "train_examples_per_s": args.batch / step_s,
        "train_tokens_per_s": args.batch * length / step_s,
        "step_gflop": flops / 1e9, "step_gflops_per_s": flops / step_s / 1e9,
        "eval_examples_per_s": len(eval_tokens) / eval_s,
        "matmul_gflops_per_s": 2 * m.shape[0] * m.shape[1] * w.shape[1] / mm_s / 1e9}
    print(f"length {length}: {out['lengths'][str(length)]}", file=sys.stderr, flush=True)
  return out


def projection(glue_dir: str, buckets=(16, 32, 64, 128), max_length: int = 128) -> dict:
  """The paper's sweep on one GPU: token-passes of 32 members per task from real lengths."""
  from soup.data import glue
  tokenizer_path = Path(MINILM, "tokenizer.json")  # bert-base-uncased's vocabulary is the same.
  tokenizer = glue.load_tokenizer(tokenizer_path, max_length)
  rows = {}
  for task in ("sst2", "rte", "cola"):
    spec = glue.GLUE_TASKS[task]
    files = glue.task_files(glue_dir, task)
    texts, labels = glue.read_tsv(files["train"], spec)
    lengths = glue.tokenize(tokenizer, texts, labels).lengths
    padded = np.mean([glue.bucket_length(int(n), buckets) for n in lengths])
    # 32 members x mean epochs 3 (uniform over {2, 3, 4}); every batch padded to a bucket.
    tokens = 32 * 3 * len(lengths) * padded
    flops = tokens * flops_per_token(**BERT_BASE, length=int(padded))
    steps = 32 * 3 * len(lengths) / 24  # Mean batch 24 over {16, 32}.
    rows[task] = {"train_examples": int(len(lengths)), "mean_padded_length": float(padded),
                  "train_pflop": flops / 1e15, "steps": int(steps),
                  "minutes_step_floor": steps * STEP_FLOOR_S / 60,
                  **{f"minutes_compute_{name.split()[0]}": flops / (peak * MFU) / 60
                     for name, peak in GPUS.items()}}
  return rows


if __name__ == "__main__":
  import numpy as np
  parser = argparse.ArgumentParser()
  parser.add_argument("--lengths", default="16,32,64,128")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--glue_dir", default=str(common.ROOT.parent / "shared" / "glue"))
  args = parser.parse_args()
  args.lengths = [int(x) for x in args.lengths.split(",")]
  t = time.time()
  result = {"machine": common.machine(), "load_before": common.uptime(),
            "measured": measure(args), "load_after": common.uptime(),
            "projection_assumed_mfu": MFU, "step_floor_s": STEP_FLOOR_S, "gpus": list(GPUS)}
  if Path(args.glue_dir).is_dir():
    result["projection"] = projection(args.glue_dir)
  result["seconds"] = round(time.time() - t, 1)
  common.RESULTS.mkdir(parents=True, exist_ok=True)
  (common.RESULTS / "glue_throughput.json").write_text(json.dumps(result, indent=1))
  print("| length | train ex/s | train tokens/s | step GFLOP/s | matmul GFLOP/s | eval ex/s |")
  print("| ---: | ---: | ---: | ---: | ---: | ---: |")
  for length, r in result["measured"]["lengths"].items():
    print(f"| {length} | {r['train_examples_per_s']:.1f} | {r['train_tokens_per_s']:.0f} | "
          f"{r['step_gflops_per_s']:.1f} | {r['matmul_gflops_per_s']:.1f} | "
          f"{r['eval_examples_per_s']:.1f} |")
  for task, r in result.get("projection", {}).items():
    print(task, json.dumps(r))
