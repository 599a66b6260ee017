"""The datasets a config may name (config.data.name), each declared once.

An entry says how to build the dataset's Task (soup/data/task.py), which result
columns it fills, and what the config check must find on disk before compute.
The Task classes are imported when a task is built: the config check reads this
registry and must stay quick.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Optional

from soup import layout, results
from soup.data import fashion_mnist_tfds


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
  """One dataset.

  Attributes:
    task: data_config -> its Task, reading the data (slow: seconds to minutes).
    columns: the result columns its splits fill (with their metric), or data_config -> them
      for a dataset of several tasks (GLUE: config.data.task).
    missing: (data_config, stages) -> what the stages would read but is not on disk, as a
      message naming the fix, or None. Reads no data.
  """
  task: Callable[[Any], Any]
  columns: results.Columns | Callable[[Any], results.Columns]
  missing: Callable[[Any, tuple[str, ...]], Optional[str]]

  def columns_of(self, data_config) -> results.Columns:
    return self.columns if isinstance(self.columns, results.Columns) else self.columns(data_config)


def _path(value: str) -> Path:
  return Path(os.path.expanduser(value))


def _fashion_mnist_task(data_config):
  from soup.data.fashion_mnist import FashionMNISTTask
  return FashionMNISTTask(data_config)


def _fashion_mnist_missing(data_config, stages) -> Optional[str]:
  del stages  # Every stage reads the splits.
  tfds_dir = _path(data_config.data_dir or fashion_mnist_tfds.default_data_dir())
  if not (tfds_dir / "fashion_mnist").is_dir():
    return fashion_mnist_tfds.not_prepared_message(tfds_dir)
  return None


def _imagenet_task(data_config):
  from soup.data.imagenet import ImageNetTask
  return ImageNetTask(data_config)


def _imagenet_missing(data_config, stages) -> Optional[str]:
  # ObjectNet is read only by the stages that evaluate.
  evaluates = bool(set(layout.EVAL_STAGES) & set(stages))
  for key in ("data_dir", "heldout_file", *(("objectnet_dir",) if evaluates else ())):
    value = data_config.get(key, "")
    if value and not _path(value).exists():
      return f"config.data.{key}={value!r} does not exist; fix the path (--config.data.{key}=...)."
  return None


def _glue_task(data_config):
  from soup.data.glue import GlueTextTask
  return GlueTextTask(data_config)


def _glue_columns(data_config) -> results.Columns:
  from soup.data import glue
  return glue.task_spec(data_config.task).columns


def _glue_missing(data_config, stages) -> Optional[str]:
  del stages  # Every stage reads the task's splits.
  from soup.data import glue
  return glue.missing_message(data_config)


DATASETS: dict[str, DatasetEntry] = {
    "fashion_mnist": DatasetEntry(_fashion_mnist_task, results.FASHION_MNIST,
                                  _fashion_mnist_missing),
    "imagenet": DatasetEntry(_imagenet_task, results.IMAGENET, _imagenet_missing),
    # GLUE's text tasks (config.data.task: sst2, rte, cola, ...; soup/data/glue.py).
    "glue": DatasetEntry(_glue_task, _glue_columns, _glue_missing),
}


class UnknownDatasetError(ValueError):
  """config.data.name names no registered dataset."""


def get(name: str) -> DatasetEntry:
  """The entry of config.data.name; an unknown name is refused with the registered ones."""
  if name not in DATASETS:
    raise UnknownDatasetError(f"config.data.name={name!r} is unknown; use one of "
                              f"{', '.join(DATASETS)}.")
  return DATASETS[name]
