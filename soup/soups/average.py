"""Weight averaging: streamed from checkpoints or in memory, and device-sharded.

Every recipe here computes the running weighted mean in float32
    mean_k = mean_{k-1} + (w_k / W_k) * (x_k - mean_{k-1}),   W_k = w_1 + ... + w_k,
so memory stays flat in N and a soup of identical models is exactly that model
(x - mean = 0 at every step). Two implementations of that formula:
- `stream_average` (and `weighted_average`), on the host with numpy: x - mean,
  times w/W, plus mean, each rounded to float32;
- `running_update`, XLA's fused version (one multiply-add), used on devices by
  `sharded_average` and by the greedy soup.
The two agree to float32 rounding; each is deterministic, so a rerun (after a
kill -9, say) reproduces its soup bit for bit.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from soup import checkpoints, memory, trees
from soup.trees import check_compatible  # noqa: F401  (re-exported: soup.soups.check_compatible)

PyTree = Any
Source = Any  # A param pytree, the path of an ingredient checkpoint, or an opened one.
IngredientMismatchError = trees.TreeMismatchError

BLOCK = 1 << 16  # float32 values (256 KiB): x, mean and the scratch stay in cache per block.
THREADED_MIN_BYTES = 16 << 20  # Smaller models are averaged on the calling thread.


# --- Sources: trees and checkpoints behind one leaf-reading interface -------------


class InMemory:
  """A param pytree with the interface of checkpoints.Ingredient."""

  def __init__(self, tree: PyTree, name: str):
    self.name = name
    self.leaves = trees.flatten_with_names(tree)
    self.treedef = jax.tree.structure(tree)
    self.specs = {n: jax.ShapeDtypeStruct(np.shape(x),
                                          getattr(x, "dtype", None) or np.asarray(x).dtype)
                  for n, x in self.leaves.items()}

  def __str__(self):
    return self.name

  def read(self, name: str, out: Optional[np.ndarray] = None) -> np.ndarray:
    del out  # Already in memory: no copy.
    return np.asarray(self.leaves[name])

  def prefetch(self, names=None) -> None:
    pass

  def release(self) -> None:
    pass

  def tree(self) -> PyTree:
    return jax.tree.unflatten(self.treedef, [self.leaves[n] for n in self.leaves])


def open_source(source: Source, verify: bool = True, index: int = 0):
  """A checkpoints.Ingredient for a path (metadata only, no array I/O), InMemory for a tree."""
  if isinstance(source, (checkpoints.Ingredient, InMemory)):
    return source
  if isinstance(source, (str, os.PathLike)):
    return checkpoints.open_ingredient(source, verify)
  return InMemory(source, f"ingredient #{index}")


def open_sources(sources: Sequence[Source], verify: bool = True) -> list:
  """Opens every source and checks each against the first (keys, shapes, dtypes)."""
  opened = [open_source(s, verify, i) for i, s in enumerate(sources)]
  for other in opened[1:]:
    check_compatible(opened[0].specs, other.specs, str(opened[0]), str(other))
  return opened


def as_tree(flat: dict, source) -> PyTree:
  """{name: leaf} as a tree structured like `source`: the caller's structure for a
  tree, nested dicts (as load_ingredient gives) for a checkpoint."""
  if isinstance(source, InMemory):
    return jax.tree.unflatten(source.treedef, [flat[n] for n in source.leaves])
  return trees.unflatten(flat)


def check_finite(params: PyTree, name: str) -> None:
  bad = [k for k, v in trees.flatten_with_names(params).items()
         if not np.all(np.isfinite(np.asarray(v, np.float32)))]
  if bad:
    raise FloatingPointError(f"{name} has non-finite values in {bad[:5]} (a diverged run).")


# --- The arithmetic -------------------------------------------------------------------


@jax.jit
def to_float32(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


@jax.jit
def running_update(mean: PyTree, x: PyTree, coef) -> PyTree:
  """XLA's mean + coef * (x - mean), in float32 (x of any float dtype)."""
  return jax.tree.map(lambda m, v: m + coef * (v.astype(jnp.float32) - m), mean, x)


