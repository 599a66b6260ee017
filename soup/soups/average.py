"""The one averager: the running weighted mean of ingredients, in a layout.

Every soup is built here: the uniform soup, each greedy candidate, WiSE-FT (the
mean of two, weights 1 - alpha and alpha) and Model Stock's mean. In float32,
    mean_k = mean_{k-1} + (w_k / W_k) * (x_k - mean_{k-1}),   W_k = w_1 + ... + w_k,
so memory stays flat in N and a soup of identical models is exactly that model
(x - mean = 0 at every step).

Where the mean lives and what each process reads is the `Layout`
(soup/soups/layouts.py: host, flat-sharded over the mesh, or the train state's
shardings); ingredients are checkpoint paths or param trees (soup/soups/sources.py),
every one checked against the first (keys, shapes, dtypes) before any array is read.
On devices the update is XLA's (one fused multiply-add, running_update); on the host
numpy's (subtract, multiply, add). The two agree to float32 rounding; each is
deterministic, so a rerun reproduces its soup bit for bit.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from soup import memory, trees
from soup.soups.layouts import (  # noqa: F401  (Layout re-exported: soup.soups.Layout)
  HostReader,
  Layout,
  Reader,
  default_threads,
  split_by_bytes,
)
from soup.soups.sources import (  # noqa: F401  (re-exported for the recipes' modules)
  InMemory,
  Source,
  as_tree,
  nbytes as _nbytes,
  open_source,
  open_sources,
)
from soup.trees import check_compatible  # noqa: F401  (re-exported: soup.soups.check_compatible)

PyTree = Any
IngredientMismatchError = trees.TreeMismatchError

BLOCK = 1 << 16  # float32 values (256 KiB): x, mean and the scratch stay in cache per block.


# --- The arithmetic -------------------------------------------------------------------


@jax.jit
def running_update(mean: PyTree, x: PyTree, coef) -> PyTree:
  """XLA's mean + coef * (x - mean), in float32 (x of any float dtype)."""
  return jax.tree.map(lambda m, v: m + coef * (v.astype(jnp.float32) - m), mean, x)


_update_donated = jax.jit(running_update.__wrapped__, donate_argnums=0)


@jax.jit
def _first(x: PyTree) -> PyTree:
  # Times one: a new float32 buffer, never the input's (which may alias a reused host buffer).
  return jax.tree.map(lambda v: v.astype(jnp.float32) * 1.0, x)


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


def check_finite(params: PyTree, name: str) -> None:
  """Raises FloatingPointError if any leaf holds NaN or inf (a diverged run). Sharded
  leaves are checked on their devices, and every process gets the same answer."""
  flat = trees.flatten_with_names(params)
  finite = _all_finite({n: v for n, v in flat.items() if isinstance(v, jax.Array)})
  bad = [n for n, ok in finite.items() if not bool(ok)]
  bad += [n for n, v in flat.items() if not isinstance(v, jax.Array)
          and not np.all(np.isfinite(np.asarray(v, np.float32)))]
  if bad:
    raise FloatingPointError(f"{name} has non-finite values in {sorted(bad)[:5]} (a diverged "
                             "run).")


@jax.jit
def _all_finite(tree):
  return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree)


