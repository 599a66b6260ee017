"""Opening the prepared TFDS datasets and reading their labels, without TensorFlow.

Shared by the ImageNet task (imagenet.py) and the held-out list
(imagenet_heldout.py), so neither imports the other.

Every TFDS dataset must be prepared in the array_record format, so that
`tfds.data_source` gives random access without TensorFlow; images are read as
encoded bytes (`SkipDecoding`) and decoded by the input pipeline.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from pathlib import Path
from typing import Optional

import numpy as np

from soup.data import DatasetMissingError

DATASETS = {
    # column: (TFDS name, split, extra `tfds build` arguments, note)
    "ImageNet2p": ("imagenet2012", "train", " --manual_dir=DIR",
                   "DIR holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, downloaded "
                   "from https://image-net.org after registering"),
    "ImageNet": ("imagenet2012", "validation", " --manual_dir=DIR", "as for ImageNet2p"),
    "ImageNetV2": ("imagenet_v2/matched-frequency", "test", "", ""),
    "ImageNetSketch": ("imagenet_sketch", "test", "",
                       "if its Google Drive download fails, put the archive in "
                       "<data_dir>/downloads/manual and retry"),
    "ImageNetR": ("imagenet_r", "test", "", ""),
    "ImageNetA": ("imagenet_a", "test", "", ""),
}


@functools.lru_cache(maxsize=None)
def imagenet_wnids() -> tuple[str, ...]:
  """The 1000 wnids in label order, from TFDS's own imagenet2012 labels.txt."""
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common
  return tuple(Path(imagenet_common.label_names_file()).read_text().split())


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def _missing_message(column: str, name: str, data_dir: str, why: str) -> str:
  _, _, args, note = DATASETS[column]
  return (f"{column}: TFDS {name} {why} in {data_dir}. Prepare it once with `tfds build {name} "
          f"--data_dir={data_dir} --file_format=array_record{args}`"
          + (f" ({note})" if note else "")
          + "; building needs `pip install tensorflow` on that machine, reading here does not.")


def open_tfds(column: str, data_dir: str, name: Optional[str] = None):
  """(builder, data source) of a column's TFDS split, images left encoded.

  Raises DatasetMissingError (saying how to prepare it) when the dataset is
  not prepared in data_dir, lacks the split, or was prepared as tfrecord.
  """
  import tensorflow_datasets as tfds

  name = name or DATASETS[column][0]
  split = DATASETS[column][1]
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # Unknown config, unreadable metadata...
    raise DatasetMissingError(
        _missing_message(column, name, data_dir, f"cannot be opened ({e})")) from e
  if not builder.is_prepared():
    raise DatasetMissingError(_missing_message(column, name, data_dir, "is not prepared"))
  if split not in builder.info.splits:
    raise DatasetMissingError(_missing_message(column, name, data_dir, f"has no {split!r} split"))
  file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
  if file_format != "array_record":
    raise DatasetMissingError(_missing_message(
        column, name, data_dir, f"is prepared as {file_format}, which needs TensorFlow to read"))
  decoders = {"image": tfds.decode.SkipDecoding()}
  return builder, builder.as_data_source(split=split, decoders=decoders)


def read_fields(source, fields: tuple[str, ...], indices: Optional[np.ndarray] = None,
                chunk: int = 2048, pool: Optional[concurrent.futures.Executor] = None
                ) -> list[list]:
  """Values of `fields` of a data source's records (all, or at `indices`), in order."""
  indices = np.arange(len(source)) if indices is None else np.asarray(indices)
  chunks = [indices[i:i + chunk].tolist() for i in range(0, len(indices), chunk)]
  read = lambda ids: [[r[f] for r in source.__getitems__(ids)] for f in fields]
  parts = list(pool.map(read, chunks)) if pool else [read(c) for c in chunks]
  return [[v for part in parts for v in part[k]] for k in range(len(fields))]


def read_labels(source, indices: Optional[np.ndarray] = None, chunk: int = 2048,
                pool: Optional[concurrent.futures.Executor] = None) -> np.ndarray:
  """Labels of a data source (all, or at `indices`), reading records with images skipped."""
  (labels,) = read_fields(source, ("label",), indices, chunk, pool)
  return np.asarray(labels, np.int32).reshape(-1)
