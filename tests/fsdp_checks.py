"""FSDP checks on 8 simulated CPU devices; run by tests/test_fsdp.py in subprocesses.

  python tests/fsdp_checks.py layout            per-device bytes, FSDP == replicated, one compile
  python tests/fsdp_checks.py killed WORKDIR K  FSDP training that SIGKILLs itself before step K
  python tests/fsdp_checks.py resume WORKDIR    resumes it, compares with an uninterrupted run
  python tests/fsdp_checks.py soups RANK PORT DIR OUT   one of 2 processes x 4 devices

All but soups need XLA_FLAGS=--xla_force_host_platform_device_count=8. Each mode
prints "<mode>: ok" and exits non-zero on a failed assertion.
"""

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np

STEPS, BATCH, SIZE, CLASSES = 20, 16, 16, 10


def tiny_vit():
  from soup.models.vit import ViT
  return ViT(num_classes=CLASSES, patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=2)


def init_params(model):
  import jax
  import jax.numpy as jnp
  params = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 1)))["params"]
  # A non-zero head, so every layer gets gradients from the first step.
  head = params["head"]["kernel"]
  params["head"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(1), head.shape)
  return jax.device_get(params)


def batch(step):
  rng = np.random.default_rng(1000 + step)
  images = rng.integers(0, 256, (BATCH, SIZE, SIZE, 1), dtype=np.uint8)
  return images, rng.integers(0, CLASSES, BATCH).astype(np.int32)


HYPER = dict(lr=1e-3, weight_decay=0.1, label_smoothing=0.1, mixup=0.2, aug_strength=0.5,
             total_steps=STEPS, warmup_steps=3)


def step_fns(model):
  from soup import train
  from soup.data import fashion_mnist
  return train.make_train_step(lambda p, x: model.apply({"params": p}, x), CLASSES,
                               augment_fn=fashion_mnist.augment,
                               preprocess_fn=fashion_mnist.normalize, grad_clip=1.0,
                               weight_decay_mask="matrices")


def run(workdir, rules, batch_fn=batch, step=None, checkpoint_every=100, **hyper):
  """train.train of the tiny ViT; `step` (compiled for `rules`) shared, or compiled here."""
  from soup import mesh as mesh_lib, train
  model = tiny_vit()
  params = init_params(model)
  step = step or train.compile_step(step_fns(model), params, mesh_lib.make_mesh(), rules)
  return train.train(step=step, params=params, hyper=train.Hyper(**{**HYPER, **hyper}),
                     batch_fn=batch_fn, workdir=workdir, seed=7, log_every=1,
                     checkpoint_every=checkpoint_every)


def losses(workdir):
  lines = (Path(workdir) / "logs" / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]
  return {r["step"]: r["train/loss"] for r in records}


