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
    """The experiment's: the train state's shardings if the config has rules, else flat."""
    return cls.sharded(mesh, rules) if rules else cls.flat(mesh)

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
    """Host buffers, one per part, zero-filled so a flat leaf's padding stays zero."""
    out = {}
    for box in self.parts:
      buf = memory.aligned_empty(tuple(b - a for a, b in box), self.spec.dtype)
      buf.fill(0)
      out[box] = buf
    return out

  def read(self, source, buffers: dict) -> None:
    for box, buf in buffers.items():
      if self.flat:
        (a, b), = box
        stop = min(b, math.prod(self.spec.shape))
        if stop > a:
          source.read_flat(self.name, a, stop, buf[:stop - a])
      else:
        source.read_box(self.name, box, buf)

  def put(self, buffers: dict) -> jax.Array:
    arrays = [jax.device_put(buf, device) for box, buf in buffers.items()
              for device in self.parts[box]]
    order = [device for box in buffers for device in self.parts[box]]
    arrays = [arrays[order.index(d)] for d in self.devices]
    return jax.make_array_from_single_device_arrays(self.shape, self.sharding, arrays)


class Reader:
  """Reads ingredients into a device layout: each process only its devices' parts, into
  host buffers made once and reused for every ingredient (threads share the leaves)."""

  def __init__(self, specs: dict, layout: Layout, threads: Optional[int] = None):
    self.layout = layout
    self.out_shardings = layout.output_shardings(specs)
    self.placements = {n: _Placement(n, s, layout, self.out_shardings[n])
                       for n, s in specs.items()}
    self._buffers: Optional[dict] = None
    nbytes = sum(_nbytes(s) for s in specs.values())
    self.threads = (threads or default_threads()) if nbytes >= THREADED_MIN_BYTES else 1

  def read(self, source, reuse: bool = True) -> dict[str, jax.Array]:
    """{name: home array} of one ingredient. With `reuse`, the arrays may alias this
    reader's buffers: use them before the next read, then drop them."""
    if reuse and self._buffers is None:
      self._buffers = {n: p.buffers() for n, p in self.placements.items()}
    buffers = self._buffers if reuse else {n: p.buffers() for n, p in self.placements.items()}
    names = list(self.placements)
    if self.threads > 1:
      with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
        list(pool.map(lambda n: self.placements[n].read(source, buffers[n]), names))
    else:
      for n in names:
        self.placements[n].read(source, buffers[n])
    source.release()
    return {n: self.placements[n].put(buffers[n]) for n in names}

  def output(self, home: dict, specs: dict) -> dict:
    """Home arrays in the evaluation layout and the ingredients' dtype."""
    if self.layout.kind == "sharded":
      return _cast(home, {n: s.dtype for n, s in specs.items()})
    shapes = {n: tuple(s.shape) for n, s in specs.items()}
    dtypes = {n: np.dtype(s.dtype) for n, s in specs.items()}
    return _unflat(home, shapes, dtypes, self.out_shardings)


def _cast(home: dict, dtypes: dict) -> dict:
  return {n: x if x.dtype == dtypes[n] else x.astype(dtypes[n]) for n, x in home.items()}


def _unflat(home: dict, shapes: dict, dtypes: dict, shardings: dict) -> dict:
  key = (tuple(sorted(shapes.items())), tuple(sorted((n, str(d)) for n, d in dtypes.items())))
  fn = _UNFLAT.get(key)
  if fn is None:
    fn = jax.jit(lambda h: {n: h[n][:math.prod(shapes[n])].reshape(shapes[n]).astype(dtypes[n])
                            for n in h}, out_shardings=shardings)
    _UNFLAT[key] = fn
  return fn(home)


_UNFLAT: dict = {}


def default_threads() -> int:
  return max(1, min(4, os.cpu_count() or 1))


# --- The running mean -------------------------------------------------------------------


class RunningMean:
  """The running weighted mean of ingredients in a layout, grown one ingredient at a time.

  `add` commits an ingredient; `candidate` computes the mean with one more without
  committing (the greedy soup's try), `accept` commits a candidate; `output` gives the
  current mean as params in the evaluation layout.
  """

  def __init__(self, layout: Layout, specs: dict, threads: Optional[int] = None):
    self.on_host = layout.kind == "host"
    if self.on_host:
      layout = Layout.flat(_cpu_mesh())  # Device kernels on the host's own CPU device.
    self.layout, self.specs = layout, specs
    self.reader = Reader(specs, layout, threads)
    self.mean: Optional[dict] = None
    self.total = 0.0

  def _read(self, source):
    """An ingredient's home arrays: read from a source, or given already read."""
    placements = self.reader.placements
    if (isinstance(source, dict) and source.keys() == placements.keys()
        and all(isinstance(v, jax.Array) and v.shape == placements[n].shape
                and v.sharding == placements[n].sharding for n, v in source.items())):
      return source
    return self.reader.read(open_source(source))

  def add(self, source, weight: float = 1.0) -> None:
    if weight <= 0:
      return
    x = self._read(source)
    self.total += weight
    if self.mean is None:
      self.mean = _first(x)
    else:
      self.mean = _update_donated(self.mean, x, np.float32(weight / self.total))
    jax.block_until_ready(self.mean)  # Before the reader's buffers are overwritten.
    del x

  def candidate(self, source, weight: float = 1.0) -> dict:
    x = self._read(source)
    out = running_update(self.mean, x, np.float32(weight / (self.total + weight)))
    jax.block_until_ready(out)
    del x
    return out

  def accept(self, candidate: dict, weight: float = 1.0) -> None:
    self.mean, self.total = candidate, self.total + weight

  def output(self, home: Optional[dict] = None) -> dict:
    """The mean (or a candidate) as params: in the evaluation layout, or numpy arrays for
    the host layout; in the ingredients' dtype."""
    home = self.mean if home is None else home
    if not self.on_host:
      return self.reader.output(home, self.specs)
    as_f32 = {n: checkpoints.LeafSpec(s.shape, np.float32) for n, s in self.specs.items()}
    out = jax.device_get(self.reader.output(home, as_f32))
    return {n: np.asarray(x).astype(np.dtype(self.specs[n].dtype), copy=False)
            for n, x in out.items()}


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
  return as_tree(mean.output(), opened[0])


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
  """One ingredient in the evaluation layout of `layout` (each process reads only what its
  devices hold for a sharded layout); numpy arrays for the host layout."""
  opened = open_source(source, verify)
  if layout.kind == "host":
    return as_tree({n: np.array(opened.read(n)) for n in opened.specs}, opened)
  target = layout if layout.kind == "sharded" else Layout("sharded", layout.mesh, (),
                                                          layout.axis)
  reader = Reader(opened.specs, target)  # Rules () replicate: every process reads it whole.
  home = reader.read(opened, reuse=False)
  return as_tree(home, opened)
