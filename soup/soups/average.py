"""The one averager: the running weighted mean of ingredients, in a layout.

Every soup is built here: the uniform soup, each greedy candidate, WiSE-FT (the
mean of two, weights 1 - alpha and alpha) and Model Stock's mean. In float32,
    mean_k = mean_{k-1} + (w_k / W_k) * (x_k - mean_{k-1}),   W_k = w_1 + ... + w_k,
so memory stays flat in N and a soup of identical models is exactly that model
(x - mean = 0 at every step).

A `Layout` says where the running mean lives and what each process reads:
  host     the mean on the host (numpy; threads share the leaves), each leaf read whole;
  flat     every leaf flattened, zero-padded and split evenly over the mesh's devices:
           each device reduces its part, and each process reads only its devices'
           ranges of every leaf; the soup comes back replicated;
  sharded  the train state's layout, config.sharding_rules (FSDP): each process reads
           only its devices' shards (one chunk each, when the ingredient was saved from
           that layout) and the soup stays in that layout.
On devices the update is XLA's (one fused multiply-add, running_update); on the host
numpy's (subtract, multiply, add). The two agree to float32 rounding; each is
deterministic, so a rerun reproduces its soup bit for bit.

Ingredients are checkpoint paths (soup/checkpoints.py) or param pytrees (InMemory);
every one is checked against the first (keys, shapes, dtypes) before any array is
read. Reads go into buffers allocated once per soup and reused for every ingredient.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import threading
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from soup import checkpoints, memory, sharding as sharding_lib, trees
from soup.trees import check_compatible  # noqa: F401  (re-exported: soup.soups.check_compatible)

PyTree = Any
Source = Any  # A param pytree, the path of an ingredient checkpoint, or an opened one.
IngredientMismatchError = trees.TreeMismatchError

BLOCK = 1 << 16  # float32 values (256 KiB): x, mean and the scratch stay in cache per block.
THREADED_MIN_BYTES = 16 << 20  # Smaller models are read and averaged on the calling thread.


# --- Sources: trees and checkpoints behind one reading interface -----------------


class InMemory:
  """A param pytree with the reading interface of checkpoints.Ingredient."""

  def __init__(self, tree: PyTree, name: str):
    self.name = name
    self.leaves = trees.flatten_with_names(tree)
    self.treedef = jax.tree.structure(tree)
    self.specs = {n: checkpoints.LeafSpec(np.shape(x), getattr(x, "dtype", None)
                                          or np.asarray(x).dtype)
                  for n, x in self.leaves.items()}

  def __str__(self):
    return self.name

  def read(self, name: str, out: Optional[np.ndarray] = None) -> np.ndarray:
    del out  # Already in memory: no copy.
    return np.asarray(self.leaves[name])

  def read_box(self, name: str, box, out: Optional[np.ndarray] = None) -> np.ndarray:
    return _copy_into(np.asarray(self.leaves[name])[tuple(slice(a, b) for a, b in box)], out)

  def read_flat(self, name: str, start: int, stop: int, out: Optional[np.ndarray] = None):
    return _copy_into(np.asarray(self.leaves[name]).reshape(-1)[start:stop], out)

  def prefetch(self, names=None) -> None:
    pass

  def release(self) -> None:
    pass


def _copy_into(part: np.ndarray, out: Optional[np.ndarray]) -> np.ndarray:
  if out is None:
    return part
  out = out.reshape(-1).view(np.uint8)[:part.nbytes].view(part.dtype).reshape(part.shape)
  np.copyto(out, part)
  return out


def open_source(source: Source, verify: bool = True, index: int = 0):
  """A checkpoints.Ingredient for a path (metadata only, no array I/O), InMemory for a tree."""
  if isinstance(source, (checkpoints.Ingredient, InMemory)):
    return source
  if isinstance(source, (str, os.PathLike)):
    return checkpoints.open_ingredient(source, verify)
  return InMemory(source, f"ingredient #{index}")


def open_sources(sources: Sequence[Source], verify: bool = True) -> list:
  """Opens every source and checks each against the first (keys, shapes, dtypes)."""
  if not sources:
    raise ValueError("Cannot average zero ingredients.")
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


def _nbytes(spec) -> int:
  return math.prod(spec.shape) * np.dtype(spec.dtype).itemsize


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


# --- Layouts --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the running mean lives; see the module docstring."""

  kind: str                                  # "host", "flat" or "sharded"
  mesh: Optional[Mesh] = None
  rules: sharding_lib.Rules = ()
  axis: str = "data"

  def __post_init__(self):
    if self.kind not in ("host", "flat", "sharded"):
      raise ValueError(f"Layout kind must be host, flat or sharded, got {self.kind!r}.")
    if self.kind != "host" and self.mesh is None:
      raise ValueError(f"A {self.kind} layout needs a mesh.")

  @classmethod
  def host(cls) -> "Layout":
    return cls("host")

  @classmethod
  def flat(cls, mesh: Mesh, axis: str = "data") -> "Layout":
    return cls("flat", mesh, (), axis)

  @classmethod
  def sharded(cls, mesh: Mesh, rules: sharding_lib.Rules) -> "Layout":
    return cls("sharded", mesh, tuple(tuple(r) for r in rules))

  @classmethod
  def of_run(cls, mesh: Mesh, rules: sharding_lib.Rules = ()) -> "Layout":
    """The experiment's: the train state's shardings if the config has rules, else the
    host (on this machine's CPUs the fastest: docs/benchmarks.md)."""
    return cls.sharded(mesh, rules) if rules else cls.host()

  def output_shardings(self, specs: dict) -> dict[str, NamedSharding]:
    """Per leaf, where a soup (or a restored ingredient) is evaluated: the rules' sharding,
    or replicated."""
    if self.kind == "sharded":
      shapes = {n: jax.ShapeDtypeStruct(s.shape, s.dtype) for n, s in specs.items()}
      return dict(zip(specs, jax.tree.leaves(sharding_lib.shardings(
          trees.unflatten(shapes), self.mesh, self.rules))))
    mesh = self.mesh or _cpu_mesh()
    return dict.fromkeys(specs, NamedSharding(mesh, P()))