class RunningMean:
  """The running weighted mean of ingredients in a layout, grown one ingredient at a time.

  `add` commits an ingredient; `candidate` computes the mean with one more without
  committing (the greedy soup's try), `accept` commits a candidate; `output` gives the
  current mean as params. An ingredient given as a source is read group by group of
  leaves by reader threads: on devices XLA adds one group while the next is read; on
  the host each thread adds the leaves it read (numpy, as host_update).
  """

  def __init__(self, layout: Layout, specs: dict, threads: Optional[int] = None):
    self.layout, self.specs = layout, specs
    self.on_host = layout.is_host
    self.reader = HostReader(specs, threads) if self.on_host else Reader(specs, layout, threads)
    self._pool = concurrent.futures.ThreadPoolExecutor(self.reader.threads)
    self.mean: Optional[dict] = None
    self._spare: Optional[dict] = None  # The host layout's candidate buffers, reused.
    self._leaf_buffers: dict[int, np.ndarray] = {}  # The host layout's, one per thread.
    self.total = 0.0

  def _is_home(self, source) -> bool:
    if not isinstance(source, dict) or source.keys() != self.specs.keys():
      return False
    if self.on_host:
      return all(isinstance(v, (np.ndarray, jax.Array)) and v.shape == self.specs[n].shape
                 for n, v in source.items())
    placements = self.reader.placements
    return all(isinstance(v, jax.Array) and v.shape == placements[n].shape
               and v.sharding == placements[n].sharding for n, v in source.items())

  def _combine(self, source, coef: Optional[np.float32], commit: bool) -> dict:
    """mean + coef (x - mean) (the first ingredient: a float32 copy of x), group by group;
    committed into self.mean or returned as a candidate."""
    if self.on_host:
      return self._combine_host(source, coef, commit)
    if self._is_home(source):
      parts = [(list(source), source)]
    else:  # The reader threads read ahead, group by group, while XLA adds the groups read.
      source = open_source(source)
      jax.block_until_ready(self.mean)  # The buffers' last use (the previous add) is done.
      self.reader.buffers()
      parts = [(g, self._pool.submit(self.reader.read, source, True, g))
               for g in self.reader.groups]
    out = {}
    for names, x in parts:
      if isinstance(x, concurrent.futures.Future):
        x = x.result()
      if coef is None:
        new = _first(x)
      else:
        mean = {n: self.mean[n] for n in names}
        new = (_update_donated if commit else running_update)(mean, x, coef)
      out.update(new)
      if commit:
        self.mean = {**(self.mean or {}), **new}
      del x
    jax.block_until_ready(out)  # Before anyone overwrites the reader's buffers.
    return out

  def _combine_host(self, source, coef: Optional[np.float32], commit: bool) -> dict:
    home = self._is_home(source)
    if not home:
      source = open_source(source)
    if self.mean is None:
      self.mean = memory.aligned_tree(self.specs, np.float32)
    if commit:
      target = self.mean
    else:
      self._spare = self._spare or memory.aligned_tree(self.specs, np.float32)
      target = self._spare

    def work(k, names):
      scratch = np.empty(BLOCK, np.float32)
      buffer = None if home else self._leaf_buffer(k, names)
      for n in names:
        x = np.asarray(source[n]) if home else source.read(n, buffer)
        if coef is None:
          np.copyto(target[n], x, casting="same_kind")
        elif commit:
          host_update(target[n], x, coef, scratch)
        else:  # The same rounding as host_update, into the candidate's buffer.
          np.subtract(x, self.mean[n], out=target[n], dtype=np.float32)
          np.multiply(target[n], coef, out=target[n])
          np.add(self.mean[n], target[n], out=target[n])

    for f in [self._pool.submit(work, k, g) for k, g in enumerate(self.reader.thread_groups)]:
      f.result()
    return target

  def _leaf_buffer(self, k: int, names: list[str]) -> np.ndarray:
    """Thread k's reused buffer, room for its largest leaf (it reads one leaf at a time)."""
    if k not in self._leaf_buffers:
      self._leaf_buffers[k] = memory.aligned_empty(
          (max(_nbytes(self.specs[n]) for n in names),), np.uint8)
    return self._leaf_buffers[k]

  def add_part(self, part: dict, coef: Optional[np.float32]) -> None:
    """Adds some leaves of one ingredient, read by the caller (coef None: the first
    ingredient). A caller that adds every leaf this way keeps the weights itself."""
    if not self.on_host:
      new = (_first(part) if coef is None else
             _update_donated({n: self.mean[n] for n in part}, part, coef))
      self.mean = {**(self.mean or {}), **new}
      jax.block_until_ready(new)
      return
    if self.mean is None:
      self.mean = memory.aligned_tree(self.specs, np.float32)
    scratch = np.empty(BLOCK, np.float32)
    for n, x in part.items():
      if coef is None:
        np.copyto(self.mean[n], np.asarray(x), casting="same_kind")
      else:
        host_update(self.mean[n], np.asarray(x), coef, scratch)

  def add(self, source, weight: float = 1.0) -> None:
    if weight <= 0:
      return
    self.total += weight
    first = self.mean is None
    self._combine(source, None if first else np.float32(weight / self.total), commit=True)

  def candidate(self, source, weight: float = 1.0) -> dict:
    return self._combine(source, np.float32(weight / (self.total + weight)), commit=False)

  def accept(self, candidate: dict, weight: float = 1.0) -> None:
    if self.on_host and candidate is self._spare:  # Swap: the old mean is the next spare.
      self._spare = self.mean
    self.mean, self.total = candidate, self.total + weight

  def output(self, home: Optional[dict] = None) -> dict:
    """The mean (or a candidate) as params in the ingredients' dtype: in the rules'
    shardings for a sharded layout, else host (numpy) arrays."""
    out = self.reader.output(self.mean if home is None else home, self.specs)
    if self.on_host and home is None:  # A copy: the running mean changes with the next add.
      out = {n: np.array(x) for n, x in out.items()}
    return out


def weighted_average(sources: Sequence[Source], weights: Optional[Sequence[float]] = None,
                     layout: Optional[Layout] = None, *, verify: bool = True,
                     threads: Optional[int] = None) -> PyTree:
  """The weighted mean of N ingredients (params or checkpoint paths), float32, in `layout`
  (host by default). Weights are normalised; zero weights are skipped.

  Returns params in the ingredients' dtype: arrays in the rules' shardings for a sharded
  layout, else host (numpy) arrays. Peak memory on the host layout: the mean (one model in
  float32) plus a leaf-sized buffer per thread, for any N.
  """
  w = checked_weights(len(sources), weights)
  opened = open_sources(sources, verify)
  mean = RunningMean(layout or Layout.host(), opened[0].specs, threads)
  steps = schedule(w)
  for k, (i, _) in enumerate(steps):
    if k + 1 < len(steps):
      opened[steps[k + 1][0]].prefetch()  # The kernel reads the next while this one adds.
    mean.add(opened[i], w[i])
  # The mean itself (host), or the soup landed in the read buffers (devices): no copy.
  return as_tree(mean.reader.output(mean.mean, mean.specs, into_buffers=True), opened[0])


def restore(source: Source, layout: Layout, verify: bool = True) -> PyTree:
  """One ingredient as `layout` evaluates it: in the rules' shardings for a sharded layout
  (each process reads only what its devices hold), else host (numpy) arrays."""
  opened = open_source(source, verify)
  if not layout.is_sharded:  # Evaluated replicated: every process reads it whole.
    return as_tree({n: np.array(opened.read(n)) for n in opened.specs}, opened)
  home = Reader(opened.specs, layout).read(opened, reuse=False)
  return as_tree(home, opened)
