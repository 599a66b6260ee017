"""The datasets a config may name (config.data.name), each declared once.

An entry says how to build the dataset's Task (soup/data/task.py), which result
columns it fills, and what the config check must find on disk before compute.
The Task classes are imported when a task is built: the config check reads this
registry and must stay quick, and soup/results.py (the report, with no jax)
reads the columns here: this is the one place that declares them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Optional

from soup import layout
from soup.columns import Columns
from soup.data import fashion_mnist_tfds, glue_tasks


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
  """One dataset.

  Attributes:
    task: data_config -> its Task, reading the data (slow: seconds to minutes).
    columns: the result columns its splits fill (with their metric), or data_config -> them
      for a dataset of several tasks (GLUE: config.data.task).
    missing: (data_config, stages) -> what the stages would read but is not on disk, as a
      message naming the fix, or None. Reads no data.
    every_columns: for a dataset of several tasks, () -> the columns of each, in order (what
      results.detect_columns tries); one set of columns needs none.
  """
  task: Callable[[Any], Any]
  columns: Columns | Callable[[Any], Columns]
  missing: Callable[[Any, tuple[str, ...]], Optional[str]]
  every_columns: Optional[Callable[[], tuple[Columns, ...]]] = None

  def columns_of(self, data_config) -> Columns:
    return self.columns if isinstance(self.columns, Columns) else self.columns(data_config)

  def all_columns(self) -> tuple[Columns, ...]:
    return (self.columns,) if isinstance(self.columns, Columns) else self.every_columns()


# The paper's ImageNet columns (its released results' names) and Fashion-MNIST's analogs.
IMAGENET = Columns("ImageNet2p", "ImageNet",
                   ("ImageNetV2", "ImageNetSketch", "ImageNetR", "ObjectNet", "ImageNetA"))
FASHION_MNIST = Columns("FashionMNISTHeldOut", "FashionMNIST",
                        ("FashionMNISTV2", "FashionMNISTSketch", "FashionMNISTR",
                         "FashionMNISTObjectNet", "FashionMNISTA"))


def _path(value: str) -> Path:
  return Path(os.path.expanduser(value))


def _fashion_mnist_task(data_config):
  from soup.data.fashion_mnist import FashionMNISTTask
  return FashionMNISTTask(data_config, FASHION_MNIST)


def _fashion_mnist_missing(data_config, stages) -> Optional[str]:
  del stages  # Every stage reads the splits.
  tfds_dir = _path(data_config.data_dir or fashion_mnist_tfds.default_data_dir())
  if not (tfds_dir / "fashion_mnist").is_dir():
    return fashion_mnist_tfds.not_prepared_message(tfds_dir)
  return None


def _imagenet_task(data_config):
  from soup.data.imagenet import ImageNetTask
  return ImageNetTask(data_config, IMAGENET)


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


def _glue_columns(data_config) -> Columns:
  return glue_tasks.task_spec(data_config.task).columns


def _every_glue_columns() -> tuple[Columns, ...]:
  return tuple(task.columns for task in glue_tasks.GLUE_TASKS.values())


def _glue_missing(data_config, stages) -> Optional[str]:
  del stages  # Every stage reads the task's splits.
  from soup.data import glue
  return glue.missing_message(data_config)


DATASETS: dict[str, DatasetEntry] = {
    "fashion_mnist": DatasetEntry(_fashion_mnist_task, FASHION_MNIST, _fashion_mnist_missing),
    "imagenet": DatasetEntry(_imagenet_task, IMAGENET, _imagenet_missing),
    # GLUE's text tasks (config.data.task: sst2, rte, cola, ...; soup/data/glue_tasks.py).
    "glue": DatasetEntry(_glue_task, _glue_columns, _glue_missing, _every_glue_columns),
}


class UnknownDatasetError(ValueError):
  """config.data.name names no registered dataset."""


def get(name: str) -> DatasetEntry:
  """The entry of config.data.name; an unknown name is refused with the registered ones."""
  if name not in DATASETS:
    raise UnknownDatasetError(f"config.data.name={name!r} is unknown; use one of "
                              f"{', '.join(DATASETS)}.")
  return DATASETS[name]


def known_columns() -> tuple[Columns, ...]:
  """Every dataset's columns (each GLUE task's), the paper's ImageNet first: the results
  readers tell a file's dataset from them."""
  every = [c for entry in DATASETS.values() for c in entry.all_columns()]
  return (IMAGENET, *(c for c in every if c != IMAGENET))


def column_presets() -> dict[str, Columns]:
  """The datasets of one set of columns, by name: the report's --columns choices."""
  return {name: entry.columns for name, entry in DATASETS.items()
          if isinstance(entry.columns, Columns)}
