"""GLUE's tasks, each declared once: its folder, how its TSV columns are read, its labels, its
metric and its result columns.

Plain data with no jax, so the dataset registry (soup/data/registry.py) and the report read
the tasks' columns cheaply; soup/data/glue.py reads and tokenizes the files.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from soup.columns import Columns


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """One GLUE task: where its files are and how a row becomes (text_a, text_b, label).

  `text_columns` and `label_column` are header names, or integer positions for CoLA,
  whose files have no header. `labels` maps the file's label strings to class indices.
  """
  folder: str
  column_prefix: str                  # The results' column names: <prefix>HeldOut, <prefix>Dev.
  text_columns: tuple                 # One column (single sentence) or two (a pair).
  label_column: Any
  labels: Mapping[str, int]
  metric: str                         # soup.metrics.METRICS: the GLUE metric of the task.
  header: bool = True
  dev_file: str = "dev.tsv"

  @property
  def columns(self) -> Columns:
    """Its held-out sample of train and its dev set; GLUE has no distribution shifts."""
    return Columns(f"{self.column_prefix}HeldOut", f"{self.column_prefix}Dev", (), self.metric)


BINARY = {"0": 0, "1": 1}
ENTAILMENT = {"entailment": 0, "not_entailment": 1}  # As GLUE's and HF datasets' label ids.

GLUE_TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask("SST-2", "SST2", ("sentence",), "label", BINARY, "accuracy"),
    "rte": GlueTask("RTE", "RTE", ("sentence1", "sentence2"), "label", ENTAILMENT, "accuracy"),
    # No header: source, label, original judgement, sentence.
    "cola": GlueTask("CoLA", "CoLA", (3,), 1, BINARY, "matthews", header=False),
    "mrpc": GlueTask("MRPC", "MRPC", ("#1 String", "#2 String"), "Quality", BINARY,
                     "accuracy_f1"),
    "qnli": GlueTask("QNLI", "QNLI", ("question", "sentence"), "label", ENTAILMENT, "accuracy"),
    "qqp": GlueTask("QQP", "QQP", ("question1", "question2"), "is_duplicate", BINARY,
                    "accuracy_f1"),
    "wnli": GlueTask("WNLI", "WNLI", ("sentence1", "sentence2"), "label", BINARY, "accuracy"),
}


class GlueDataError(ValueError):
  """A GLUE folder or file is missing or malformed; the message names the fix."""


def task_spec(name: str) -> GlueTask:
  if name not in GLUE_TASKS:
    raise GlueDataError(f"config.data.task={name!r} is not a GLUE task this project reads; use "
                        f"one of {', '.join(GLUE_TASKS)}.")
  return GLUE_TASKS[name]
