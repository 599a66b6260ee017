"""Host memory: aligned allocation and returning freed pages to the OS.

`aligned_empty`/`aligned_tree` give arrays whose data starts on an ALIGNMENT boundary
(jax.device_put on the CPU aliases, does not copy, aligned arrays); `release_free_memory`
asks glibc to trim its heap after large restores.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any, Mapping

import numpy as np

ALIGNMENT = 64  # Bytes. jax.device_put on the CPU aliases (does not copy) aligned arrays.


def aligned_empty(shape, dtype) -> np.ndarray:
  """An uninitialised C-contiguous array whose data starts on an ALIGNMENT boundary."""
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + ALIGNMENT, np.uint8)
  start = -raw.ctypes.data % ALIGNMENT
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def aligned_tree(specs: Mapping[str, Any], dtype=None) -> dict[str, np.ndarray]:
  """Uninitialised arrays for {name: spec}, all views of one aligned block.

  One allocation: glibc serves it with mmap, so freeing it returns the memory to the
  OS at once (many medium-sized arrays would stay in malloc arenas).
  """
  sizes = {n: math.prod(s.shape) * np.dtype(dtype or s.dtype).itemsize for n, s in specs.items()}
  offsets, total = {}, 0
  for name, size in sizes.items():
    offsets[name] = total
    total += -(-size // ALIGNMENT) * ALIGNMENT
  block = aligned_empty((max(total, 1),), np.uint8)
  return {n: block[offsets[n]:offsets[n] + sizes[n]].view(dtype or s.dtype).reshape(s.shape)
          for n, s in specs.items()}


try:
  _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # Not glibc: nothing to trim.
  _LIBC = None


def release_free_memory() -> None:
  """Returns freed heap pages to the OS (glibc's malloc_trim).

  Orbax/tensorstore allocate restore buffers on their worker threads; glibc keeps
  the freed pages in per-thread arenas, so without this the process grows by about
  one model per restore.
  """
  if _LIBC is not None:
    _LIBC.malloc_trim(0)