def layout():
  import tempfile

  import jax

  from soup import mesh as mesh_lib, sharding, train
  assert jax.device_count() == 8, jax.devices()
  mesh = mesh_lib.make_mesh()
  model = tiny_vit()
  params = init_params(model)
  step = train.compile_step(step_fns(model), params, mesh, sharding.FSDP)
  layout = step.state_sharding
  state = jax.jit(step.init_state, out_shardings=layout)(sharding.put(params, layout["params"]))

  # Per device: 1/8 of every split leaf plus the replicated ones, from the shards themselves.
  arrays = [state["params"], state["opt_state"]]
  per_device = {}  # Bytes each device holds, from the shards themselves.
  for leaf in (x for tree in arrays for x in jax.tree.leaves(tree)):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  total = sum(x.nbytes for t in arrays for x in jax.tree.leaves(t))
  replicated = sum(x.nbytes for t in arrays for x in jax.tree.leaves(t)
                   if x.sharding.is_fully_replicated)
  assert len(per_device) == 8
  assert set(per_device.values()) == {(total - replicated) // 8 + replicated}, per_device
  assert replicated < 0.01 * total, (replicated, total)  # Only the 10-class bias and counts.
  moments = sharding.named_leaves(state["opt_state"])
  for name, leaf in sharding.named_leaves(state["params"]).items():
    same = [v for k, v in moments.items() if k.endswith("/" + name)]
    assert len(same) == 2 and all(v.sharding == leaf.sharding for v in same), name  # mu, nu.
  print(f"bytes: total {total}, per device {sorted(set(per_device.values()))}, "
        f"replicated {replicated}")

  # The step keeps the layout and donates the state.
  images, labels = mesh_lib.global_batch(mesh, *batch(0))
  hp = jax.device_put(train.Hyper(**HYPER).as_arrays(), mesh_lib.replicated(mesh))  # As train.
  new, _ = step.fn(state, images, labels, hp, 7)
  assert all(x.is_deleted() for x in jax.tree.leaves(state["params"]))
  assert jax.tree.all(jax.tree.map(lambda x, s: x.sharding == s, new, layout))

  with tempfile.TemporaryDirectory() as tmp:
    # 20 steps under FSDP and under replication: same losses and params to float32 rounding.
    fsdp = run(f"{tmp}/fsdp", sharding.FSDP, step=step)
    repl = run(f"{tmp}/repl", sharding.REPLICATED)
    a, b = losses(f"{tmp}/fsdp"), losses(f"{tmp}/repl")
    assert sorted(a) == list(range(1, STEPS + 1)), a
    np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], rtol=1e-5)
    flat = sharding.named_leaves
    start, f, r = flat(params), flat(fsdp.params), flat(repl.params)
    for name in f:
      moved = np.abs(r[name] - start[name]).max()
      if name.endswith("key/bias"):
        # Softmax ignores a shift shared by a query's logits, so the loss does not depend
        # on the key bias: its gradient is rounding noise in both layouts, which Adam
        # scales to steps of up to lr that differ between them. It barely moves.
        assert moved < 1e-4 and np.abs(f[name] - start[name]).max() < 1e-4, name
        continue
      assert moved > 1e-3, (name, moved)  # Every other leaf trained ...
      np.testing.assert_allclose(f[name], r[name], rtol=1e-5, atol=2e-7, err_msg=name)  # ... alike.
    diff = max(np.abs(f[k] - r[k]).max() for k in f if not k.endswith("key/bias"))
    print(f"fsdp vs replicated after {STEPS} steps: max |param diff| {diff:.2e}, "
          f"losses {a[1]:.4f} -> {a[STEPS]:.4f}")

    # The sweep's one compile: members with other hyperparameters reuse the same executable.
    for i, lr in enumerate((1e-3, 3e-4, 1e-4)):
      run(f"{tmp}/member{i}", sharding.FSDP, step=step, lr=lr, total_steps=3 + i)
    assert step.fn._cache_size() == 1, step.fn._cache_size()
  print("layout: ok")


def killed(workdir, kill_at):
  def batch_fn(step):
    if step == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
    return batch(step)
  from soup import sharding
  run(workdir, sharding.FSDP, batch_fn=batch_fn, checkpoint_every=5)
  raise AssertionError("not killed")


def resume(workdir):
  import jax

  from soup import mesh as mesh_lib, sharding, train, train_state
  # Orbax restores the sharded state straight into the FSDP layout.
  model = tiny_vit()
  params = init_params(model)
  step = train.compile_step(step_fns(model), params, mesh_lib.make_mesh(), sharding.FSDP)
  init_state, layout = step.init_state, step.state_sharding
  manager = train_state.train_state_manager(Path(workdir) / "train_state", 5)
  step, restored = train_state.restore_train_state(
      manager, sharding.abstract(jax.eval_shape(init_state, params), layout))
  manager.close()
  assert step == 10, step
  assert jax.tree.all(jax.tree.map(lambda x, s: x.sharding == s, restored, layout))
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(restored["params"]))

  resumed = run(workdir, sharding.FSDP, checkpoint_every=5)
  reference = run(f"{workdir}_uninterrupted", sharding.FSDP, checkpoint_every=5)
  assert resumed.steps == reference.steps == STEPS
  jax.tree.map(np.testing.assert_array_equal, resumed.params, reference.params)
  a, b = losses(workdir), losses(f"{workdir}_uninterrupted")
  assert all(a[s] == b[s] for s in range(1, STEPS + 1)), (a, b)  # Bit-identical.
  print("resume: ok")


