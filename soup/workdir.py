"""The workdir: where a run's outputs live, the config guard and content-keyed caches.

Every stage writes under the workdir atomically and skips what is already
there, so a rerun (after a crash, a kill or an added recipe) redoes only what
is missing. The layout's names are soup/layout.py's.

The logits and rows caches are keyed by their content's inputs: the
ingredients' fingerprints and the evaluation settings (data, model, recipe
settings). A changed input (a retrained member, another data_dir) misses the
cache and is recomputed; nothing is reused on the model's name alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from soup import atomic_io, checkpoints, layout, trees

# Keys a rerun may change without invalidating what the workdir holds. Those that
# reach the evaluation (data paths) are part of the caches' keys instead.
MUTABLE_KEYS = ("stages", "sweep.only", "sweep.num_members", "soups", "report", "data.data_dir",
                "data.idx_dir", "eval.batch_size", "eval.group_size", "data.objectnet_dir",
                "data.num_workers", "data.cache_dir", "data.heldout_in_memory", "init.bpe_path")
# Data settings that cannot change a logit: thread counts and where caches live.
NOT_EVAL_DATA_KEYS = ("num_workers", "cache_dir", "heldout_in_memory")
_KEY_ENTRY = "__cache_key__"  # Inside eval/<name>.npz, beside the splits' logits.


class WorkdirMismatchError(ValueError):
  pass


def flat_config(tree: dict) -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}, tuples as lists (as JSON would read them back)."""
  flat = trees.flatten_with_names(tree, sep=".")
  return {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()}


def content_key(parts: Any) -> str:
  """A short digest of JSON-able inputs: equal inputs, equal keys."""
  text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:32]


def eval_settings(config) -> dict:
  """Settings that decide every logit besides the params: data and model."""
  data = json.loads(config.data.to_json())
  return {"data": {k: v for k, v in data.items() if k not in NOT_EVAL_DATA_KEYS},
          "model": json.loads(config.model.to_json())}


class Workdir:
  """Paths of one experiment's outputs and its caches."""

  def __init__(self, root: str | Path):
    self.root = Path(root).absolute()
    self.root.mkdir(parents=True, exist_ok=True)

  # --- Layout --------------------------------------------------------------

  @property
  def upstream(self) -> Path:
    return self.root / layout.UPSTREAM

  def model_dir(self, name: str) -> Path:
    return self.root / layout.model_dir(name)

  def ingredient_dir(self, name: str) -> Path:
    return self.root / layout.ingredient(name)

  def soup_dir(self, recipe: str) -> Path:
    return self.root / layout.soup_dir(recipe)

  # --- The config guard and the frozen sweep --------------------------------

  def check_config(self, config) -> None:
    """Records the config; refuses a workdir made by a different experiment."""
    path = self.root / layout.CONFIG
    current = json.loads(config.to_json())
    if path.exists():
      saved, now = flat_config(json.loads(path.read_text())), flat_config(current)
      differ = sorted(k for k in saved.keys() | now.keys()
                      if saved.get(k) != now.get(k)
                      and not any(k == m or k.startswith(m + ".") for m in MUTABLE_KEYS))
      if differ:
        details = "; ".join(f"{k}: {saved.get(k)!r} in the workdir, {now.get(k)!r} now"
                            for k in differ[:6])
        raise WorkdirMismatchError(
            f"{self.root} was made by a different config ({details}). Its results would mix "
            "two experiments: use a new --workdir, or drop those overrides. Nothing was changed.")
    atomic_io.atomic_write_text(path, json.dumps(current, indent=1, sort_keys=True))

  def freeze_sweep(self, members: list[dict]) -> list[dict]:
    """The sweep's hyperparameters as first recorded; more members may be appended."""
    path = self.root / layout.SWEEP
    if path.exists():
      saved = json.loads(path.read_text())
      n = min(len(saved), len(members))
      if saved[:n] != members[:n]:
        raise WorkdirMismatchError(
            f"The sweep in {path} differs from the config's sweep function; use a new workdir.")
      if len(members) <= len(saved):
        return saved[: len(members)]
    atomic_io.atomic_write_text(path, json.dumps(members, indent=1))
    return members

  # --- Content-keyed caches --------------------------------------------------

  def fingerprint_digest(self, path: Path) -> str:
    """One digest of an ingredient's per-leaf fingerprints (read from ingredient.json)."""
    return content_key(checkpoints.ingredient_metadata(path)["fingerprints"])

  def logits_key(self, name: str, config) -> str:
    return content_key({"ingredient": self.fingerprint_digest(self.ingredient_dir(name)),
                        "eval": eval_settings(config)})

  def read_logits(self, name: str, key: str) -> Optional[dict[str, np.ndarray]]:
    """eval/<name>.npz if it was computed from these inputs, else None."""
    path = self.root / layout.logits_file(name)
    if not path.exists():
      return None
    with np.load(path) as z:
      if _KEY_ENTRY not in z.files or str(z[_KEY_ENTRY]) != key:
        return None
      return {k: z[k] for k in z.files if k != _KEY_ENTRY}

  def has_logits(self, name: str, key: str) -> bool:
    """Whether eval/<name>.npz was computed from these inputs (its logits left unread)."""
    path = self.root / layout.logits_file(name)
    if not path.exists():
      return False
    with np.load(path) as z:
      return _KEY_ENTRY in z.files and str(z[_KEY_ENTRY]) == key

  def write_logits(self, name: str, key: str, logits: dict[str, np.ndarray]) -> None:
    arrays = {**logits, _KEY_ENTRY: np.asarray(key)}
    atomic_io.atomic_write(self.root / layout.logits_file(name), lambda f: np.savez(f, **arrays),
                         binary=True)

  def read_rows(self, recipe: str, key: str) -> Optional[list[dict]]:
    """soups/<recipe>.json's rows if they were made from these inputs, else None."""
    path = self.root / layout.soup_rows(recipe)
    if not path.exists():
      return None
    saved = json.loads(path.read_text())
    if not isinstance(saved, dict) or saved.get("key") != key or not saved.get("rows"):
      return None
    return saved["rows"]

  def write_rows(self, recipe: str, key: str, rows: list[dict]) -> None:
    atomic_io.atomic_write_text(self.root / layout.soup_rows(recipe),
                              json.dumps({"key": key, "rows": rows}))
