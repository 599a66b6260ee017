"""Host memory: aligned allocation and returning freed pages to the OS.

`aligned_empty`/`aligned_tree` give arrays whose data starts on an ALIGNMENT boundary
(jax.device_put on the CPU aliases, does not copy, aligned arrays); `release_free_memory`
asks glibc to trim its heap after large restores; `keep_freed_blocks` (soup/main.py calls
it first) lets the batches of every step reuse freed heap instead of fresh pages.
"""

from __future__ import annotations

import ctypes
import math
import os
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


# glibc's mallopt parameters (malloc.h) and the values keep_freed_blocks sets.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 128 << 20  # Bytes: blocks up to this size come from the heap.
TRIM_THRESHOLD = 512 << 20  # Bytes of free heap top kept instead of returned to the OS.
ARENA_MAX = 1  # One heap for every thread: a block freed by one is reused by the others.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")


def keep_freed_blocks() -> bool:
  """Lets each step's buffers reuse freed heap blocks instead of fresh pages (mallopt).

  Every step allocates and frees blocks of megabytes to tens of MB: XLA's buffers for the
  step's intermediates, and the batches (a 256-image ImageNet batch at 224 px is 38.5 MB,
  and again as the devices' copies). glibc serves blocks above its mmap threshold (at
  most 32 MiB by default) with fresh pages, trims freed heap above 128 KiB, and gives
  threads their own arenas, so each step paid the kernel's page faults and zeroing:
  11 million minor faults and 24 CPU-seconds of kernel time for two members of the
  default's sweep, against 0.25 million and under 4 s with this (docs/benchmarks.md). Call it
  before the first threads start: blocks up to MMAP_THRESHOLD come from one shared heap
  (ARENA_MAX), and up to TRIM_THRESHOLD of its free top is kept; `release_free_memory`
  still returns everything after big restores. Only the allocator's bookkeeping moves:
  no number computed changes. Returns whether it applied: not without glibc, nor when the
  user chose an allocator (a MALLOC_* setting above in the environment, or one in
  LD_PRELOAD), nor when SOUP_GLIBC_DEFAULTS=1.
  """
  chosen = (any(k in os.environ for k in _USER_SETTINGS)
            or "malloc" in os.environ.get("LD_PRELOAD", ""))
  if _LIBC is None or chosen or os.environ.get("SOUP_GLIBC_DEFAULTS") == "1":
    return False
  return bool(_LIBC.mallopt(M_ARENA_MAX, ARENA_MAX)
              and _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
              and _LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