# --- Sharded soups, 2 processes x 4 devices ---------------------------------


def soup_ingredients(n=4, seed=0):
  """Ingredients of a small MLP (1 MB each): leaves split 8 ways, one replicated (5 values)."""
  rng = np.random.default_rng(seed)
  base = {"w": rng.normal(size=(512, 512)).astype(np.float32) / 16,
          "u": rng.normal(size=(512, 16)).astype(np.float32) / 16,
          "b": rng.normal(size=(5,)).astype(np.float32)}
  return [{k: v + 0.5 * np.std(v) * rng.normal(size=v.shape).astype(np.float32)
           for k, v in base.items()} for _ in range(n)]


def soup_apply(params, x):
  import jax.numpy as jnp
  return jnp.tanh(x @ params["w"]) @ params["u"] + jnp.pad(params["b"], (0, 11))


def soup_heldout():
  """Labels from a noisy teacher near the ingredients, so accuracies differ between soups."""
  import jax
  rng = np.random.default_rng(5)
  x = rng.normal(size=(96, 512)).astype(np.float32)
  trees = soup_ingredients()
  teacher = {k: np.mean([t[k] for t in trees], axis=0) for k in trees[0]}
  logits = np.asarray(jax.jit(soup_apply)(teacher, x))
  y = (logits + 1.0 * logits.std() * rng.normal(size=logits.shape)).argmax(-1)
  return x, y.astype(np.int32)


def soups(rank, port, directory, out):
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=rank)
  from soup import checkpoints, mesh as mesh_lib, sharding, soups as soup_lib
  from soup.evaluate import Evaluator
  assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
  mesh = mesh_lib.make_mesh()
  directory = Path(directory)
  names = [f"model_{i}" for i in range(4)]
  trees = soup_ingredients()
  shardings = sharding.shardings(trees[0], mesh, sharding.FSDP)
  for name, tree in zip(names, trees):  # Written sharded: each process its own shards.
    checkpoints.save_ingredient(directory / name, sharding.put(tree, shardings), {"name": name})

  x, y = soup_heldout()
  evaluator = Evaluator(soup_apply, mesh, batch_size=32)
  seen = []

  def evaluate(params):
    seen.append(all(not p.sharding.is_fully_replicated for k, p in params.items() if k != "b"))
    return evaluator.accuracy(params, x, y)

  paths = [directory / n for n in names]
  layout = soup_lib.Layout.sharded(mesh, sharding.FSDP)
  read_before = sum(checkpoints.bytes_read().values())
  uniform = soup_lib.weighted_average(paths, layout=layout)
  scores = {n: evaluate(soup_lib.restore(directory / n, layout)) for n in names}
  greedy = soup_lib.greedy_soup({n: directory / n for n in names}, scores, evaluate,
                                layout=layout)
  wise = {a: evaluate(soup_lib.wise_ft(paths[0], paths[1], a, layout)) for a in (0.0, 0.5, 1.0)}
  read = sum(checkpoints.bytes_read().values()) - read_before
  assert all(seen), seen  # Every held-out evaluation got sharded params.
  assert all(not v.sharding.is_fully_replicated for k, v in uniform.items() if k != "b")

  from jax.experimental import multihost_utils
  gathered = multihost_utils.process_allgather({"uniform": uniform, "greedy": greedy.result},
                                               tiled=True)
  result = {"read_bytes": read, "scores": scores, "greedy": greedy.ingredients,
            "greedy_held_out": greedy.held_out, "wise": {str(k): v for k, v in wise.items()}}
  Path(f"{out}.{rank}.json").write_text(json.dumps(result))
  if rank == 0:
    np.savez(f"{out}.npz", **{f"{k}/{n}": np.asarray(v) for k, t in gathered.items()
                              for n, v in t.items()})
  jax.distributed.shutdown()
  print(f"soups {rank}: ok")


if __name__ == "__main__":
  mode = sys.argv[1]
  if mode == "layout":
    layout()
  elif mode == "killed":
    killed(sys.argv[2], int(sys.argv[3]))
  elif mode == "resume":
    resume(sys.argv[2])
  elif mode == "soups":
    soups(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
  else:
    raise SystemExit(f"unknown mode {mode}")
