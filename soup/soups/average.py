"""Weight averaging: in memory, streamed from checkpoints, or device-sharded.

All three share one float32 update, the running weighted mean
    mean_k = mean_{k-1} + (w_k / W_k) * (x_k - mean_{k-1}),   W_k = w_1 + ... + w_k,
so they agree to the bit on one machine, memory stays flat in N (one
ingredient plus the running mean), and a soup of identical models is exactly
that model (x - mean = 0 at every step).
"""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from soup import checkpoints

PyTree = Any
Source = Any  # A param pytree, or the path of an ingredient checkpoint.


class IngredientMismatchError(ValueError):
  """Two ingredients differ in tree structure, shape or dtype."""


def load(source: Source, verify: bool = True) -> PyTree:
  if isinstance(source, (str, os.PathLike)):
    return checkpoints.load_ingredient(source, verify=verify)
  return source


def _name(source: Source, index: int) -> str:
  return str(source) if isinstance(source, (str, os.PathLike)) else f"ingredient #{index}"


def check_compatible(reference: PyTree, other: PyTree, reference_name: str = "reference",
                     other_name: str = "other") -> None:
  """Raises IngredientMismatchError naming the first differing key path."""
  ref = checkpoints.flatten_with_names(reference)
  oth = checkpoints.flatten_with_names(other)
  missing, extra = sorted(ref.keys() - oth.keys()), sorted(oth.keys() - ref.keys())
  if missing or extra:
    raise IngredientMismatchError(
        f"{other_name} has another tree structure than {reference_name}: "
        f"missing {missing[:5]}, unexpected {extra[:5]}. Ingredients must be fine-tunes of "
        "the same architecture.")
  for key, a in ref.items():
    b = oth[key]
    if tuple(a.shape) != tuple(b.shape):
      raise IngredientMismatchError(
          f"{key}: shape {tuple(b.shape)} in {other_name} but {tuple(a.shape)} in "
          f"{reference_name}.")
    if np.dtype(a.dtype) != np.dtype(b.dtype):
      raise IngredientMismatchError(f"{key}: dtype {b.dtype} in {other_name} but {a.dtype} "
                                    f"in {reference_name}.")


def check_finite(params: PyTree, name: str) -> None:
  bad = [k for k, v in checkpoints.flatten_with_names(params).items()
         if not np.all(np.isfinite(np.asarray(v, np.float32)))]
  if bad:
    raise FloatingPointError(f"{name} has non-finite values in {bad[:5]} (a diverged run).")


@jax.jit
def _to_float32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


@jax.jit
def _running_update(mean, x, coef):
  return jax.tree.map(lambda m, v: m + coef * (v.astype(jnp.float32) - m), mean, x)


_running_update_donated = jax.jit(_running_update.__wrapped__, donate_argnums=0)


def _cast_like(mean: PyTree, reference: PyTree) -> PyTree:
  return jax.tree.map(lambda m, r: np.asarray(m).astype(np.dtype(r.dtype)), mean, reference)


def _weights(n: int, weights: Optional[Sequence[float]]) -> np.ndarray:
  w = np.ones(n, np.float64) if weights is None else np.asarray(weights, np.float64)
  if w.shape != (n,) or np.any(w < 0) or w.sum() <= 0:
    raise ValueError(f"Need {n} non-negative weights with a positive sum, got {weights}.")
  return w


def _host_start(params: PyTree) -> PyTree:
  return jax.tree.map(lambda x: np.array(x, np.float32), params)


def _host_update(mean: PyTree, params: PyTree, coef: np.float32, owned: bool) -> PyTree:
  """mean += coef * (x - mean) in place: no temporaries beyond x itself.

  `owned` ingredients (restored from disk here) are used as scratch space;
  a caller's arrays are copied first.
  """
  def update(m, x):
    x = np.asarray(x)
    scratch = x.astype(np.float32, copy=not (owned and x.flags.writeable))
    np.subtract(scratch, m, out=scratch)
    scratch *= coef
    m += scratch
    return m
  return jax.tree.map(update, mean, params)


def _prefetched(sources: Sequence[Source], verify: bool, prefetch: bool):
  """Yields (source, params); with prefetch, restores the next ingredient in a
  thread while the caller adds the current one (Orbax/tensorstore release the
  GIL), at the cost of holding one more ingredient.
  """
  if not prefetch:
    for source in sources:
      yield source, load(source, verify)
    return
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    future = pool.submit(load, sources[0], verify)
    for i, source in enumerate(sources):
      params = future.result()
      if i + 1 < len(sources):
        future = pool.submit(load, sources[i + 1], verify)
      yield source, params
      del params


def _running_mean(sources: Sequence[Source], weights: Optional[Sequence[float]], verify: bool,
                  start: Callable[[PyTree], PyTree], update: Callable[..., PyTree],
                  finish: Callable[[PyTree, PyTree], PyTree],
                  on_loaded: Optional[Callable[[int], None]] = None,
                  prefetch: bool = False) -> PyTree:
  """The one averaging loop: load, check, then start or update the running mean."""
  if not sources:
    raise ValueError("Cannot average zero ingredients.")
  w = _weights(len(sources), weights)
  reference = mean = None
  total = 0.0
  for i, (source, params) in enumerate(_prefetched(sources, verify, prefetch)):
    if reference is None:
      reference = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
      mean = start(params)
      if w[0] == 0:
        mean = jax.tree.map(lambda m: m * 0, mean)  # Leading zero weight: start empty.
    else:
      check_compatible(reference, params, _name(sources[0], 0), _name(source, i))
    total += w[i]
    if i > 0 and w[i] > 0:
      mean = update(mean, params, np.float32(w[i] / total),
                    owned=isinstance(source, (str, os.PathLike)))
    del params
    if on_loaded:
      on_loaded(i)
  return finish(mean, reference)


def stream_average(sources: Sequence[Source], weights: Optional[Sequence[float]] = None,
                   verify: bool = True, on_loaded: Optional[Callable[[int], None]] = None,
                   prefetch: bool = True) -> PyTree:
  """Weighted mean of N ingredients holding one of them at a time (float32).

  Weights are normalised. Each ingredient is checked against the first for
  structure, shapes and dtypes before it is added. On the host, in place:
  peak memory is the running mean plus one ingredient (two with prefetch,
  which overlaps reading the next checkpoint with adding the current one).
  """
  return _running_mean(sources, weights, verify, _host_start, _host_update, _cast_like, on_loaded,
                       prefetch)


def weighted_average(trees: Sequence[PyTree], weights: Optional[Sequence[float]] = None) -> PyTree:
  """In-memory weighted mean; the same arithmetic as stream_average."""
  return stream_average(list(trees), weights)


def mean(trees: Sequence[Source]) -> PyTree:
  """Uniform soup."""
  return stream_average(list(trees))


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
      lambda x, r: np.asarray(x)[: int(np.prod(r.shape))].reshape(r.shape).astype(np.dtype(r.dtype)),
      tree, reference)


def sharded_average(sources: Sequence[Source], mesh: Mesh, weights: Optional[Sequence[float]] = None,
                    axis: str = "data", verify: bool = True) -> PyTree:
  """stream_average with every parameter split over the mesh axis: each device
  reduces its own slice, holding 1/D of the running mean and of the ingredient.
  """
  def start(params):
    return _to_float32(shard_flat(params, mesh, axis))

  def update(mean, params, coef, owned):
    return _running_update_donated(mean, shard_flat(params, mesh, axis), coef)

  return _running_mean(sources, weights, verify, start, update, unshard_flat)
