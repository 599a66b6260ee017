"""Orbax checkpoints: params-only soup ingredients and full train states.

An ingredient is a folder:
  <dir>/params/           Orbax (StandardCheckpointer) tree of params only
  <dir>/ingredient.json   fingerprints of every leaf + free-form metadata
`ingredient.json` is written atomically after Orbax commits, so its presence
means the ingredient is complete; a kill mid-write leaves no ingredient.json
and the member is redone. Fingerprints (CRC-32 of each leaf's bytes, see
`fingerprint`) catch a truncated or corrupted file that would otherwise restore
silently wrong values.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from soup import results

PyTree = Any
INGREDIENT_FILE = "ingredient.json"


class CheckpointError(RuntimeError):
  """A checkpoint is missing, incomplete, corrupted or of another model."""


def flatten_with_names(tree: PyTree) -> dict[str, Any]:
  """{"a": {"b": x}} -> {"a/b": x}, in jax's leaf order (sorted keys)."""
  flat = traverse_util.flatten_dict(tree)
  return {"/".join(map(str, path)): flat[path] for path in sorted(flat)}


def fingerprint(tree: PyTree) -> dict[str, str]:
  """Per leaf: dtype, shape and the CRC-32 of its bytes.

  Catches any changed, truncated or swapped bytes at ~3 GB/s with no copy; a
  cryptographic hash would cost more than the averaging itself on
  ViT-B/32-sized ingredients.
  """
  out = {}
  for name, leaf in flatten_with_names(tree).items():
    a = np.ascontiguousarray(np.asarray(leaf))
    out[name] = f"{a.dtype}{list(a.shape)}:{zlib.crc32(a.reshape(-1).view(np.uint8)):08x}"
  return out


def is_ingredient(path: str | os.PathLike) -> bool:
  return (Path(path) / INGREDIENT_FILE).exists()


def save_ingredient(path: str | os.PathLike, params: PyTree, metadata: Mapping | None = None) -> None:
  """Saves params only, then the fingerprint file that marks it complete."""
  path = Path(path).absolute()  # Orbax wants absolute paths.
  if path.exists():
    shutil.rmtree(path)  # A leftover from an interrupted write.
  path.mkdir(parents=True)
  params = jax.device_get(params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / "params", params)
  checkpointer.wait_until_finished()
  checkpointer.close()
  info = {"fingerprints": fingerprint(params), "metadata": dict(metadata or {})}
  results.atomic_write_text(path / INGREDIENT_FILE, json.dumps(info, indent=1))


def ingredient_metadata(path: str | os.PathLike) -> dict:
  path = Path(path)
  if not is_ingredient(path):
    raise CheckpointError(
        f"{path} is not a complete ingredient (no {INGREDIENT_FILE}); it was interrupted "
        "or never written. Rerun the sweep to redo that member.")
  return json.loads((path / INGREDIENT_FILE).read_text())


def ingredient_shapes(path: str | os.PathLike) -> PyTree:
  """Shapes and dtypes of an ingredient, read from Orbax metadata (no array I/O)."""
  ingredient_metadata(path)
  with ocp.StandardCheckpointer() as checkpointer:
    meta = checkpointer.metadata(Path(path).absolute() / "params")
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)), tree)


def load_ingredient(path: str | os.PathLike, verify: bool = True) -> PyTree:
  """Restores an ingredient as numpy arrays, checking its fingerprints."""
  path = Path(path).absolute()
  info = ingredient_metadata(path)
  try:
    with ocp.StandardCheckpointer() as checkpointer:  # Closing it frees its threads and buffers.
      params = checkpointer.restore(path / "params")
  except Exception as e:  # Orbax/tensorstore raise many types for broken files.
    raise CheckpointError(f"Cannot restore ingredient {path}: {type(e).__name__}: {e}. "
                          "The checkpoint is corrupted or truncated; delete it and rerun "
                          "that member.") from e
  params = jax.tree.map(np.asarray, params)
  if verify:
    expected, got = info["fingerprints"], fingerprint(params)
    bad = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
    if bad:
      raise CheckpointError(f"Ingredient {path} is corrupted: leaves {bad[:5]} do not match "
                            "their saved fingerprints. Delete it and rerun that member.")
  return params


# --- Full train states (resumable training) -------------------------------


def train_state_manager(directory: str | os.PathLike, save_every_steps: int) -> ocp.CheckpointManager:
  """Keeps the latest train state; Orbax commits atomically via a tmp folder."""
  return ocp.CheckpointManager(
      Path(directory).absolute(),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=1, save_interval_steps=save_every_steps, cleanup_tmp_directories=True,
          enable_async_checkpointing=False),
  )


def restore_train_state(manager: ocp.CheckpointManager, abstract_state: PyTree):
  """Returns (step, state) of the latest checkpoint, or (0, None)."""
  step = manager.latest_step()
  if step is None:
    return 0, None
  try:
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except Exception as e:
    raise CheckpointError(
        f"Cannot restore the train state at step {step} in {manager.directory}: {e}. "
        "If the model or optimizer config changed, use a new workdir; if the files are "
        "damaged, delete that step folder to restart the member.") from e
  return step, state