def _cpu_mesh() -> Mesh:
  return jax.make_mesh((1,), ("data",), devices=jax.devices("cpu")[:1],
                       axis_types=(jax.sharding.AxisType.Auto,))


class _Placement:
  """One leaf on the devices: the home array's shape and sharding, and the distinct
  parts of the leaf that this process's devices hold (a flat range or an N-d box)."""

  def __init__(self, name: str, spec, layout: Layout, out_sharding: NamedSharding):
    self.name, self.spec = name, spec
    size = math.prod(spec.shape)
    if layout.kind == "flat":
      d = layout.mesh.shape[layout.axis]
      self.shape = (-(-size // d) * d,)
      self.sharding = NamedSharding(layout.mesh, P(layout.axis))
    else:
      self.shape, self.sharding = tuple(spec.shape), out_sharding
    self.flat = layout.kind == "flat"
    index_map = self.sharding.addressable_devices_indices_map(self.shape)
    self.devices = list(index_map)
    self.parts = {}  # Part -> devices holding it (replicas share one read).
    for device, index in index_map.items():
      box = tuple(s.indices(n)[:2] for s, n in zip(index, self.shape))
      self.parts.setdefault(box, []).append(device)

  def buffers(self) -> dict:
    """Host buffers, one per part. A flat leaf's parts are views of one contiguous buffer
    (its padding zeroed), which can then hold the leaf-shaped soup without new pages."""
    if not self.flat:
      return {box: memory.aligned_empty(tuple(b - a for a, b in box), self.spec.dtype)
              for box in self.parts}
    whole = memory.aligned_empty(self.shape, self.spec.dtype)
    whole[math.prod(self.spec.shape):] = 0
    out = {box: whole[box[0][0]:box[0][1]] for box in self.parts}
    out[None] = whole
    return out

  def read(self, source, buffers: dict) -> None:
    if not self.flat:
      for box, buf in buffers.items():
        source.read_box(self.name, box, buf)
      return
    # Adjacent parts (this process's devices) are one range of the leaf: one aligned read.
    size, whole = math.prod(self.spec.shape), buffers[None]
    for a, b in _merged(sorted(box[0] for box in self.parts)):
      if min(b, size) > a:
        source.read_flat(self.name, a, min(b, size), whole[a:min(b, size)])

  def device_buffers(self, buffers: dict) -> tuple[list, list]:
    """(host buffers, devices) to transfer, in the order of self.devices."""
    by_device = {d: buffers[box] for box in self.parts for d in self.parts[box]}
    return [by_device[d] for d in self.devices], self.devices

  def assemble(self, arrays: list) -> jax.Array:
    return jax.make_array_from_single_device_arrays(self.shape, self.sharding, arrays)


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
  out: list[tuple[int, int]] = []
  for a, b in ranges:
    if out and out[-1][1] == a:
      out[-1] = (out[-1][0], b)
    else:
      out.append((a, b))
  return out


GROUP_BYTES = 16 << 20  # Leaves are read and added in groups of about this many bytes.


class Reader:
  """Reads ingredients into a device layout: each process only its devices' parts, into
  host buffers made once and reused for every ingredient."""

  def __init__(self, specs: dict, layout: Layout, threads: Optional[int] = None):
    self.layout = layout
    self.out_shardings = layout.output_shardings(specs)
    self.placements = {n: _Placement(n, s, layout, self.out_shardings[n])
                       for n, s in specs.items()}
    self.groups = _groups(specs)
    self._buffers: Optional[dict] = None
    nbytes = sum(_nbytes(s) for s in specs.values())
    # Reads release the GIL: a second thread keeps the other core busy while one checksums.
    self.threads = (threads or default_threads()) if nbytes >= THREADED_MIN_BYTES else 1

  def read(self, source, reuse: bool = True, names: Optional[Sequence[str]] = None
           ) -> dict[str, jax.Array]:
    """{name: home array} of one ingredient (of `names`, default all). With `reuse`, the
    arrays may alias this reader's buffers: use them before the next read, then drop them."""
    names = list(self.placements) if names is None else names
    buffers = self.buffers() if reuse else {n: self.placements[n].buffers() for n in names}
    for n in names:
      self.placements[n].read(source, buffers[n])
    hosts, devices, counts = [], [], []
    for n in names:
      h, d = self.placements[n].device_buffers(buffers[n])
      hosts += h
      devices += d
      counts.append(len(h))
    arrays = iter(jax.device_put(hosts, devices))  # One transfer call for the whole group.
    return {n: self.placements[n].assemble([next(arrays) for _ in range(c)])
            for n, c in zip(names, counts)}

  def buffers(self) -> dict:
    """The reused host buffers, made on first use."""
    if self._buffers is None:
      self._buffers = {n: p.buffers() for n, p in self.placements.items()}
    return self._buffers

  def release_buffers(self) -> None:
    self._buffers = None

  def output(self, home: dict, specs: dict, into_buffers: bool = False) -> dict:
    """Home arrays as params in the ingredients' dtype: in the rules' shardings for the
    sharded layout; as host arrays (on every process) for the flat one. `into_buffers`
    (a last output: the reader is done) writes float32 leaves into the read buffers."""
    if self.layout.kind == "sharded":
      return _cast(home, {n: s.dtype for n, s in specs.items()})
    if into_buffers and self._buffers is not None and jax.process_count() == 1:
      out = {}
      for n, s in specs.items():
        whole = self._buffers[n][None]
        if whole.dtype != np.float32:
          break
        for shard in home[n].addressable_shards:
          np.copyto(whole[shard.index], np.asarray(shard.data))
        out[n] = whole[:math.prod(s.shape)].reshape(s.shape)
      else:
        self._buffers = None
        return out
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      flat = multihost_utils.process_allgather(home, tiled=True)
    else:
      flat = jax.device_get(home)
    return {n: np.asarray(flat[n])[:math.prod(s.shape)].reshape(s.shape).astype(
        np.dtype(s.dtype), copy=False) for n, s in specs.items()}


def _groups(specs: dict) -> list[list[str]]:
  """Leaf names in order, cut into groups of about GROUP_BYTES."""
  groups, size = [[]], 0
  for name, spec in specs.items():
    if groups[-1] and size + _nbytes(spec) > GROUP_BYTES:
      groups.append([])
      size = 0
    groups[-1].append(name)
    size += _nbytes(spec)
  return groups


def _cast(home: dict, dtypes: dict) -> dict:
  return {n: x if x.dtype == dtypes[n] else x.astype(dtypes[n]) for n, x in home.items()}


def default_threads() -> int:
  return max(1, min(4, os.cpu_count() or 1))


# --- The running mean -------------------------------------------------------------------


class HostReader:
  """Reads whole leaves into host buffers made once and reused (the host layout)."""

  def __init__(self, specs: dict, threads: Optional[int] = None):
    self.specs = specs
    nbytes = sum(_nbytes(s) for s in specs.values())
    self.threads = (threads or default_threads()) if nbytes >= THREADED_MIN_BYTES else 1
    self.groups = _groups(specs)
    self.thread_groups = split_by_bytes(specs, self.threads)  # One per thread.
    self._buffers: Optional[dict] = None

  def buffers(self) -> dict:
    if self._buffers is None:
      self._buffers = memory.aligned_tree(self.specs)
    return self._buffers

  def release_buffers(self) -> None:
    self._buffers = None

  def read(self, source, reuse: bool = True, names: Optional[Sequence[str]] = None) -> dict:
    names = list(self.specs) if names is None else names
    buffers = self.buffers() if reuse else memory.aligned_tree(
        {n: self.specs[n] for n in names})
    return {n: source.read(n, buffers[n]) for n in names}

  def output(self, home: dict, specs: dict, into_buffers: bool = False) -> dict:
    del into_buffers  # The host mean is already host memory.
    return {n: np.asarray(home[n]).astype(np.dtype(s.dtype), copy=False)
            for n, s in specs.items()}


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
    self.on_host = layout.kind == "host"
    self.reader = HostReader(specs, threads) if self.on_host else Reader(specs, layout, threads)
    self._pool = concurrent.futures.ThreadPoolExecutor(self.reader.threads)
    self.mean: Optional[dict] = None
    self._spare: Optional[dict] = None  # The host layout's candidate buffers, reused.
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
    if not isinstance(source, dict):
      source.release()
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

    def work(names):
      scratch = np.empty(BLOCK, np.float32)
      buffer = None if home else memory.aligned_empty(
          (max(_nbytes(self.specs[n]) for n in names),), np.uint8)  # One leaf at a time.
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

    for f in [self._pool.submit(work, g) for g in self.reader.thread_groups]:
      f.result()
    if not home:
      source.release()
    return target

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

  Returns params in the ingredients' dtype: numpy arrays for the host layout, replicated
  jax.Arrays for the flat one, arrays in the rules' shardings for the sharded one.
  """
  layout = layout or Layout.host()
  w = checked_weights(len(sources), weights)
  opened = open_sources(sources, verify)
  if layout.kind == "host":
    return _host_average(opened, w, threads)
  mean = RunningMean(layout, opened[0].specs, threads)
  steps = schedule(w)
  for k, (i, _) in enumerate(steps):
    if k + 1 < len(steps):
      opened[steps[k + 1][0]].prefetch()  # The kernel reads the next while this one adds.
    mean.add(opened[i], w[i])
  # The soup lands in the read buffers: no new pages at the peak.
  return as_tree(mean.reader.output(mean.mean, mean.specs, into_buffers=True), opened[0])


def _host_average(opened: list, w: np.ndarray, threads: Optional[int]) -> PyTree:
  """The host layout: each of `threads` threads owns a share of the leaves and, for every
  ingredient in turn, reads its leaves into one reused buffer and adds them to the mean,
  while it asks the kernel to read its leaves of the next ingredient ahead. Peak memory:
  the mean (one model in float32) plus a leaf-sized buffer per thread, for any N."""
  specs = opened[0].specs
  mean = memory.aligned_tree(specs, np.float32)
  steps = schedule(w)
  nbytes = sum(_nbytes(s) for s in specs.values())
  threads = default_threads() if threads is None else threads
  groups = split_by_bytes(specs, threads if nbytes >= THREADED_MIN_BYTES else 1)
  remaining = {i: len(groups) for i, _ in steps}  # Threads still to finish ingredient i.
  lock, stop = threading.Lock(), threading.Event()

  def work(names: list[str]) -> None:
    buffer = memory.aligned_empty((max(_nbytes(specs[n]) for n in names),), np.uint8)
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
          opened[i].release()  # A restored (other-layout) ingredient's arrays.

  _run_threads(work, groups, stop)
  result = {n: np.asarray(mean[n]).astype(np.dtype(specs[n].dtype), copy=False) for n in specs}
  return as_tree(result, opened[0])


def _run_threads(work: Callable[[list[str]], None], groups: list[list[str]],
                 stop: threading.Event) -> None:
  if len(groups) == 1:
    work(groups[0])
    return
  with concurrent.futures.ThreadPoolExecutor(len(groups)) as pool:
    futures = [pool.submit(work, g) for g in groups]
    try:
      for f in concurrent.futures.as_completed(futures):
        f.result()
    finally:
      stop.set()


def split_by_bytes(specs: dict, parts: int) -> list[list[str]]:
  """Leaf names split into `parts` groups of about equal bytes (largest first)."""
  groups: list[list[str]] = [[] for _ in range(parts)]
  loads = [0] * parts
  for name in sorted(specs, key=lambda n: _nbytes(specs[n]), reverse=True):
    k = loads.index(min(loads))
    groups[k].append(name)
    loads[k] += _nbytes(specs[name])
  return [g for g in groups if g]


def restore(source: Source, layout: Layout, verify: bool = True) -> PyTree:
  """One ingredient as `layout` evaluates it: in the rules' shardings for a sharded layout
  (each process reads only what its devices hold), else host (numpy) arrays."""
  opened = open_source(source, verify)
  if layout.kind != "sharded":  # Evaluated replicated: every process reads it whole.
    return as_tree({n: np.array(opened.read(n)) for n in opened.specs}, opened)
  home = Reader(opened.specs, layout).read(opened, reuse=False)
  opened.release()
  return as_tree(home, opened)
