"""Checks that need several (simulated) devices; run by tests/test_sharding.py.

`python tests/multidevice_checks.py single` runs under
XLA_FLAGS=--xla_force_host_platform_device_count=8 in one process;
`python tests/multidevice_checks.py multiprocess RANK PORT OUT` is one of two
jax.distributed CPU processes. Exits non-zero on a failed assertion.
"""

import sys

import numpy as np


def _trees(n, seed=0):
  rng = np.random.default_rng(seed)
  # Odd sizes on purpose: flat shards need padding to a multiple of 8.
  return [{"a": {"kernel": rng.normal(size=(13, 7)).astype(np.float32)},
           "b": rng.normal(size=(5,)).astype(np.float32),
           "c": rng.normal(size=(16, 8)).astype(np.float32)} for _ in range(n)]


def single():
  import jax

  from soup import checkpoints, mesh as mesh_lib, soups, trees as tree_lib
  from soup.soups import average, learned
  assert jax.device_count() == 8, jax.devices()
  mesh = mesh_lib.make_mesh()
  trees = _trees(5)

  # The flat layout's average == the host's to float32 rounding (XLA fuses the update
  # into one FMA; the host's in-place numpy update rounds twice).
  flat_layout = soups.Layout.flat(mesh)
  sharded = soups.weighted_average(trees, layout=flat_layout)
  streamed = soups.weighted_average(trees)
  for k, v in tree_lib.flatten_with_names(streamed).items():
    np.testing.assert_allclose(tree_lib.flatten_with_names(sharded)[k], v, rtol=2e-6,
                               atol=1e-7, err_msg=k)
  # A soup of identical models is that model, exactly, sharded too.
  for k, v in tree_lib.flatten_with_names(
      soups.weighted_average([trees[0]] * 3, layout=flat_layout)).items():
    np.testing.assert_array_equal(v, tree_lib.flatten_with_names(trees[0])[k], err_msg=k)

  # Each device holds ceil(size / 8) values of every parameter.
  mean = average.RunningMean(flat_layout, average.open_source(trees[0]).specs)
  mean.add(trees[0])
  for name, leaf in mean.mean.items():
    size = tree_lib.flatten_with_names(trees[0])[name].size
    shards = leaf.addressable_shards
    assert len(shards) == 8
    assert all(s.data.shape == (-(-size // 8),) for s in shards), (
        name, [s.data.shape for s in shards])

  # Learned soup: the N=16 stack is split so each device holds N*P/D of it.
  stack_trees = _trees(16, seed=1)
  stacked = learned.stack_ingredients(stack_trees, mesh)
  total = sum(x.size * 4 for x in jax.tree.leaves(stacked))
  per_device = {}
  for leaf in jax.tree.leaves(stacked):
    assert leaf.shape[0] == 16
    for s in leaf.addressable_shards:
      per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
      assert s.data.shape[0] == 2, s.data.shape  # 16 ingredients over 8 devices.
  assert len(per_device) == 8 and all(b == total // 8 for b in per_device.values()), per_device
  # Restored from checkpoint paths straight into the device shards: the same stack.
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    paths = [f"{tmp}/m{i}" for i in range(16)]
    for path, tree in zip(paths, stack_trees):
      checkpoints.save_ingredient(path, tree)
    from_paths = learned.stack_ingredients(paths, mesh)
    for name, leaf in tree_lib.flatten_with_names(from_paths).items():
      expected = tree_lib.flatten_with_names(stacked)[name]
      assert leaf.sharding == expected.sharding, name
      np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected), err_msg=name)

    # Saved shard by shard from FSDP-sharded arrays: each shard one chunk file, which the raw
    # reader reads (whole, by box and by flat range) exactly as Orbax's public restore does,
    # on the orbax-checkpoint release checkpoints.RAW_LAYOUT_ORBAX names.
    import orbax.checkpoint as ocp

    from soup import sharding
    big = {"w": np.arange(64 * 24, dtype=np.float32).reshape(64, 24),
           "v": np.arange(5 * 16, dtype=np.float32).reshape(5, 16), "b": np.ones(3, np.float32)}
    layout = sharding.shardings(big, mesh, sharding.FSDP)
    checkpoints.save_ingredient(f"{tmp}/fsdp", sharding.put(big, layout))
    with ocp.StandardCheckpointer() as checkpointer:
      public = checkpointer.restore(f"{tmp}/fsdp/params")
    raw = checkpoints.open_ingredient(f"{tmp}/fsdp")
    for name, leaf in big.items():
      np.testing.assert_array_equal(np.asarray(public[name]), leaf, err_msg=name)
      np.testing.assert_array_equal(raw.read(name), leaf, err_msg=name)
      box = tuple((1, d - 1) if d > 2 else (0, d) for d in leaf.shape)
      np.testing.assert_array_equal(raw.read_box(name, box),
                                    leaf[tuple(slice(a, b) for a, b in box)], err_msg=name)
      np.testing.assert_array_equal(raw.read_flat(name, 3, leaf.size - 2),
                                    leaf.reshape(-1)[3:-2], err_msg=name)
    chunks = {n: fp["chunk"] for n, fp in checkpoints.ingredient_metadata(
        f"{tmp}/fsdp")["fingerprints"].items()}
    assert chunks == {"w": [8, 24], "v": [5, 2], "b": [3]}, chunks

  # The learned soup on the mesh equals the unsharded one to float32 rounding.
  import jax.numpy as jnp
  # (A bias shared by every class would get pure-noise gradients that Adam amplifies.)
  apply_fn = lambda p, x: jnp.asarray(x, jnp.float32) @ p["a"]["kernel"] + jnp.pad(p["b"], (0, 2))
  rng = np.random.default_rng(2)
  x = rng.normal(size=(64, 13)).astype(np.float32)
  y = rng.integers(0, 7, 64).astype(np.int32)
  ingredients = _trees(8, seed=3)
  on_mesh = soups.learned_soup(ingredients, apply_fn, x, y, epochs=2, batch_size=16, mesh=mesh,
                               by_layer=True)
  plain = soups.learned_soup(ingredients, apply_fn, x, y, epochs=2, batch_size=16, by_layer=True)
  for k in on_mesh.weights:
    np.testing.assert_allclose(on_mesh.weights[k], plain.weights[k], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(on_mesh.params["a"]["kernel"], plain.params["a"]["kernel"],
                             rtol=1e-5, atol=1e-6)

  # Exact evaluation on 8 devices: same logits as one device, nothing dropped.
  from soup.evaluate import Evaluator
  w = rng.normal(size=(13, 4)).astype(np.float32)
  images = rng.normal(size=(101, 13)).astype(np.float32)
  ev = Evaluator(lambda p, x: x @ p, mesh, batch_size=16)
  logits = ev.logits(w, images)
  assert logits.shape == (101, 4)
  np.testing.assert_allclose(logits, images @ w, rtol=1e-5, atol=1e-5)
  print("single: ok")


def multiprocess(rank: int, port: int, out: str):
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=rank)
  from soup import mesh as mesh_lib, soups
  assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.devices())
  mesh = mesh_lib.make_mesh()
  trees = _trees(5)
  result = soups.weighted_average(trees, layout=soups.Layout.flat(mesh))
  if rank == 0:
    from soup import trees as tree_lib
    np.savez(out, **tree_lib.flatten_with_names(result))
  jax.distributed.shutdown()
  print(f"multiprocess {rank}: ok")


if __name__ == "__main__":
  if sys.argv[1] == "single":
    single()
  else:
    multiprocess(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
