"""Fashion-MNIST, prepared offline into TFDS's own `fashion_mnist` dataset, and read back.

Debian's `dataset-fashion-mnist` package ships the four standard gzipped IDX
files. Their pixels equal the upstream files, but Debian rewrote the gzip
headers, so TFDS's registered checksums reject them as a `manual_dir`. We
therefore subclass the catalog builder (same name, version, features and
splits) and only replace where the bytes come from. Written as array_record so
that `tfds.data_source` reads it without TensorFlow.

The experiment's splits of these arrays are soup/data/fashion_mnist_splits.py; the
task (normalization, augmentation) is soup/data/fashion_mnist.py.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from soup import atomic_io
from soup.data import DatasetMissingError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = (
    "Install Debian's package with `apt-get install -y dataset-fashion-mnist` "
    "(or run scripts/setup.sh), or pass --config.data.idx_dir=DIR holding "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz."
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def read_idx(path: Path) -> np.ndarray:
  """Reads a (gzipped) IDX file into a uint8 array of its declared shape."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  magic = int.from_bytes(data[0:4], "big")
  if magic >> 8 != 0x08:  # 0x08: unsigned byte payload.
    raise ValueError(f"{path} is not a uint8 IDX file (magic {magic:#x}).")
  ndim = magic & 0xFF
  shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
  if payload.size != int(np.prod(shape)):
    raise ValueError(f"{path} is truncated: {payload.size} bytes for shape {shape}.")
  return payload.reshape(shape)


def check_idx_files(idx_dir: Path) -> None:
  missing = [n for pair in _FILES.values() for n in pair if not (idx_dir / n).exists()]
  if missing:
    raise DatasetMissingError(
        f"Fashion-MNIST IDX files missing in {idx_dir}: {missing}. {INSTALL_HINT}")


def _builder_class():
  import PIL.Image
  import tensorflow_datasets as tfds
  from tensorflow_datasets.image_classification import mnist

  class LocalFashionMNIST(mnist.FashionMNIST, skip_registration=True):
    """The catalog's fashion_mnist, reading local IDX files instead of downloading."""

    name = "fashion_mnist"
    idx_dir = DEBIAN_DIR

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing is downloaded.
      return [
          tfds.core.SplitGenerator(name=split, gen_kwargs=dict(split=split))
          for split in ("train", "test")
      ]

    def _generate_examples(self, split):
      images = read_idx(self.idx_dir / _FILES[split][0])[..., None]
      labels = read_idx(self.idx_dir / _FILES[split][1]).astype(np.int64)
      for index, (image, label) in enumerate(zip(images, labels)):
        # A PIL image is PNG-encoded by Pillow; a numpy one would need TensorFlow.
        yield index, {"image": PIL.Image.fromarray(image[..., 0], mode="L"), "label": label}

  return LocalFashionMNIST


def prepare(data_dir: str | None = None, idx_dir: str | Path = DEBIAN_DIR) -> str:
  """Prepares TFDS `fashion_mnist` (array_record) in data_dir; no-op if done."""
  data_dir = data_dir or default_data_dir()
  idx_dir = Path(idx_dir)
  cls = _builder_class()
  builder = cls(data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    return builder.data_dir
  check_idx_files(idx_dir)
  cls.idx_dir = idx_dir
  builder.download_and_prepare()
  return builder.data_dir


def not_prepared_message(data_dir: str | os.PathLike) -> str:
  """What to run when TFDS fashion_mnist is not prepared in data_dir (the one wording)."""
  return (f"TFDS fashion_mnist is not prepared in {data_dir}. Run `python -m soup.data.prepare "
          f"--data_dir={data_dir}` (or scripts/setup.sh), or set --config.data.data_dir. "
          f"{INSTALL_HINT}")


def load_arrays(data_dir: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Reads both splits through `tfds.data_source` into memory, once.

  Per-example reading runs at a few thousand examples/s, slower than training
  the tiny ViT, so the arrays are cached as .npz beside the TFDS files (the
  cache is rebuilt if missing; TFDS stays the source of truth).
  """
  import tensorflow_datasets as tfds

  data_dir = data_dir or default_data_dir()
  cls = _builder_class()
  builder = cls(data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    raise DatasetMissingError(not_prepared_message(data_dir))
  cache = Path(builder.data_dir) / "in_memory_cache.npz"
  if cache.exists():
    with np.load(cache) as z:
      return {s: (z[f"{s}_images"], z[f"{s}_labels"]) for s in ("train", "test")}
  out = {}
  for split in ("train", "test"):
    source = tfds.data_source("fashion_mnist", split=split, data_dir=data_dir, builder_kwargs={})
    n = len(source)
    images = np.empty((n, 28, 28, 1), np.uint8)
    labels = np.empty((n,), np.int32)
    for start in range(0, n, 1000):
      idx = list(range(start, min(n, start + 1000)))
      for j, ex in zip(idx, source.__getitems__(idx)):
        images[j], labels[j] = ex["image"], ex["label"]
    out[split] = (images, labels)
  arrays = {f"{s}_{k}": v for s, (im, lb) in out.items()
            for k, v in (("images", im), ("labels", lb))}
  atomic_io.atomic_write(cache, lambda f: np.savez(f, **arrays), binary=True)
  return out
