"""The result columns of a dataset: which hold the held-out, test and shift splits.

A plain dataclass with no imports, so the dataset registry (soup/data/registry.py), which
declares each dataset's columns, and soup/results.py, which reads them, share it without a cycle.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Columns:
  """Which columns are the held-out, test and shift splits, and the metric they hold
  (soup.metrics.METRICS: accuracy, or a GLUE task's own). A task without distribution
  shifts (GLUE) has none."""

  held_out: str
  test: str
  shifts: tuple[str, ...]
  metric: str = "accuracy"

  @property
  def all(self) -> tuple[str, ...]:
    return (self.held_out, self.test, *self.shifts)
