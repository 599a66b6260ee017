"""Soup ingredients: params-only Orbax checkpoints, checksummed, read shard by shard.

Full train states (resumable training) are soup/train_state.py; aligned buffers and
malloc_trim are soup/memory.py.

An ingredient is a folder:
  <dir>/params/           Orbax tree of params only (zarr2 arrays, uncompressed, no OCDBT)
  <dir>/ingredient.json   per leaf: dtype, shape, chunk shape and block checksums; metadata
`ingredient.json` is written atomically after Orbax commits, so its presence
means the ingredient is complete; a kill mid-write leaves no ingredient.json
and the member is redone.

Layout on disk. Params saved from host arrays are one zarr chunk per leaf. Params
saved from sharded jax.Arrays (an FSDP train state) are written as they are, with
no gather: every process writes its own shards, and each shard is one chunk. Every
chunk carries a CRC-32C per BLOCK_BYTES block, so a reader that needs part of a
chunk reads and checks only the blocks it covers.

Reading: `open_ingredient` parses the metadata only; `Ingredient.read_box` reads one
N-d slice of a leaf (a device's shard), `read_flat` a range of its flattened values,
`read` the whole leaf, each into a caller's buffer. They read the chunk files
straight (no Orbax restore, ~120 ms fixed cost per call, no allocation), which is
the layout Orbax RAW_LAYOUT_ORBAX writes; tests/test_ingredients.py checks this
reader against Orbax's public restore and fails the day another Orbax release
writes another layout. Ingredients of earlier versions of this code (OCDBT,
compressed, one checksum per leaf) are refused: delete them and rerun the stage.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import google_crc32c
import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: zarr dtype "bfloat16")
import numpy as np
import orbax.checkpoint as ocp

from soup import atomic_io, layout
from soup.memory import aligned_empty, aligned_tree, release_free_memory
from soup.trees import flatten_with_names, unflatten


class _NoOcdbtMergeWarning(logging.Filter):
  """Drops "Skipping merge of OCDBT": Orbax tries to merge OCDBT files after every save and
  warns when (as for ingredients and train states, saved without OCDBT by design) there
  are none."""

  def filter(self, record):
    return "Skipping merge of OCDBT" not in record.getMessage()


_NO_OCDBT_MERGE_WARNING = _NoOcdbtMergeWarning()


def quiet_orbax() -> None:
  """Installs that filter on absl's logger (idempotent); every module that saves calls it."""
  logger = logging.getLogger("absl")
  if _NO_OCDBT_MERGE_WARNING not in logger.filters:
    logger.addFilter(_NO_OCDBT_MERGE_WARNING)

PyTree = Any
INGREDIENT_FILE = layout.INGREDIENT_FILE  # Written last: its presence means complete.
CHUNKED_LAYOUT = "zarr2-chunks"  # ingredient.json's "layout": written by save_ingredient.
# The orbax-checkpoint release whose on-disk layout (a folder per leaf named by its keys
# joined with ".", one raw zarr2 chunk file per shard named by its chunk-grid position)
# this reader was checked against: tests/test_ingredients.py fails, with a message, the day
# another release writes a layout it does not understand.
RAW_LAYOUT_ORBAX = "0.12.8"
BLOCK_BYTES = 1 << 20  # One CRC-32C per MiB of a chunk: a partial read checks what it covers.
_CRC_FILE = "crc32c.process{}.json"  # Each process's shards, merged into ingredient.json.

Box = tuple[tuple[int, int], ...]  # [start, stop) per dimension.


class CheckpointError(RuntimeError):
  """A checkpoint is missing, incomplete, corrupted or of another model."""


# --- Bytes read, per ingredient (what a process reads of each) ------------------

_READ = Counter()
_READ_LOCK = threading.Lock()


def _count(path: Path, nbytes: int) -> None:
  with _READ_LOCK:
    _READ[str(path)] += nbytes


def bytes_read() -> dict[str, int]:
  """Bytes this process has read from each ingredient folder so far."""
  with _READ_LOCK:
    return dict(_READ)


# --- Checksums -----------------------------------------------------------------


def _block_crcs(data: np.ndarray, block: int = BLOCK_BYTES) -> list[str]:
  flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
  return [f"{google_crc32c.value(flat[i:i + block]):08x}"
          for i in range(0, max(flat.size, 1), block)]