_running_update_donated = jax.jit(running_update.__wrapped__, donate_argnums=0)


def cast_like(mean: PyTree, reference: PyTree) -> PyTree:
  """Each leaf as a numpy array of the reference leaf's dtype (no copy when it already is)."""
  return jax.tree.map(lambda m, r: np.asarray(m).astype(np.dtype(r.dtype), copy=False), mean,
                      reference)


def host_update(mean: np.ndarray, x: np.ndarray, coef: np.float32, scratch: np.ndarray) -> None:
  """mean += coef * (x - mean) in place, float32, in cache-sized blocks.

  `scratch` is a float32 buffer of at least BLOCK values; x may be of any float dtype.
  """
  m, v = mean.reshape(-1), x.reshape(-1)
  for start in range(0, m.size, BLOCK):
    mb = m[start:start + BLOCK]
    d = scratch[:mb.size]
    np.subtract(v[start:start + BLOCK], mb, out=d, dtype=np.float32)
    np.multiply(d, coef, out=d)
    np.add(mb, d, out=mb)


def checked_weights(n: int, weights: Optional[Sequence[float]]) -> np.ndarray:
  w = np.ones(n, np.float64) if weights is None else np.asarray(weights, np.float64)
  if w.shape != (n,) or np.any(w < 0) or w.sum() <= 0:
    raise ValueError(f"Need {n} non-negative weights with a positive sum, got {weights}.")
  return w


def schedule(weights: np.ndarray) -> list[tuple[int, Optional[np.float32]]]:
  """(ingredient index, coef) in order; coef None for the first (the mean starts as a
  copy of it). Zero-weight ingredients do not change the mean and are skipped."""
  out, total = [], 0.0
  for i, w in enumerate(weights):
    if w > 0:
      total += w
      out.append((i, np.float32(w / total) if out else None))
  return out


def split_by_bytes(specs: dict, parts: int) -> list[list[str]]:
  """Leaf names split into `parts` groups of about equal bytes (largest first)."""
  groups: list[list[str]] = [[] for _ in range(parts)]
  loads = [0] * parts
  size = lambda n: int(np.prod(specs[n].shape)) * np.dtype(specs[n].dtype).itemsize
  for name in sorted(specs, key=size, reverse=True):
    k = loads.index(min(loads))
    groups[k].append(name)
    loads[k] += size(name)
  return [g for g in groups if g]


def default_threads() -> int:
  return max(1, min(4, os.cpu_count() or 1))


# --- Streamed averaging on the host ---------------------------------------------------


