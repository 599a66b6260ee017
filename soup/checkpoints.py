"""Soup ingredients: params-only Orbax checkpoints, fingerprinted, read leaf by leaf.

Full train states (resumable training) are soup/train_state.py; aligned buffers and
malloc_trim are soup/memory.py.

An ingredient is a folder:
  <dir>/params/           Orbax tree of params only (zarr arrays, uncompressed, no OCDBT)
  <dir>/ingredient.json   fingerprints of every leaf + free-form metadata
`ingredient.json` is written atomically after Orbax commits, so its presence
means the ingredient is complete; a kill mid-write leaves no ingredient.json
and the member is redone. Fingerprints (CRC-32C of each leaf's bytes; CRC-32 in
older ingredients) catch a truncated or corrupted file that would otherwise
restore silently wrong values.

Reading: `open_ingredient` parses the metadata only; `Ingredient.read` reads one
leaf. Ingredients written by `save_ingredient` are plain Orbax checkpoints
(`ocp.StandardCheckpointer().restore` reads them) whose arrays are single raw zarr
chunks, so a leaf is read straight from its chunk file into a caller's buffer: no
decompression, no Orbax restore (~120 ms fixed cost per call) and no allocation.
Anything else (compressed or OCDBT ingredients of earlier versions) is restored with
Orbax once, then served from memory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import zlib
from pathlib import Path
from typing import Any, Mapping, Optional

import google_crc32c
import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: zarr dtype "bfloat16")
import numpy as np
import orbax.checkpoint as ocp

from soup import atomic_io, orbax_logs
from soup.memory import aligned_empty, aligned_tree, release_free_memory
from soup.trees import flatten_with_names, unflatten

PyTree = Any
INGREDIENT_FILE = "ingredient.json"


class CheckpointError(RuntimeError):
  """A checkpoint is missing, incomplete, corrupted or of another model."""


# --- Fingerprints --------------------------------------------------------------


def _crc32c(a: np.ndarray) -> int:
  return google_crc32c.value(a.reshape(-1).view(np.uint8))


def _leaf_fingerprint(a: np.ndarray, method: str = "crc32c") -> str:
  a = np.ascontiguousarray(a)
  if method == "crc32c":
    return f"{a.dtype}{list(a.shape)}:crc32c:{_crc32c(a):08x}"
  return f"{a.dtype}{list(a.shape)}:{zlib.crc32(a.reshape(-1).view(np.uint8)):08x}"


def fingerprint(tree: PyTree) -> dict[str, str]:
  """Per leaf: dtype, shape and the CRC-32C of its bytes.

  Catches any changed, truncated or swapped bytes at several GB/s with no copy (the
  CPU's crc32 instruction); a cryptographic hash would cost more than the averaging
  itself on ViT-B/32-sized ingredients. Older ingredients carry zlib's CRC-32 (no
  "crc32c:" tag) and are checked with it.
  """
  return {name: _leaf_fingerprint(np.asarray(leaf))
          for name, leaf in flatten_with_names(tree).items()}


# --- Ingredients ---------------------------------------------------------------


def is_ingredient(path: str | os.PathLike) -> bool:
  return (Path(path) / INGREDIENT_FILE).exists()


def save_ingredient(path: str | os.PathLike, params: PyTree,
                    metadata: Mapping | None = None) -> None:
  """Saves params only, then the fingerprint file that marks it complete.

  Uncompressed and without OCDBT: float32 weights compress by ~7%, while zstd costs
  more time than the read itself, and one raw chunk file per leaf is what
  `Ingredient.read` reads directly.
  """
  path = Path(path).absolute()  # Orbax wants absolute paths.
  if path.exists():
    shutil.rmtree(path)  # A leftover from an interrupted write.
  path.mkdir(parents=True)
  params = jax.device_get(params)
  orbax_logs.quiet()
  checkpointer = ocp.PyTreeCheckpointer(use_ocdbt=False, use_compression=False)
  checkpointer.save(path / "params", args=ocp.args.PyTreeSave(params))
  checkpointer.close()
  info = {"fingerprints": fingerprint(params), "layout": RAW_LAYOUT,
          "metadata": dict(metadata or {})}
  atomic_io.atomic_write_text(path / INGREDIENT_FILE, json.dumps(info, indent=1))
  release_free_memory()


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
  return info


class LeafSpec:
  """Shape and dtype of a leaf (a tree leaf itself, unlike a NamedTuple)."""
  __slots__ = ("shape", "dtype")

  def __init__(self, shape: tuple[int, ...], dtype):
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)

  def __repr__(self):
    return f"LeafSpec({self.shape}, {self.dtype})"


def _parse_fingerprint(fp: str) -> tuple[LeafSpec, str, int]:
  """"float32[768, 3072]:crc32c:1a2b3c4d" -> (spec, "crc32c", 0x1a2b3c4d); no tag: "crc32"."""
  head, _, tail = fp.partition(":")
  dtype, _, shape = head.partition("[")
  shape = tuple(int(d) for d in shape.rstrip("]").split(",") if d.strip())
  method, _, value = tail.rpartition(":")
  if tail == "sharded":  # soup.soups.sharded: per-shard CRCs live beside the shards.
    return LeafSpec(shape, dtype), "sharded", 0
  return LeafSpec(shape, dtype), method or "crc32", int(value, 16)


RAW_LAYOUT = "zarr2-raw-chunks"  # ingredient.json's "layout": written by save_ingredient.
# The orbax-checkpoint release whose on-disk layout (_METADATA's tree_metadata, one raw zarr2
# chunk per leaf) _raw_chunk_files was checked against: tests/test_ingredients.py fails, with
# a message, the day another release writes a layout it does not understand.
RAW_LAYOUT_ORBAX = "0.12.8"


def _raw_chunk_files(params_dir: str, specs: Mapping[str, LeafSpec],
                     trusted: bool) -> Optional[dict[str, str]]:
  """Each leaf's single raw zarr chunk file, or None if the checkpoint has another layout
  (OCDBT, zarr3, compression, several chunks, Fortran order, a non-dict tree).

  `trusted`: save_ingredient wrote it (RAW_LAYOUT), so the per-array .zarray files
  are not read; read() still checks each chunk's size.
  """
  try:
    with open(os.path.join(params_dir, "_METADATA")) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return None
  if meta.get("use_ocdbt", True) or meta.get("use_zarr3", False):
    return None
  out = {}
  for entry in meta.get("tree_metadata", {}).values():
    keys = [str(k.get("key")) for k in entry.get("key_metadata", []) if k.get("key_type") == 2]
    if not keys or len(keys) != len(entry["key_metadata"]):  # key_type 2: a dict key.
      return None
    if entry.get("value_metadata", {}).get("value_type") != "np.ndarray":
      return None
    name = "/".join(keys)
    spec = specs.get(name)
    if spec is None:
      return None
    array_dir = os.path.join(params_dir, ".".join(keys))
    separator = "."
    if not trusted:
      try:
        with open(os.path.join(array_dir, ".zarray")) as f:
          zarray = json.load(f)
      except (OSError, ValueError):
        return None
      if (zarray.get("compressor") is not None or zarray.get("filters")
          or zarray.get("order", "C") != "C" or tuple(zarray.get("shape", ())) != spec.shape
          or tuple(zarray.get("chunks", ())) != spec.shape
          or np.dtype(zarray["dtype"]) != spec.dtype):
        return None
      separator = zarray.get("dimension_separator", ".")
    out[name] = os.path.join(array_dir, separator.join("0" for _ in spec.shape) or "0")
  return out if out.keys() == specs.keys() else None


class Ingredient:
  """An ingredient opened for reading: its leaves' names, shapes and dtypes, and
  `read(name)` for one leaf (fingerprint checked with `verify`). Thread-safe."""

  def __init__(self, path: str | os.PathLike, verify: bool = True):
    self.path = Path(path).absolute()
    self.verify = verify
    info = ingredient_metadata(self.path)
    self.fingerprints: dict[str, str] = info["fingerprints"]
    self.metadata: dict = info.get("metadata", {})
    parsed = {n: _parse_fingerprint(fp) for n, fp in self.fingerprints.items()}
    self.specs = {n: p[0] for n, p in parsed.items()}
    self._checksums = {n: p[1:] for n, p in parsed.items()}
    self._nbytes = {n: s.dtype.itemsize * math.prod(s.shape) for n, s in self.specs.items()}
    self._files = _raw_chunk_files(str(self.path / "params"), self.specs,
                                   info.get("layout") == RAW_LAYOUT)
    self._restored: Optional[dict[str, np.ndarray]] = None
    self._lock = threading.Lock()

  @property
  def direct(self) -> bool:
    """Leaves are read straight from raw chunk files (else from one Orbax restore)."""
    return self._files is not None

  @property
  def nbytes(self) -> int:
    return sum(self._nbytes.values())

  def __str__(self):
    return str(self.path)

  def read(self, name: str, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Leaf `name` as a C-contiguous array; read into `out` (any array with room for
    the leaf's bytes, reused across calls) when given, else into a new aligned array."""
    spec = self.specs[name]
    if out is None:
      out = aligned_empty(spec.shape, spec.dtype)
    else:
      out = out.reshape(-1).view(np.uint8)[:self._nbytes[name]].view(spec.dtype).reshape(spec.shape)
    if self._files is None:
      np.copyto(out, self._restore()[name])
    else:
      self._read_chunk(name, out)
    if self.verify and not self._matches(name, out):
      raise CheckpointError(f"Ingredient {self.path} is corrupted: leaf {name} does not match "
                            "its saved fingerprint. Delete it and rerun that member.")
    return out

  def _matches(self, name: str, leaf: np.ndarray) -> bool:
    method, expected = self._checksums[name]
    if method == "sharded":
      raise CheckpointError(f"{self.path} is a sharded ingredient (per-shard checksums): "
                            "restore it with soup.soups.sharded.restore.")
    flat = leaf.reshape(-1).view(np.uint8)
    return (google_crc32c.value(flat) if method == "crc32c" else zlib.crc32(flat)) == expected

  def _read_chunk(self, name: str, out: np.ndarray) -> None:
    file, nbytes = self._files[name], self._nbytes[name]
    view = memoryview(out.reshape(-1).view(np.uint8))
    try:
      fd = os.open(file, os.O_RDONLY)
    except OSError as e:
      raise CheckpointError(f"Cannot read ingredient {self.path}: {e}. The checkpoint is "
                            "incomplete; delete it and rerun that member.") from e
    try:
      size = os.fstat(fd).st_size
      done = 0
      while done < nbytes and size == nbytes:
        n = os.preadv(fd, [view[done:]], done)
        if n == 0:
          break
        done += n
    finally:
      os.close(fd)
    if size != nbytes or done != nbytes:
      raise CheckpointError(f"Ingredient {self.path} is truncated or corrupted: {file} has "
                            f"{size} bytes, expected {nbytes}. Delete it and rerun that member.")

  def prefetch(self, names=None) -> None:
    """Asks the kernel to start reading these leaves' files into the page cache
    (returns at once; costs no process memory)."""
    if self._files is None:
      return
    for name in names or self._files:
      try:
        fd = os.open(self._files[name], os.O_RDONLY)
      except OSError:
        return  # read() reports it.
      try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
      finally:
        os.close(fd)

  def _restore(self) -> dict[str, np.ndarray]:
    with self._lock:
      if self._restored is None:
        self._restored = flatten_with_names(_orbax_restore(self.path))
      return self._restored

  def release(self) -> None:
    """Drops the restored copy of a non-direct ingredient."""
    with self._lock:
      if self._restored is not None:
        self._restored = None
        release_free_memory()

  def tree(self) -> PyTree:
    """All leaves, verified, as numpy arrays in one aligned block."""
    out = aligned_tree(self.specs)
    for name in self.specs:
      self.read(name, out[name])
    self.release()
    return unflatten(out)


