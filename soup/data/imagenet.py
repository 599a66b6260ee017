"""ImageNet and its five distribution shifts, streamed from TFDS without TensorFlow.

Splits (result column: source):
  ImageNet2p      imagenet2012 train, the 26,000 held-out images (imagenet_heldout.py),
                  decoded once and kept in memory (config.data.heldout_in_memory)
  ImageNet        imagenet2012 validation (50,000), the test set
  ImageNetV2      imagenet_v2/matched-frequency test (10,000)
  ImageNetSketch  imagenet_sketch test (50,889)
  ImageNetR       imagenet_r test (30,000), scored on its 200 classes
  ObjectNet       a local folder (objectnet.py), scored on its 113 classes
  ImageNetA       imagenet_a test (7,500), scored on its 200 classes
Fine-tuning uses imagenet2012 train minus the held-out images (1,255,167).

Reading. Every TFDS dataset must be prepared in the array_record format, so
that `tfds.data_source` gives random access without TensorFlow; images are
read as encoded bytes (`SkipDecoding`) and decoded here with PIL in a thread
pool (PIL releases the GIL while decoding and resizing). Evaluation splits
are streamed as ordered batches (`EvalSplit.batches`), one batch decoded
ahead, so no split sits in memory; their labels (read once, the images
skipped) are cached as .npy under config.data.cache_dir.

Preprocessing, as in the paper's code (CLIP's `preprocess` and timm):
  evaluation: resize the shorter side to image_size (bicubic), center crop;
  training with aug=None: the same (the paper's finetune.py without --timm-aug);
  training with aug="rand-mM-nN": timm's transforms_imagenet_train, i.e. a
    random-resized crop (scale 0.08-1, ratio 3/4-4/3, bilinear or bicubic),
    a horizontal flip with probability 0.5, then RandAugment (randaugment.py).
Host-side augmentation is seeded per example by (member seed, step, row), so
a batch is a pure function of (seed, step): resuming replays it exactly, and
which thread or host decodes a row does not matter. Normalization (CLIP
mean/std, or [-1, 1] for big_vision ViTs) runs inside jit (`preprocess`);
`augment` in jit is the identity.

Multi-host. `finetune_batch` returns the global batch as full-size arrays,
but each process decodes only the rows its own devices hold in the trainer's
1-D data mesh (soup/mesh.py; rows found from the same sharding), leaving the
others zero: `mesh.global_batch` builds the global array from each process's
addressable rows only, so those zeros are never read. Decoding work thus
splits evenly over hosts. Evaluation batches are decoded in full on every
host (the learned soup needs the held-out images on each host); labels and
caches are per host.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from soup import results
from soup.data import imagenet_heldout, objectnet, randaugment
from soup.data.task import EvalSplit, Task

log = logging.getLogger(__name__)

NUM_CLASSES = 1000
# OpenAI CLIP's RGB statistics (soup.models.clip.OPENAI_MEAN / OPENAI_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALIZATIONS = {"clip": (CLIP_MEAN, CLIP_STD), "inception": ((0.5,) * 3, (0.5,) * 3)}

# ImageNet-R and ImageNet-A: their 200 classes, as ImageNet labels (sorted wnid order,
# the order of TFDS's imagenet2012 labels.txt). From the authors' code (wise-ft
# src/datasets/imagenet_r.py and imagenet_a.py, CLASS_SUBLIST); the wnids are
# IMAGENET_R_WNIDS / IMAGENET_A_WNIDS below. Label k of these splits is class
# CLASS_SUBLIST[k]: the order of their 200 folders, sorted by wnid.
IMAGENET_R_CLASSES = (
    1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47, 63, 71, 76, 79, 84, 90, 94, 96, 97, 99,
    100, 105, 107, 113, 122, 125, 130, 132, 144, 145, 147, 148, 150, 151, 155, 160, 161, 162, 163,
    171, 172, 178, 187, 195, 199, 203, 207, 208, 219, 231, 232, 234, 235, 242, 245, 247, 250, 251,
    254, 259, 260, 263, 265, 267, 269, 276, 277, 281, 288, 289, 291, 292, 293, 296, 299, 301, 308,
    309, 310, 311, 314, 315, 319, 323, 327, 330, 334, 335, 337, 338, 340, 341, 344, 347, 353, 355,
    361, 362, 365, 366, 367, 368, 372, 388, 390, 393, 397, 401, 407, 413, 414, 425, 428, 430, 435,
    437, 441, 447, 448, 457, 462, 463, 469, 470, 471, 472, 476, 483, 487, 515, 546, 555, 558, 570,
    579, 583, 587, 593, 594, 596, 609, 613, 617, 621, 629, 637, 657, 658, 701, 717, 724, 763, 768,
    774, 776, 779, 780, 787, 805, 812, 815, 820, 824, 833, 847, 852, 866, 875, 883, 889, 895, 907,
    928, 931, 932, 933, 934, 936, 937, 943, 945, 947, 948, 949, 951, 953, 954, 957, 963, 965, 967,
    980, 981, 983, 988)
IMAGENET_A_CLASSES = (
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89, 90, 94, 96, 97,
    99, 105, 107, 108, 110, 113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234, 235, 254, 277,
    283, 287, 291, 295, 298, 301, 306, 307, 308, 309, 310, 311, 313, 314, 315, 317, 319, 323, 324,
    326, 327, 330, 334, 335, 336, 347, 361, 363, 372, 378, 386, 397, 400, 401, 402, 404, 407, 411,
    416, 417, 420, 425, 428, 430, 437, 438, 445, 456, 457, 461, 462, 470, 472, 483, 486, 488, 492,
    496, 514, 516, 528, 530, 539, 542, 543, 549, 552, 557, 561, 562, 569, 572, 573, 575, 579, 589,
    606, 607, 609, 614, 626, 627, 640, 641, 642, 643, 658, 668, 677, 682, 684, 687, 701, 704, 719,
    736, 746, 749, 752, 758, 763, 765, 768, 773, 774, 776, 779, 780, 786, 792, 797, 802, 803, 804,
    813, 815, 820, 823, 831, 833, 835, 839, 845, 847, 850, 859, 862, 870, 879, 880, 888, 890, 897,
    900, 907, 913, 924, 932, 933, 934, 937, 943, 945, 947, 951, 954, 956, 957, 959, 971, 972, 980,
    981, 984, 986, 987, 988)


@functools.lru_cache(maxsize=None)
def imagenet_wnids() -> tuple[str, ...]:
  """The 1000 wnids in label order, from TFDS's own imagenet2012 labels.txt."""
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common
  return tuple(Path(imagenet_common.label_names_file()).read_text().split())


