"""Metrics as JSON lines and TensorBoard event files, side by side."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Mapping


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
