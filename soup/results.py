"""results.jsonl: one line per model, soup or baseline, and its atomic writing.

Accuracies are fractions in [0, 1] under the dataset's column names, as in the
paper's released files (`model_name`, `ImageNet2p`, `ImageNet`, the shifts).
Our lines add: `recipe`, `ingredients`, `inference_cost` (forward passes per
image), `avg_shifts` (plain mean of the shift columns) and recipe details
(`hparams`, `alpha`, `weights`, ...). Lines without `recipe` (the official
files) get one inferred from `model_name` by the reader's caller's rule (the
registry's `soup.recipes.infer_recipe`): this module knows no recipes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from soup import atomic_io
from soup.columns import Columns  # noqa: F401  (soup.results.Columns, as its readers name it)
from soup.data import registry as datasets

# Each dataset's columns are declared in the dataset registry; these two are named here too.
IMAGENET, FASHION_MNIST = datasets.IMAGENET, datasets.FASHION_MNIST


def detect_columns(rows: Sequence[dict]) -> Columns:
  """The registered dataset (or GLUE task) whose columns the first row holds."""
  known = datasets.known_columns()
  for columns in known:
    if all(c in rows[0] for c in columns.all):
      return columns
  raise ValueError(f"Unknown result columns {sorted(rows[0])}; expected one of "
                   f"{[c.all for c in known]}.")


def avg_shifts(row: dict, columns: Columns) -> Optional[float]:
  """The plain mean of the shift columns; None for a task without shifts."""
  if not columns.shifts:
    return None
  return sum(row[c] for c in columns.shifts) / len(columns.shifts)


def number(value) -> Optional[float]:
  """A line's field as a float; None when absent, not a number or NaN."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return None if math.isnan(value) else float(value)


DASH = "—"  # A number the lines lack, in the report's text.


def percent(x: Optional[float]) -> str:
  """An accuracy as the report writes it: 85.97, or a dash when there is none."""
  return DASH if x is None else f"{100 * x:.2f}"


class ResultsError(ValueError):
  """A results file has a line that is not a results row; the message names file and line."""


def read(path: str | os.PathLike,
         infer_recipe: Optional[Callable[[str], str]] = None) -> list[dict]:
  """Reads results; fills `avg_shifts`, and `recipe` by `infer_recipe(model_name)`, where missing.

  `infer_recipe` raises ValueError for a name it cannot place (soup.recipes.infer_recipe);
  None leaves each row's `recipe` as the file has it.
  """
  rows, numbers = [], []
  for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ResultsError(f"{path}:{number}: not a JSON line ({e.msg}, column {e.colno}).") from e
    if not isinstance(row, dict) or not isinstance(row.get("model_name"), str):
      raise ResultsError(f"{path}:{number}: a results row is a JSON object with a "
                         "\"model_name\" string.")
    rows.append(row)
    numbers.append(number)
  if not rows:
    raise ResultsError(f"{path} holds no results.")
  try:
    columns = detect_columns(rows)
  except ValueError as e:
    raise ResultsError(f"{path}:{numbers[0]}: {e}") from e
  for number, row in zip(numbers, rows):
    missing = [c for c in columns.all if c not in row]
    if missing:
      raise ResultsError(f"{path}:{number}: row {row['model_name']!r} lacks {missing}.")
    try:
      if infer_recipe is not None:
        row.setdefault("recipe", infer_recipe(row["model_name"]))
      row.setdefault("avg_shifts", avg_shifts(row, columns))
    except (ValueError, TypeError) as e:
      raise ResultsError(f"{path}:{number}: {e}") from e
  return rows


def write(path: str | os.PathLike, rows: Iterable[dict]) -> None:
  atomic_io.atomic_write_text(path, "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows))


# Fields that vary between identical runs: wall times.
TIMING_FIELDS = ("seconds",)


def digest(path: str | os.PathLike) -> str:
  """sha256 of a results file's rows without their timing fields, keys sorted: two runs with
  the same digest gave the same numbers, every digit (docs: where that holds)."""
  h = hashlib.sha256()
  for line in Path(path).read_text().splitlines():
    if line.strip():
      row = {k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
      h.update((json.dumps(row, sort_keys=True) + "\n").encode())
  return h.hexdigest()