def subset_wnids(classes: Sequence[int]) -> tuple[str, ...]:
  """wnids of a 200-class subset, e.g. subset_wnids(IMAGENET_R_CLASSES)[0] == 'n01443537'."""
  wnids = imagenet_wnids()
  return tuple(wnids[c] for c in classes)


# --- Datasets: where they come from and how to prepare them ---------------

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


class DatasetMissingError(FileNotFoundError):
  """A dataset is not prepared where the config says; the message says how to prepare it."""


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def _missing_message(column: str, name: str, data_dir: str, why: str) -> str:
  _, _, args, note = DATASETS[column]
  return (f"{column}: TFDS {name} {why} in {data_dir}. Prepare it once with `tfds build {name} "
          f"--data_dir={data_dir} --file_format=array_record{args}`" + (f" ({note})" if note else "")
          + "; building needs `pip install tensorflow` on that machine, reading here does not.")


def open_tfds(column: str, data_dir: str, name: Optional[str] = None):
  """The array_record data source of a column's TFDS split, images left encoded.

  Raises DatasetMissingError (saying how to prepare it) when the dataset is
  not prepared in data_dir, lacks the split, or was prepared as tfrecord.
  """
  import tensorflow_datasets as tfds

  name = name or DATASETS[column][0]
  split = DATASETS[column][1]
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # Unknown config, unreadable metadata...
    raise DatasetMissingError(_missing_message(column, name, data_dir, f"cannot be opened ({e})")) from e
  if not builder.is_prepared():
    raise DatasetMissingError(_missing_message(column, name, data_dir, "is not prepared"))
  if split not in builder.info.splits:
    raise DatasetMissingError(_missing_message(column, name, data_dir, f"has no {split!r} split"))
  file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
  if file_format != "array_record":
    raise DatasetMissingError(_missing_message(
        column, name, data_dir, f"is prepared as {file_format}, which needs TensorFlow to read"))
  return builder, builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})