def stream_average(sources: Sequence[Source], weights: Optional[Sequence[float]] = None,
                   verify: bool = True, threads: Optional[int] = None) -> PyTree:
  """Weighted mean of N ingredients (params or checkpoint paths), float32, on the host.

  Weights are normalised. Every ingredient is checked against the first (keys,
  shapes, dtypes) before any array is read. Each of `threads` threads owns a share
  of the leaves and, for every ingredient in turn, reads its leaves into one reused
  buffer, checks their fingerprints and adds them to the running mean, while it asks
  the kernel to read its leaves of the next ingredient ahead. Peak memory: the mean
  (one model in float32) plus a leaf-sized buffer per thread, for any N.
  """
  if not sources:
    raise ValueError("Cannot average zero ingredients.")
  w = checked_weights(len(sources), weights)
  opened = open_sources(sources, verify)
  specs = opened[0].specs
  mean = memory.aligned_tree(specs, np.float32)
  steps = schedule(w)
  nbytes = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in specs.values())
  threads = default_threads() if threads is None else threads
  groups = split_by_bytes(specs, threads if nbytes >= THREADED_MIN_BYTES else 1)
  remaining = {i: len(groups) for i, _ in steps}  # Threads still to finish ingredient i.
  lock, stop = threading.Lock(), threading.Event()

  def work(names: list[str]) -> None:
    biggest = max(int(np.prod(specs[n].shape)) * np.dtype(specs[n].dtype).itemsize for n in names)
    buffer = memory.aligned_empty((biggest,), np.uint8)
    scratch = np.empty(BLOCK, np.float32)
    for k, (i, coef) in enumerate(steps):
      if stop.is_set():
        return
      if k + 1 < len(steps):
        opened[steps[k + 1][0]].prefetch(names)
      for name in names:
        x = opened[i].read(name, buffer)
        if coef is None:
          np.copyto(mean[name], x, casting="same_kind")
        else:
          host_update(mean[name], x, coef, scratch)
      with lock:
        remaining[i] -= 1
        if remaining[i] == 0:
          opened[i].release()  # A restored (non-direct) ingredient's arrays.

  if len(groups) == 1:
    work(groups[0])
  else:
    with concurrent.futures.ThreadPoolExecutor(len(groups)) as pool:
      futures = [pool.submit(work, g) for g in groups]
      try:
        for f in concurrent.futures.as_completed(futures):
          f.result()
      finally:
        stop.set()
  result = {n: np.asarray(mean[n]).astype(np.dtype(specs[n].dtype), copy=False) for n in specs}
  return as_tree(result, opened[0])


def weighted_average(trees_: Sequence[PyTree], weights: Optional[Sequence[float]] = None) -> PyTree:
  """In-memory weighted mean; the same arithmetic as stream_average."""
  return stream_average(list(trees_), weights)


# --- Device-sharded averaging ---------------------------------------------


def flat_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
  return NamedSharding(mesh, P(axis))


def padded_size(size: int, num_shards: int) -> int:
  return -(-size // num_shards) * num_shards


def shard_flat(tree: PyTree, mesh: Mesh, axis: str = "data") -> PyTree:
  """Each leaf flattened, zero-padded to a multiple of the axis size and split
  over it, so each device holds ceil(size / D) values of every parameter.

  Built with make_array_from_callback: in a multi-process run each process
  only transfers the slices its own devices hold.
  """
  sharding = flat_sharding(mesh, axis)
  d = mesh.shape[axis]

  def put(x):
    flat = np.asarray(x).reshape(-1)
    flat = np.pad(flat, (0, padded_size(flat.size, d) - flat.size))
    return jax.make_array_from_callback(flat.shape, sharding, lambda idx: flat[idx])

  return jax.tree.map(put, tree)


def unshard_flat(tree: PyTree, reference: PyTree) -> PyTree:
  """Gathers sharded flat leaves back into the reference shapes and dtypes."""
  from jax.experimental import multihost_utils
  if jax.process_count() > 1:
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(
      lambda x, r: np.asarray(x)[:int(np.prod(r.shape))].reshape(r.shape).astype(
          np.dtype(r.dtype)),
      tree, reference)


def sharded_average(sources: Sequence[Source], mesh: Mesh,
                    weights: Optional[Sequence[float]] = None, axis: str = "data",
                    verify: bool = True) -> PyTree:
  """The weighted mean with every parameter split over the mesh axis: each device
  reduces its own slice, holding 1/D of the running mean and of the ingredient.
  XLA's arithmetic (running_update)."""
  if not sources:
    raise ValueError("Cannot average zero ingredients.")
  w = checked_weights(len(sources), weights)
  opened = open_sources(sources, verify)
  mean = None
  for i, coef in schedule(w):
    flat = shard_flat(opened[i].tree(), mesh, axis)
    mean = to_float32(flat) if coef is None else _running_update_donated(mean, flat, coef)
    del flat
  reference = as_tree(dict(opened[0].specs), opened[0])
  return unshard_flat(mean, reference)