def _orbax_restore(path: Path) -> PyTree:
  try:
    with ocp.StandardCheckpointer() as checkpointer:  # Closing it frees its threads and buffers.
      params = checkpointer.restore(path / "params")
  except Exception as e:  # Orbax/tensorstore raise many types for broken files.
    raise CheckpointError(f"Cannot restore ingredient {path}: {type(e).__name__}: {e}. "
                          "The checkpoint is corrupted or truncated; delete it and rerun "
                          "that member.") from e
  params = jax.tree.map(np.asarray, params)
  release_free_memory()
  return params


def open_ingredient(path: str | os.PathLike, verify: bool = True) -> Ingredient:
  return Ingredient(path, verify)


def ingredient_shapes(path: str | os.PathLike) -> PyTree:
  """Shapes and dtypes of an ingredient, from its fingerprint file (no array I/O)."""
  specs = Ingredient(path, verify=False).specs
  return unflatten({n: jax.ShapeDtypeStruct(s.shape, s.dtype) for n, s in specs.items()})


def load_ingredient(path: str | os.PathLike, verify: bool = True) -> PyTree:
  """Restores an ingredient as numpy arrays, checking its fingerprints."""
  ingredient = Ingredient(path, verify)
  tree = ingredient.tree()
  if set(flatten_with_names(tree)) != set(ingredient.fingerprints):  # pragma: no cover
    raise CheckpointError(f"Ingredient {path} does not match its fingerprint file.")
  return tree
