"""The one accuracy function, and metrics as JSON lines and TensorBoard event files."""

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


class MetricWriter:
  """Appends {"step", "time", **scalars} to metrics.jsonl and TensorBoard."""

  def __init__(self, logdir: str | os.PathLike, tensorboard: bool = True):
    self.logdir = Path(logdir)
    self.logdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(self.logdir / "metrics.jsonl", "a")
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
