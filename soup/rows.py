"""One results row: a model's accuracy on every split and its per-example correctness.

The accuracies go to results.jsonl (soup/results.py); the packed correctness vectors
(soup/stats.py) stay in the soups' caches for the report's paired bootstrap intervals.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from soup import results, stats


def make_row(splits: Mapping, columns: results.Columns, provenance: dict, /, name: str,
             recipe: str, logits: dict, ingredients: list[str], cost: int, **extra) -> dict:
  """A results row: accuracies on every split, their shift mean, and the recipe's details.

  `splits`: column name -> EvalSplit; `provenance`: the task's data fields.
  """
  acc = {col: splits[col].score(logits[col]) for col in splits}
  acc["avg_shifts"] = results.avg_shifts(acc, columns)
  # Per-example correctness, for the paired bootstrap intervals of the report stage.
  correct = {col: stats.pack_correct(np.argmax(splits[col].scored_logits(
      np.asarray(logits[col], np.float32)), axis=-1) == splits[col].labels) for col in splits}
  return {"model_name": name, "recipe": recipe, **acc, "ingredients": ingredients,
          "inference_cost": cost, **provenance, **extra,
          "correct": correct}