# --- Image transforms (host side, PIL) ------------------------------------


def decode_rgb(data: bytes) -> Image.Image:
  with Image.open(io.BytesIO(data)) as img:
    return img.convert("RGB")


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
  """torchvision Resize(size, BICUBIC): shorter side to size, longer side truncated."""
  w, h = img.size
  if w <= h:
    new = (size, int(size * h / w))
  else:
    new = (int(size * w / h), size)
  return img if new == (w, h) else img.resize(new, Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
  """torchvision CenterCrop (images here are never smaller than size)."""
  w, h = img.size
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return img.crop((left, top, left + size, top + size))


def eval_transform(img: Image.Image, size: int) -> np.ndarray:
  """CLIP's evaluation preprocessing, up to normalization: uint8 [size, size, 3]."""
  return np.asarray(center_crop(resize_shorter_side(img, size), size), np.uint8)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision RandomResizedCrop.get_params: (left, top, w, h), 10 tries then a center crop."""
  area = width * height
  log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(*log_ratio))
    w = int(round(np.sqrt(target * aspect)))
    h = int(round(np.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def train_transform(img: Image.Image, size: int, rng: np.random.Generator,
                    augment: Optional[randaugment.RandAugment]) -> np.ndarray:
  """aug None: eval preprocessing; else timm's crop, flip and RandAugment."""
  if augment is None:
    return eval_transform(img, size)
  left, top, w, h = random_resized_crop_box(*img.size, rng)
  resample = (Image.BILINEAR, Image.BICUBIC)[int(rng.integers(2))]
  img = img.resize((size, size), resample, box=(left, top, left + w, top + h))
  if rng.random() < 0.5:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(augment(img, rng), np.uint8)


# --- Label caching --------------------------------------------------------


def _cache_dir(config_dir: str) -> Path:
  if config_dir:
    return Path(config_dir).expanduser()
  base = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
  return Path(base) / "soup" / "labels"


def read_labels(source, indices: Optional[np.ndarray] = None, chunk: int = 2048,
                pool: Optional[concurrent.futures.Executor] = None) -> np.ndarray:
  """Labels of a data source (all, or at `indices`), reading records with images skipped."""
  indices = np.arange(len(source)) if indices is None else np.asarray(indices)
  chunks = [indices[i:i + chunk].tolist() for i in range(0, len(indices), chunk)]
  read = lambda ids: np.asarray([r["label"] for r in source.__getitems__(ids)], np.int32)
  parts = list(pool.map(read, chunks)) if pool else [read(c) for c in chunks]
  return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


class ImageNetTask(Task):
  """The Task of soup/data/task.py for ImageNet; see the module docstring."""

  columns = results.IMAGENET
  num_classes = NUM_CLASSES

  def __init__(self, data_config):
    d = data_config
    self.config = d
    self.data_dir = os.path.expanduser(d.data_dir or default_data_dir())
    self.image_size = int(d.image_size)
    if d.normalization not in NORMALIZATIONS:
      raise ValueError(f"config.data.normalization must be one of {sorted(NORMALIZATIONS)}, "
                       f"got {d.normalization!r}.")
    mean, std = NORMALIZATIONS[d.normalization]
    self._mean, self._std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    self.fill = tuple(min(255, round(255 * m)) for m in mean)  # timm's img_mean.
    self.pool = concurrent.futures.ThreadPoolExecutor(d.num_workers or os.cpu_count() or 1)
    self._prefetch = concurrent.futures.ThreadPoolExecutor(1)      # Next eval batch.
    self._train_ahead = concurrent.futures.ThreadPoolExecutor(1)   # Next training batch.
    self._ahead = None  # (key, future) of the training batch decoded ahead.

    self.train_builder, self.train_source = open_tfds("ImageNet2p", self.data_dir)
    self.heldout = imagenet_heldout.load(os.path.expanduser(d.heldout_file) if d.heldout_file else None)
    imagenet_heldout.verify(self.heldout, num_train=len(self.train_source),
                            per_class=d.heldout_per_class, num_classes=NUM_CLASSES,
                            tfds_version=str(self.train_builder.version))
    self.finetune_idx = self.heldout.finetune_indices()
    self._eval: Optional[dict[str, EvalSplit]] = None
    self._local_rows_cache: dict[int, np.ndarray] = {}

  # --- Fine-tuning ----------------------------------------------------------

  def finetune_size(self) -> int:
    return len(self.finetune_idx)

  @functools.lru_cache(maxsize=2)
  def _epoch_order(self, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(self.finetune_size())

  def _local_rows(self, batch_size: int) -> np.ndarray:
    """Rows of a global batch held by this process's devices (all rows on one host)."""
    if batch_size not in self._local_rows_cache:
      import jax
      if jax.process_count() == 1:
        rows = np.arange(batch_size)
      else:
        from soup import mesh as mesh_lib
        sharding = mesh_lib.batch_sharding(mesh_lib.make_mesh())
        slices = sharding.addressable_devices_indices_map((batch_size,)).values()
        rows = np.unique(np.concatenate([np.arange(batch_size)[s[0]] for s in slices]))
      self._local_rows_cache[batch_size] = rows
    return self._local_rows_cache[batch_size]

  def _decode(self, source, indices: np.ndarray, transform: Callable[[int, Image.Image], np.ndarray],
              ) -> tuple[np.ndarray, np.ndarray]:
    """Images (decoded by `transform(position, image)` in the pool) and labels of records."""
    records = source.__getitems__(np.asarray(indices).tolist()) if len(indices) else []
    images = list(self.pool.map(lambda a: transform(a[0], decode_rgb(a[1]["image"])),
                                enumerate(records)))
    shape = (len(records), self.image_size, self.image_size, 3)
    return (np.stack(images) if images else np.zeros(shape, np.uint8),
            np.asarray([r["label"] for r in records], np.int32))

  def batch_positions(self, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Positions in the fine-tuning split of step's batch, sorted (faster reads); each
    epoch is a permutation seeded by (seed, epoch), the last partial batch dropped."""
    from soup.data import pipeline
    per_epoch = pipeline.steps_per_epoch(self.finetune_size(), batch_size)
    epoch, index = divmod(int(step), per_epoch)
    return np.sort(self._epoch_order(int(seed), epoch)[index * batch_size:(index + 1) * batch_size])

  def finetune_batch(self, batch_size: int, seed: int, step: int,
                     hparams: Optional[Mapping[str, Any]] = None) -> tuple[np.ndarray, np.ndarray]:
    """The global batch of `step` (batch_positions, as pipeline.train_batch), augmented
    per hparams["aug"]. Only this process's rows are decoded (see the module docstring).

    The trainer asks for steps in order, so the next step's batch is decoded in the
    background while the device runs this one; a different request just waits for it
    and decodes its own (the result is the same either way: batches are pure functions
    of their arguments).
    """
    aug = (hparams or {}).get("aug")
    key = (int(batch_size), int(seed), int(step), aug)
    pending, self._ahead = self._ahead, None
    if pending is not None and pending[0] == key:
      batch = pending[1].result()
    else:
      if pending is not None:  # Let it finish (unused) rather than race it for the pool.
        concurrent.futures.wait([pending[1]])
      batch = self._finetune_batch(*key)
    next_key = (key[0], key[1], key[2] + 1, aug)
    self._ahead = (next_key, self._train_ahead.submit(self._finetune_batch, *next_key))
    return batch

  def _finetune_batch(self, batch_size: int, seed: int, step: int,
                      aug: Optional[str]) -> tuple[np.ndarray, np.ndarray]:
    positions = self.batch_positions(batch_size, seed, step)
    rows = self._local_rows(batch_size)
    augment = randaugment.from_string(aug, self.fill)
    size = self.image_size

    def transform(k, img):  # Row rows[k]'s randomness depends on (seed, step, row) only.
      rng = np.random.default_rng([int(seed), int(step), int(rows[k]), 0x5EED])
      return train_transform(img, size, rng, augment)

    local_images, local_labels = self._decode(self.train_source, self.finetune_idx[positions[rows]],
                                              transform)
    images = np.zeros((batch_size, size, size, 3), np.uint8)
    labels = np.zeros((batch_size,), np.int32)
    images[rows], labels[rows] = local_images, local_labels
    return images, labels

  def finetune_examples(self, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` fine-tuning images, eval-preprocessed, the first of a fixed random order
    (seeded by config.data.split_seed): a uniform sample over classes, for the linear probe."""
    order = np.random.default_rng(self.config.split_seed).permutation(self.finetune_size())[:count]
    images, labels = [], []
    for start in range(0, len(order), 1024):
      im, lb = self._decode(self.train_source, self.finetune_idx[order[start:start + 1024]],
                            lambda k, img: eval_transform(img, self.image_size))
      images.append(im)
      labels.append(lb)
    return np.concatenate(images), np.concatenate(labels)

  # --- Evaluation -------------------------------------------------------------

  def _stream(self, read: Callable[[np.ndarray], np.ndarray], n: int
              ) -> Callable[[int], Iterator[np.ndarray]]:
    """Ordered batches of `read(positions)`, the next batch decoded while one is used."""
    def batches(batch_size: int) -> Iterator[np.ndarray]:
      starts = list(range(0, n, batch_size))
      if not starts:
        return
      submit = lambda s: self._prefetch.submit(read, np.arange(s, min(n, s + batch_size)))
      pending = submit(starts[0])
      for nxt in starts[1:] + [None]:
        batch = pending.result()
        if nxt is not None:
          pending = submit(nxt)
        yield batch
    return batches

  def _cached_labels(self, builder, source, key: str, indices: Optional[np.ndarray] = None
                     ) -> np.ndarray:
    """Labels read once and kept as .npy; the key names dataset, version, split and size."""
    ident = f"{builder.info.full_name}_{key}_{len(source)}".replace("/", "_")
    if indices is not None:
      ident += "_" + hashlib.sha1(np.asarray(indices, np.int64).tobytes()).hexdigest()[:12]
    path = _cache_dir(self.config.cache_dir) / f"{ident}.npy"
    if path.exists():
      labels = np.load(path)
      if len(labels) == (len(source) if indices is None else len(indices)):
        return labels
    log.info("reading labels of %s %s (once; cached in %s)", builder.info.full_name, key, path)
    labels = read_labels(source, indices, pool=self.pool)
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npy")
      np.save(tmp, labels)
      os.replace(tmp, path)
    except OSError as e:  # A read-only cache only costs the re-read.
      log.warning("cannot cache labels in %s: %s", path, e)
    return labels

  def _tfds_split(self, column: str, builder, source, indices: Optional[np.ndarray] = None,
                  classes: Optional[Sequence[int]] = None) -> EvalSplit:
    """An EvalSplit over a TFDS split (or its records at `indices`), optionally scored on a
    class subset: labels become positions in `classes`, logits are restricted to them."""
    labels = self._cached_labels(builder, source, DATASETS[column][1], indices)
    records = np.arange(len(source)) if indices is None else np.asarray(indices)
    size = self.image_size
    read = lambda pos: self._decode(source, records[pos], lambda k, img: eval_transform(img, size))[0]
    logits_map = None
    if classes is not None:
      classes = np.asarray(classes)
      outside = ~np.isin(labels, classes)
      if outside.any():
        raise ValueError(f"{column}: {int(outside.sum())} labels outside its {len(classes)} classes.")
      labels = np.searchsorted(classes, labels).astype(np.int32)
      logits_map = functools.partial(_take_classes, classes=classes)
    return EvalSplit(labels=labels, batches=self._stream(read, len(labels)), logits_map=logits_map)

  def _objectnet_split(self) -> EvalSplit:
    mapping = objectnet.load_mapping()
    paths, labels = objectnet.list_images(self.config.objectnet_dir, mapping)
    size = self.image_size

    def read(pos):
      return np.stack(list(self.pool.map(
          lambda i: eval_transform(objectnet.load_image(paths[i]), size), pos)))

    return EvalSplit(labels=labels, batches=self._stream(read, len(labels)),
                     logits_map=mapping.logits)

  def _heldout_split(self) -> EvalSplit:
    labels = self._cached_labels(self.train_builder, self.train_source, "train", self.heldout.indices)
    if not np.array_equal(labels, self.heldout.labels):
      raise imagenet_heldout.HeldOutError(
          "The held-out list's labels differ from the dataset's at its indices: it was made from "
          f"another preparation of imagenet2012. Remake it with `{imagenet_heldout.MAKE_COMMAND}`.")
    split = self._tfds_split("ImageNet2p", self.train_builder, self.train_source, self.heldout.indices)
    if not self.config.heldout_in_memory:
      return split
    # Selection reads the held-out set once per candidate (greedy soup: 72 times) and the
    # learned soups need it whole: decode its 26,000 images once (3.9 GB at 224 px).
    log.info("decoding the %d held-out images into memory", len(split))
    images = np.concatenate(list(split.iterate(1024)))
    return EvalSplit(labels=split.labels, images=images)

  def eval_splits(self) -> dict[str, EvalSplit]:
    """Column -> EvalSplit in results.IMAGENET order; all missing datasets are reported at once."""
    if self._eval is None:
      makers, missing = {}, []
      for column in self.columns.all:
        try:
          if column == "ImageNet2p":
            makers[column] = self._heldout_split
          elif column == "ObjectNet":
            objectnet.images_dir(self.config.objectnet_dir)
            makers[column] = self._objectnet_split
          else:
            name = f"imagenet_v2/{self.config.imagenet_v2_variant}" if column == "ImageNetV2" else None
            builder, source = open_tfds(column, self.data_dir, name)
            classes = {"ImageNetR": IMAGENET_R_CLASSES, "ImageNetA": IMAGENET_A_CLASSES}.get(column)
            makers[column] = functools.partial(self._tfds_split, column, builder, source, None, classes)
        except (DatasetMissingError, objectnet.ObjectNetMissingError) as e:
          missing.append(str(e))
      if missing:
        raise DatasetMissingError("Evaluation data missing:\n  " + "\n  ".join(missing))
      self._eval = {column: make() for column, make in makers.items()}
    return self._eval

  # --- In jit -----------------------------------------------------------------

  def preprocess(self, images):
    """uint8 [..., 3] -> float32 normalized with the model's mean/std (CLIP's by default)."""
    import jax.numpy as jnp
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(self._mean)) / jnp.asarray(self._std)

  def augment(self, rng, images, strength):
    return images  # Augmentation is host-side (finetune_batch).


def _take_classes(logits: np.ndarray, classes: np.ndarray) -> np.ndarray:
  """ImageNet-R/A scoring: the logits of their 200 classes, in their label order."""
  return np.asarray(logits)[:, classes]
