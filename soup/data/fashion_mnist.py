"""Fashion-MNIST, prepared offline into TFDS's own `fashion_mnist` dataset.

Debian's `dataset-fashion-mnist` package ships the four standard gzipped IDX
files. Their pixels equal the upstream files, but Debian rewrote the gzip
headers, so TFDS's registered checksums reject them as a `manual_dir`. We
therefore subclass the catalog builder (same name, version, features and
splits) and only replace where the bytes come from. Written as array_record so
that `tfds.data_source` reads it without TensorFlow.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from soup import atomic_io, results
from soup.data import batching
from soup.data.batching import Split
from soup.data.task import EvalSplit, Task

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
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


class DatasetMissingError(FileNotFoundError):
  """A dataset is not where the config says; the message says how to get it."""


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
    raise DatasetMissingError(
        f"TFDS fashion_mnist is not prepared in {data_dir}. Run "
        f"`python -m soup.data.prepare --data_dir={data_dir}` (or scripts/setup.sh). "
        f"{INSTALL_HINT}")
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


# --- The experiment's splits ----------------------------------------------

# Upstream label space: tops / bottoms and dresses / footwear / bags.
COARSE_OF_CLASS = np.array([0, 1, 0, 1, 0, 2, 0, 2, 3, 2], np.int32)
COARSE_NAMES = ("top", "bottom_or_dress", "footwear", "bag")
# Upstream label spaces (config.data.upstream_labels): class -> upstream label.
#   coarse: the 4 groups above (the weak upstream: it never separates the four tops);
#   tops_merged: the 10 classes but T-shirt/top, Pullover, Coat and Shirt as one "top" (7):
#     the upstream knows most classes, as CLIP knows most of ImageNet, and fine-tuning
#     must learn the hardest distinctions of the task;
#   fine: the 10 classes themselves (the upstream already solves the task).
UPSTREAM_LABELS = {
    "coarse": COARSE_OF_CLASS,
    "tops_merged": np.array([0, 1, 0, 2, 0, 3, 0, 4, 5, 6], np.int32),
    "fine": np.arange(10, dtype=np.int32),
}


def experiment_splits(data_config) -> dict:
  """All splits of the Fashion-MNIST experiment, as in-memory `Split`s.

  The 60k training images are permuted once (split_seed) and cut into
  upstream | held-out | fine-tuning, disjoint; the test split and its five
  shifts come from the 10k test images. Returns
  {"upstream", "held_out", "finetune", "test", "shifts": {name: Split}}.
  """
  from soup.data import shifts as shifts_lib

  d = data_config
  arrays = load_arrays(d.data_dir or None) if _is_prepared(d.data_dir or None) else None
  if arrays is None:
    raise DatasetMissingError(
        f"TFDS fashion_mnist is not prepared in {d.data_dir or default_data_dir()}. Run "
        "`python -m soup.data.prepare` (or scripts/setup.sh) first. " + INSTALL_HINT)
  train_images, train_labels = arrays["train"]
  test_images, test_labels = arrays["test"]
  need = d.upstream_examples + d.held_out_examples + d.finetune_examples
  if need > len(train_labels):
    raise ValueError(f"upstream + held_out + finetune examples = {need} > {len(train_labels)}.")
  order = np.random.default_rng(d.split_seed).permutation(len(train_labels))
  # Held-out and fine-tuning come first, so an upstream of another size (an ablation)
  # leaves them, and so every comparison, on the same images.
  a, b = d.held_out_examples, d.held_out_examples + d.finetune_examples
  held_idx, ft_idx, upstream_idx = order[:a], order[a:b], order[b:b + d.upstream_examples]
  train = Split(train_images, train_labels.astype(np.int32))
  # A self-supervised upstream reads no labels, so it may see the fine-tuning images too,
  # as CLIP's web images overlap ImageNet's kind of image; held-out and test never.
  seen = np.concatenate([ft_idx, upstream_idx]) if d.get("upstream_includes_finetune") \
      else upstream_idx
  upstream = train.take(np.sort(seen))
  labels = d.get("upstream_labels", "coarse")
  if labels not in UPSTREAM_LABELS:
    raise ValueError(f"config.data.upstream_labels={labels!r}: use one of "
                     f"{', '.join(UPSTREAM_LABELS)}.")
  images = upstream.images
  if d.get("upstream_transform", "none") == "resample":
    images = shifts_lib.resample(images)  # Another rendition upstream (V2's resampling).
  elif d.get("upstream_transform", "none") != "none":
    raise ValueError(f"config.data.upstream_transform={d.upstream_transform!r}: use 'none' or "
                     "'resample'.")
  upstream = Split(images, UPSTREAM_LABELS[labels][upstream.labels])
  test = Split(test_images[: d.test_examples], test_labels[: d.test_examples].astype(np.int32))
  shifts = shifts_lib.make_shifts(test.images, test.labels, train_images[upstream_idx],
                                  train_labels[upstream_idx], d.shift_examples, d.split_seed)
  return {
      "upstream": upstream,
      "held_out": train.take(np.sort(held_idx)),
      "finetune": train.take(np.sort(ft_idx)),
      "test": test,
      "shifts": {name: Split(im, lb.astype(np.int32)) for name, (im, lb) in shifts.items()},
  }


def _is_prepared(data_dir: str | None) -> bool:
  cls = _builder_class()
  return cls(data_dir=data_dir or default_data_dir(), file_format="array_record").is_prepared()


# --- Normalization and augmentation (inside the jitted train step) ---------


def normalize(images: jax.Array) -> jax.Array:
  """uint8 -> float32 roughly zero-mean, unit-variance (Fashion-MNIST stats)."""
  return (images.astype(jnp.float32) / 255.0 - 0.286) / 0.353


def augment(rng: jax.Array, images: jax.Array, strength: jax.Array) -> jax.Array:
  """Random translation, horizontal flip and contrast jitter, scaled by strength in [0, 1].

  strength 0 is the identity. Max shift 4 px, flip probability 0.5, contrast
  factor in [1 - 0.4 s, 1 + 0.4 s]; shapes are static so one compile serves
  every member of the sweep.
  """
  n, h, w, c = images.shape
  x = images.astype(jnp.float32)
  k_shift, k_flip, k_contrast = jax.random.split(rng, 3)
  pad = 4
  shifts = jnp.round(jax.random.uniform(k_shift, (n, 2), minval=-pad, maxval=pad) * strength)
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  starts = (pad - shifts).astype(jnp.int32)
  x = jax.vmap(lambda im, s: jax.lax.dynamic_slice(im, (s[0], s[1], 0), (h, w, c)))(padded, starts)
  flip = jax.random.uniform(k_flip, (n, 1, 1, 1)) < 0.5 * (strength > 0)
  x = jnp.where(flip, x[:, :, ::-1], x)
  factor = 1 + 0.4 * strength * jax.random.uniform(k_contrast, (n, 1, 1, 1), minval=-1, maxval=1)
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return jnp.clip(mean + factor * (x - mean), 0, 255)


class FashionMNISTTask(Task):
  """The embedded default: every split in memory, augmentation on device."""

  columns = results.FASHION_MNIST
  num_classes = 10

  def provenance(self) -> dict:
    """No data provenance fields: the splits are fixed by config.data (see Task.provenance)."""
    return {}

  def __init__(self, data_config):
    self.splits = experiment_splits(data_config)
    self.upstream = self.splits["upstream"]
    c = self.columns
    evals = {c.held_out: self.splits["held_out"], c.test: self.splits["test"]}
    evals.update({col: self.splits["shifts"][col.removeprefix("FashionMNIST")] for col in c.shifts})
    self._eval = {col: EvalSplit(labels=s.labels, images=s.images) for col, s in evals.items()}

  def finetune_size(self) -> int:
    return len(self.splits["finetune"])

  def finetune_batch(self, batch_size, seed, step, hparams=None):
    return batching.train_batch(self.splits["finetune"], batch_size, seed, step)

  def finetune_examples(self, count):
    split = self.splits["finetune"]
    return split.images[:count], split.labels[:count]

  def eval_splits(self):
    return self._eval

  def preprocess(self, images):
    return normalize(images)

  def augment(self, rng, images, strength):
    return augment(rng, images, strength)
