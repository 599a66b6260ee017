"""Layouts: where a running mean lives, and the readers that fill it.

A `Layout` says where the mean lives and what each process reads:
  host     the mean on the host (numpy); each leaf read whole (HostReader);
  flat     every leaf flattened, zero-padded and split evenly over the mesh's devices:
           each device holds its part, and each process reads only its devices' ranges
           of every leaf (Reader); the soup comes back as host arrays;
  sharded  the train state's layout, config.sharding_rules (FSDP): each process reads
           only its devices' shards (one chunk each, when the ingredient was saved from
           that layout) and the soup stays in that layout.
Readers read into host buffers made once and reused for every ingredient.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from soup import memory, sharding as sharding_lib, trees
from soup.soups.sources import nbytes as _nbytes

THREADED_MIN_BYTES = 16 << 20  # Smaller models are read on the calling thread.


class Kind(str, enum.Enum):
  """Where a layout keeps the mean (the module docstring says what each reads)."""
  HOST = "host"
  FLAT = "flat"
  SHARDED = "sharded"


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the running mean lives; see the module docstring."""

  kind: Kind
  mesh: Optional[Mesh] = None
  rules: sharding_lib.Rules = ()
  axis: str = "data"

  def __post_init__(self):
    try:
      object.__setattr__(self, "kind", Kind(self.kind))
    except ValueError:
      raise ValueError(f"Layout kind must be host, flat or sharded, got {self.kind!r}.") from None
    if not self.is_host and self.mesh is None:
      raise ValueError(f"A {self.kind.value} layout needs a mesh.")

  @property
  def is_host(self) -> bool:
    return self.kind is Kind.HOST

  @property
  def is_flat(self) -> bool:
    return self.kind is Kind.FLAT

  @property
  def is_sharded(self) -> bool:
    return self.kind is Kind.SHARDED

  @classmethod
  def host(cls) -> "Layout":
    return cls(Kind.HOST)

  @classmethod
  def flat(cls, mesh: Mesh, axis: str = "data") -> "Layout":
    return cls(Kind.FLAT, mesh, (), axis)

  @classmethod
  def sharded(cls, mesh: Mesh, rules: sharding_lib.Rules) -> "Layout":
    return cls(Kind.SHARDED, mesh, tuple(tuple(r) for r in rules))

  @classmethod
  def of_run(cls, mesh: Mesh, rules: sharding_lib.Rules = ()) -> "Layout":
    """The experiment's: the train state's shardings if the config has rules, else the
    host (on this machine's CPUs the fastest: docs/benchmarks.md)."""
    return cls.sharded(mesh, rules) if rules else cls.host()

  def output_shardings(self, specs: dict) -> dict[str, NamedSharding]:
    """Per leaf, where a soup (or a restored ingredient) is evaluated: the rules' sharding,
    or replicated."""
    if self.is_sharded:
      shapes = {n: jax.ShapeDtypeStruct(s.shape, s.dtype) for n, s in specs.items()}
      by_name = trees.flatten_with_names(
          sharding_lib.shardings(trees.unflatten(shapes), self.mesh, self.rules))
      return {n: by_name[n] for n in specs}
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
    if layout.is_flat:
      d = layout.mesh.shape[layout.axis]
      self.shape = (-(-size // d) * d,)
      self.sharding = NamedSharding(layout.mesh, P(layout.axis))
    else:
      self.shape, self.sharding = tuple(spec.shape), out_sharding
    self.flat = layout.is_flat
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
    if self.layout.is_sharded:
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


def split_by_bytes(specs: dict, parts: int) -> list[list[str]]:
  """Leaf names split into `parts` groups of about equal bytes (largest first)."""
  groups: list[list[str]] = [[] for _ in range(parts)]
  loads = [0] * parts
  for name in sorted(specs, key=lambda n: _nbytes(specs[n]), reverse=True):
    k = loads.index(min(loads))
    groups[k].append(name)
    loads[k] += _nbytes(specs[name])
  return [g for g in groups if g]
