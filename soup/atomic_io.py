"""Atomic file writes: a temporary file in the same folder, then a rename.

A kill at any moment leaves either the old file or the new one, never half a
file. This module imports nothing from soup: every layer may use it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def atomic_write(path: str | os.PathLike, write_fn: Callable[[IO], None],
                 binary: bool = False) -> None:
  """Writes via a temporary file and rename: a kill never leaves half a file."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb" if binary else "w") as f:
      write_fn(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  atomic_write(path, lambda f: f.write(text))
