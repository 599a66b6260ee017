"""Full train states (resumable training): the Orbax manager, restore and save.

Ingredients (params only, read leaf by leaf) are soup/checkpoints.py; this is the
latest-step train state of one training run, kept for resuming it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from soup.checkpoints import CheckpointError, quiet_orbax

PyTree = Any


def train_state_manager(directory: str | os.PathLike,
                        save_every_steps: int) -> ocp.CheckpointManager:
  """Keeps the latest train state; Orbax commits atomically via a tmp folder."""
  quiet_orbax()
  return ocp.CheckpointManager(
      Path(directory).absolute(),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=1, save_interval_steps=save_every_steps, cleanup_tmp_directories=True,
          enable_async_checkpointing=False),
  )


def save_train_state(manager: ocp.CheckpointManager, step: int, state: PyTree,
                     force: bool = False) -> None:
  """Saves `state` as `step` (when the manager's interval says so, or `force`)."""
  manager.save(step, args=ocp.args.StandardSave(state), force=force)


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
