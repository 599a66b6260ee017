"""The one accuracy function, the task metrics built on it, and metrics as JSON lines and
TensorBoard event files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Mapping, Optional

import numpy as np


def accuracy(logits: np.ndarray, labels: np.ndarray,
             class_mask: Optional[np.ndarray] = None) -> float:
  """Top-1 accuracy: the fraction of rows whose argmax is the label.

  `class_mask` restricts the argmax to a subset of classes. Logits are scored in
  float32 whatever their dtype, so every caller scores the same numbers alike.
  """
  logits = np.asarray(logits, np.float32)
  if class_mask is not None:
    logits = np.where(np.asarray(class_mask, bool), logits, -np.inf)
  return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


def matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Matthews correlation of binary predictions (CoLA's GLUE metric); 0 when undefined."""
  return float(matthews_from_counts(*confusion(np.asarray(predictions) == np.asarray(labels),
                                               np.asarray(labels))))


def f1(predictions: np.ndarray, labels: np.ndarray) -> float:
  """F1 of the positive class (label 1), as GLUE scores MRPC and QQP."""
  return float(f1_from_counts(*confusion(np.asarray(predictions) == np.asarray(labels),
                                         np.asarray(labels))))


def confusion(correct, labels, axis: int = -1):
  """(tp, tn, fp, fn) of binary predictions from per-example correctness and labels: a
  prediction is its label when correct, the other class when not. Vectorised over rows
  of `correct`/`labels` (the bootstrap's resamples)."""
  correct, positive = np.asarray(correct, bool), np.asarray(labels) == 1
  tp = np.sum(correct & positive, axis=axis)
  tn = np.sum(correct & ~positive, axis=axis)
  fn = np.sum(~correct & positive, axis=axis)
  fp = np.sum(~correct & ~positive, axis=axis)
  return tp, tn, fp, fn


def matthews_from_counts(tp, tn, fp, fn):
  tp, tn, fp, fn = (np.asarray(x, np.float64) for x in (tp, tn, fp, fn))
  denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denominator > 0, (tp * tn - fp * fn) / np.where(denominator > 0,
                                                                     denominator, 1), 0.0)


def f1_from_counts(tp, tn, fp, fn):
  del tn
  tp, fp, fn = (np.asarray(x, np.float64) for x in (tp, fp, fn))
  denominator = 2 * tp + fp + fn
  return np.where(denominator > 0, 2 * tp / np.where(denominator > 0, denominator, 1), 0.0)


# name -> score of (per-example correctness, labels), vectorised over resample rows. Matthews
# and F1 read binary labels (a prediction is recovered from its correctness and label).
# "accuracy_f1" is GLUE's MRPC/QQP score: the mean of accuracy and F1.
METRICS = {
    "accuracy": lambda correct, labels, axis=-1: np.mean(np.asarray(correct, np.float64),
                                                         axis=axis),
    "matthews": lambda correct, labels, axis=-1: matthews_from_counts(
        *confusion(correct, labels, axis)),
    "accuracy_f1": lambda correct, labels, axis=-1: 0.5 * (
        np.mean(np.asarray(correct, np.float64), axis=axis)
        + f1_from_counts(*confusion(correct, labels, axis))),
}
# What the report calls each metric.
METRIC_NAMES = {"accuracy": "accuracy", "matthews": "Matthews correlation",
                "accuracy_f1": "mean of accuracy and F1"}


def score(metric: str, logits: np.ndarray, labels: np.ndarray) -> float:
  """The split's metric of argmax predictions (accuracy, or a binary GLUE metric)."""
  if metric not in METRICS:
    raise ValueError(f"Unknown metric {metric!r}; use one of {', '.join(METRICS)}.")
  correct = np.argmax(np.asarray(logits, np.float32), axis=-1) == np.asarray(labels)
  return float(METRICS[metric](correct, labels))


class MetricWriter:
  """Appends {"step", "time", **scalars} to TensorBoard and to the JSON lines file
  `jsonl_name` in logdir (soup.layout.METRICS_LOG names the run's)."""

  def __init__(self, logdir: str | os.PathLike, jsonl_name: str, tensorboard: bool = True):
    self.logdir = Path(logdir)
    self.logdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(self.logdir / jsonl_name, "a")  # soup.layout names it.
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(self.logdir))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