def _chunk_key(starts: Sequence[int], chunk: Sequence[int]) -> str:
  """The zarr file of the chunk starting at `starts`: its grid position, "." separated."""
  return ".".join(str(s // c) for s, c in zip(starts, chunk)) or "0"


# --- Writing -------------------------------------------------------------------


def is_ingredient(path: str | os.PathLike) -> bool:
  return (Path(path) / INGREDIENT_FILE).exists()


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _is_sharded(leaf) -> bool:
  return isinstance(leaf, jax.Array) and not leaf.sharding.is_fully_replicated


def _local_chunks(leaves: Mapping[str, Any]) -> dict[str, dict[str, list[str]]]:
  """CRCs of the chunks this process writes: one replica of each of its shards (sharded
  leaves), every leaf whole on process 0 (host leaves: Orbax's primary host writes them)."""
  out: dict[str, dict[str, list[str]]] = {}
  for name, leaf in leaves.items():
    if _is_sharded(leaf):
      chunk = leaf.sharding.shard_shape(leaf.shape)
      for shard in leaf.addressable_shards:
        if shard.replica_id == 0:
          starts = [s.start or 0 for s in shard.index]
          out.setdefault(name, {})[_chunk_key(starts, chunk)] = _block_crcs(np.asarray(shard.data))
    elif jax.process_index() == 0:
      out[name] = {_chunk_key([0] * np.ndim(leaf), np.shape(leaf)): _block_crcs(np.asarray(leaf))}
  return out


def save_ingredient(path: str | os.PathLike, params: PyTree,
                    metadata: Mapping | None = None) -> None:
  """Saves params only, then the checksum file that marks it complete.

  Every process calls it. Host arrays (or replicated ones) are written whole, one
  chunk per leaf; sharded jax.Arrays are written shard by shard, each process its
  own, with no gather to one host. Uncompressed and without OCDBT: float32 weights
  compress by ~7%, while zstd costs more time than the read itself, and raw chunk
  files are what `Ingredient` reads directly.
  """
  path = Path(path).absolute()  # Orbax wants absolute paths.
  if jax.process_index() == 0 and path.exists():
    shutil.rmtree(path)  # A leftover from an interrupted write.
  _barrier(f"ingredient-clean:{path}")
  if not any(_is_sharded(x) for x in jax.tree.leaves(params)):
    params = jax.device_get(params)
  leaves = flatten_with_names(params)
  path.mkdir(parents=True, exist_ok=True)
  quiet_orbax()
  checkpointer = ocp.PyTreeCheckpointer(use_ocdbt=False, use_compression=False)
  checkpointer.save(path / "params", args=ocp.args.PyTreeSave(params))
  checkpointer.close()
  atomic_io.atomic_write_text(path / _CRC_FILE.format(jax.process_index()),
                              json.dumps(_local_chunks(leaves)))
  _barrier(f"ingredient-crcs:{path}")
  if jax.process_index() == 0:
    _write_metadata(path, leaves, metadata)
  _barrier(f"ingredient-done:{path}")
  release_free_memory()


def _write_metadata(path: Path, leaves: Mapping[str, Any], metadata: Optional[Mapping]) -> None:
  crcs: dict[str, dict[str, list[str]]] = {}
  for f in sorted(path.glob(_CRC_FILE.format("*"))):
    for name, chunks in json.loads(f.read_text()).items():
      crcs.setdefault(name, {}).update(chunks)
  fingerprints = {}
  for name, leaf in leaves.items():
    shape = list(np.shape(leaf))
    chunk = list(leaf.sharding.shard_shape(leaf.shape) if _is_sharded(leaf) else shape)
    written = _written_chunk_shape(path / "params", name)
    if written != chunk:  # zarr's own metadata: what Orbax actually wrote.
      raise CheckpointError(
          f"Orbax wrote {name} of {path} in chunks of {written}, not its shards' {chunk}: this "
          f"orbax-checkpoint release does not write the layout of {RAW_LAYOUT_ORBAX}. Pin "
          f"orbax-checkpoint=={RAW_LAYOUT_ORBAX} or update soup/checkpoints.py.")
    expected = math.prod(s // c for s, c in zip(shape, chunk)) if shape else 1
    if len(crcs.get(name, {})) != expected:
      raise CheckpointError(f"{path}: {len(crcs.get(name, {}))} of {expected} chunks of {name} "
                            "have checksums; a process did not save its shards. Rerun.")
    fingerprints[name] = {"dtype": str(np.dtype(leaf.dtype)), "shape": shape, "chunk": chunk,
                          "crc32c": dict(sorted(crcs[name].items()))}
  info = {"fingerprints": fingerprints, "layout": CHUNKED_LAYOUT, "block_bytes": BLOCK_BYTES,
          "metadata": dict(metadata or {})}
  atomic_io.atomic_write_text(path / INGREDIENT_FILE, json.dumps(info, indent=1))
  for f in path.glob(_CRC_FILE.format("*")):
    f.unlink()


def _written_chunk_shape(params_dir: Path, name: str) -> list[int]:
  try:
    zarray = json.loads((params_dir / name.replace("/", ".") / ".zarray").read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"Orbax wrote no zarr array for {name} in {params_dir} ({e}); this "
                          f"release does not write the layout of {RAW_LAYOUT_ORBAX}.") from e
  return list(zarray.get("chunks", ()))


# --- Reading -------------------------------------------------------------------


def ingredient_metadata(path: str | os.PathLike) -> dict:
  path = Path(path)
  if not is_ingredient(path):
    raise CheckpointError(
        f"{path} is not a complete ingredient (no {INGREDIENT_FILE}); it was interrupted "
        "or never written. Rerun the sweep to redo that member.")
  try:
    info = json.loads((path / INGREDIENT_FILE).read_text())
  except ValueError as e:
    info = {"error": str(e)}
  if not isinstance(info, dict) or not isinstance(info.get("fingerprints"), dict):
    raise CheckpointError(
        f"Cannot restore ingredient {path}: its {INGREDIENT_FILE} is corrupt or has no "
        "fingerprints. Delete that folder and rerun the stage that writes it.")
  if info.get("layout") != CHUNKED_LAYOUT:
    raise CheckpointError(
        f"Ingredient {path} was written by an earlier version of this code (layout "
        f"{info.get('layout', 'Orbax defaults')!r}, not {CHUNKED_LAYOUT!r}); delete that folder "
        "and rerun the stage that writes it.")
  return info


class LeafSpec:
  """Shape and dtype of a leaf (a tree leaf itself, unlike a NamedTuple)."""
  __slots__ = ("shape", "dtype")

  def __init__(self, shape: tuple[int, ...], dtype):
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)

  def __repr__(self):
    return f"LeafSpec({self.shape}, {self.dtype})"


class _Leaf:
  """One leaf on disk: its spec, chunk shape and per-block checksums."""
  __slots__ = ("spec", "chunk", "crcs", "nbytes", "chunk_bytes")

  def __init__(self, fp: dict):
    self.spec = LeafSpec(fp["shape"], fp["dtype"])
    self.chunk = tuple(fp["chunk"])
    self.crcs = {k: [int(v, 16) for v in vs] for k, vs in fp["crc32c"].items()}
    self.nbytes = self.spec.dtype.itemsize * math.prod(self.spec.shape)
    self.chunk_bytes = self.spec.dtype.itemsize * math.prod(self.chunk)


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
  done = 0
  while done < len(view):
    n = os.preadv(fd, [view[done:]], offset + done)
    if n == 0:
      break
    done += n
  return done


def _contiguous(extents: Sequence[int], shape: Sequence[int]) -> bool:
  """Whether a box of these extents is one run of bytes of a C-order array of `shape`:
  extent 1 before some dimension k, the full shape after it."""
  k = next((d for d, (e, s) in enumerate(zip(extents, shape)) if e != 1), len(shape))
  return all(e == s for e, s in zip(extents[k + 1:], shape[k + 1:]))


class Ingredient:
  """An ingredient opened for reading: its leaves' names, shapes and dtypes, and reads of
  whole leaves, N-d boxes or flat ranges, checksummed with `verify`. Thread-safe."""

  def __init__(self, path: str | os.PathLike, verify: bool = True):
    self.path = Path(path).absolute()
    self.verify = verify
    info = ingredient_metadata(self.path)
    self.fingerprints: dict = info["fingerprints"]
    self.metadata: dict = info.get("metadata", {})
    self._block = int(info.get("block_bytes", BLOCK_BYTES))
    self._leaves = {n: _Leaf(fp) for n, fp in self.fingerprints.items()}
    self.specs = {n: leaf.spec for n, leaf in self._leaves.items()}

  @property
  def nbytes(self) -> int:
    return sum(leaf.nbytes for leaf in self._leaves.values())

  def __str__(self):
    return str(self.path)

  def _file(self, name: str, key: str) -> str:
    return os.path.join(self.path, "params", name.replace("/", "."), key)

  # --- Public reads ---

  def read(self, name: str, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Leaf `name` as a C-contiguous array, in `out` (any array with room for its bytes,
    reused across calls) when given, else in a new aligned array."""
    return self.read_box(name, tuple((0, s) for s in self.specs[name].shape), out)

  def read_box(self, name: str, box: Box, out: Optional[np.ndarray] = None) -> np.ndarray:
    """The slice `box` ([start, stop) per dimension) of leaf `name`; reads only the
    chunks it overlaps, and of those only the checksum blocks it covers."""
    leaf = self._leaves[name]
    extents = tuple(b - a for a, b in box)
    out = self._view(out, extents, leaf.spec.dtype)
    item = leaf.spec.dtype.itemsize
    grid = [range(a // c, (b - 1) // c + 1) if b > a else range(0)
            for (a, b), c in zip(box, leaf.chunk)]
    for position in itertools.product(*grid):
      cbox = [(p * c, (p + 1) * c) for p, c in zip(position, leaf.chunk)]
      overlap = [(max(a, ca), min(b, cb)) for (a, b), (ca, cb) in zip(box, cbox)]
      src = tuple(slice(a - ca, b - ca) for (a, b), (ca, _) in zip(overlap, cbox))
      dst = tuple(slice(a - ba, b - ba) for (a, b), (ba, _) in zip(overlap, box))
      lengths = [b - a for a, b in overlap]
      key = ".".join(map(str, position)) or "0"
      if _contiguous(lengths, leaf.chunk) and _contiguous(lengths, extents):
        start = int(np.ravel_multi_index([s.start for s in src], leaf.chunk)) if src else 0
        target = out[dst].reshape(-1).view(np.uint8) if out.ndim else out.reshape(-1).view(np.uint8)
        self._read_bytes(name, key, start * item, (start + math.prod(lengths)) * item, target)
      else:  # A strided part of the chunk: read the chunk, copy the part.
        whole = aligned_empty(leaf.chunk, leaf.spec.dtype)
        self._read_bytes(name, key, 0, leaf.chunk_bytes, whole.reshape(-1).view(np.uint8))
        np.copyto(out[dst], whole[src])
    return out

  def read_flat(self, name: str, start: int, stop: int,
                out: Optional[np.ndarray] = None) -> np.ndarray:
    """Values [start, stop) of leaf `name` flattened in C order (a flat-sharded device's part)."""
    leaf = self._leaves[name]
    out = self._view(out, (stop - start,), leaf.spec.dtype)
    slab = math.prod(leaf.chunk)
    if tuple(leaf.chunk[1:]) != tuple(leaf.spec.shape[1:]):
      np.copyto(out, self.read(name).reshape(-1)[start:stop])  # Chunks not in flat order.
      return out
    item, ndim = leaf.spec.dtype.itemsize, len(leaf.spec.shape)
    for c in range(start // slab, (stop - 1) // slab + 1 if stop > start else 0):
      a, b = max(start, c * slab), min(stop, (c + 1) * slab)
      key = ".".join([str(c)] + ["0"] * (ndim - 1)) or "0"
      self._read_bytes(name, key, (a - c * slab) * item, (b - c * slab) * item,
                       out[a - start:b - start].view(np.uint8))
    return out

  def prefetch(self, names=None) -> None:
    """Asks the kernel to start reading these leaves' files into the page cache
    (returns at once; costs no process memory)."""
    for name in names or self._leaves:
      for key in self._leaves[name].crcs:
        try:
          fd = os.open(self._file(name, key), os.O_RDONLY)
        except OSError:
          return  # A read reports it.
        try:
          os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
          os.close(fd)

  def tree(self) -> PyTree:
    """All leaves, verified, as numpy arrays in one aligned block."""
    out = aligned_tree(self.specs)
    for name in self.specs:
      self.read(name, out[name])
    return unflatten(out)

  # --- The byte reader ---

  @staticmethod
  def _view(out: Optional[np.ndarray], shape, dtype) -> np.ndarray:
    if out is None:
      return aligned_empty(shape, dtype)
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    return out.reshape(-1).view(np.uint8)[:nbytes].view(dtype).reshape(shape)

  def _read_bytes(self, name: str, key: str, a: int, b: int, out: np.ndarray) -> None:
    """Bytes [a, b) of one chunk file into `out` (uint8), checked block by block."""
    leaf = self._leaves[name]
    file = self._file(name, key)
    try:
      fd = os.open(file, os.O_RDONLY)
    except OSError as e:
      raise CheckpointError(f"Cannot read ingredient {self.path}: {e}. The checkpoint is "
                            "incomplete; delete it and rerun that member.") from e
    try:
      size = os.fstat(fd).st_size
      if size != leaf.chunk_bytes:
        raise CheckpointError(f"Ingredient {self.path} is truncated or corrupted: {file} has "
                              f"{size} bytes, expected {leaf.chunk_bytes}. Delete it and rerun "
                              "that member.")
      if self.verify:
        self._read_checked(fd, file, name, key, a, b, out)
      else:
        self._pread(fd, file, out, a, b)
    finally:
      os.close(fd)

  def _pread(self, fd: int, file: str, out: np.ndarray, a: int, b: int) -> None:
    if _pread_into(fd, memoryview(out)[:b - a], a) != b - a:
      raise CheckpointError(f"Ingredient {self.path}: {file} ended early. Delete it and rerun "
                            "that member.")
    _count(self.path, b - a)

  def _corrupted(self, name: str) -> CheckpointError:
    return CheckpointError(f"Ingredient {self.path} is corrupted: leaf {name} does not match its "
                           "saved checksum. Delete it and rerun that member.")

  def _read_checked(self, fd, file, name, key, a, b, out) -> None:
    """Bytes [a, b) of a chunk, each MiB block covered checked against its CRC-32C."""
    leaf, block = self._leaves[name], self._block
    crcs = leaf.crcs.get(key)
    if crcs is None:
      raise CheckpointError(f"Ingredient {self.path} has no checksum for chunk {key} of {name}; "
                            "it is incomplete. Delete it and rerun that member.")
    end = leaf.chunk_bytes
    inner_a = -(-a // block) * block  # The whole blocks inside [a, b) are read in place ...
    inner_b = b if b == end else b // block * block
    for lo in range(inner_a, inner_b, block):  # Each block checked while still in cache.
      hi = min(lo + block, inner_b)
      self._pread(fd, file, out[lo - a:], lo, hi)
      if google_crc32c.value(out[lo - a:hi - a]) != crcs[lo // block]:
        raise self._corrupted(name)
    for j in sorted({a // block, (b - 1) // block}):  # ... the partial ones at the edges apart.
      s, e = j * block, min((j + 1) * block, end)
      if inner_a <= s and e <= inner_b:
        continue
      scratch = np.empty(e - s, np.uint8)
      self._pread(fd, file, scratch, s, e)
      if google_crc32c.value(scratch) != crcs[j]:
        raise self._corrupted(name)
      lo, hi = max(a, s), min(b, e)
      out[lo - a:hi - a] = scratch[lo - s:hi - s]

def open_ingredient(path: str | os.PathLike, verify: bool = True) -> Ingredient:
  return Ingredient(path, verify)


def ingredient_shapes(path: str | os.PathLike) -> PyTree:
  """Shapes and dtypes of an ingredient, from its checksum file (no array I/O)."""
  specs = Ingredient(path, verify=False).specs
  return unflatten({n: jax.ShapeDtypeStruct(s.shape, s.dtype) for n, s in specs.items()})


def load_ingredient(path: str | os.PathLike, verify: bool = True) -> PyTree:
  """Restores an ingredient as numpy arrays on the host, checking its checksums."""
  return Ingredient(path, verify).tree()
