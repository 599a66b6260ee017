"""ImageNet and its five distribution shifts, streamed from TFDS without TensorFlow.

Splits (result column: source):
  ImageNet2p      imagenet2012 train, the 26,000 held-out images (imagenet_heldout.py:
                  the official mask or our seeded list), decoded once and kept in
                  memory (config.data.heldout_in_memory)
  ImageNet        imagenet2012 validation (50,000), the test set
  ImageNetV2      imagenet_v2/matched-frequency test (10,000)
  ImageNetSketch  imagenet_sketch test (50,889)
  ImageNetR       imagenet_r test (30,000), scored on its 200 classes
  ObjectNet       a local folder (objectnet.py), scored on its 113 classes
  ImageNetA       imagenet_a test (7,500), scored on its 200 classes
Fine-tuning uses imagenet2012 train minus the held-out images (1,255,167).

Reading. TFDS datasets are read as array_record data sources with images
left encoded (tfds_source.py) and decoded with PIL (transforms.py) by the
Grain pipeline of grain_input.py: config.data.num_workers worker processes
(0: in this process, one batch ahead; -1: one per CPU core). Evaluation splits
are ordered batches (`EvalSplit.batches`; the last one short, which the
evaluator pads and masks), all splits served by one worker pool, so no split
sits in memory; their labels (read once, the images skipped) are cached as
.npy under config.data.cache_dir.

Preprocessing (transforms.py) is the paper's: CLIP's resize and center crop
for evaluation, and for training either the same (aug=None) or timm's
random-resized crop, flip and RandAugment. Host-side augmentation is seeded
per example by (member seed, step, row), so a batch is a pure function of
(seed, step): resuming at a step replays the stream exactly, and which worker
or host decodes a row does not matter. Normalization (CLIP mean/std, or
[-1, 1] for big_vision ViTs) runs inside jit (`preprocess`); `augment` in jit
is the identity.

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
import dataclasses
import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

from soup import atomic_io
from soup.data import grain_input, imagenet_heldout, objectnet
from soup.data.task import EvalSplit, Task
from soup.data.tfds_source import (
  DATASETS,
  DatasetMissingError,
  default_data_dir,
  imagenet_wnids,
  open_tfds,
  read_labels,
)

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


def subset_wnids(classes: Sequence[int]) -> tuple[str, ...]:
  """wnids of a 200-class subset, e.g. subset_wnids(IMAGENET_R_CLASSES)[0] == 'n01443537'."""
  wnids = imagenet_wnids()
  return tuple(wnids[c] for c in classes)


# --- Label caching --------------------------------------------------------


def _cache_dir(config_dir: str) -> Path:
  if config_dir:
    return Path(config_dir).expanduser()
  base = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
  return Path(base) / "soup" / "labels"


# Elements of a training stream: steps. No member runs this many; steps past its end are
# never read (the workers decode at most a few batches ahead).
TRAIN_STREAM_STEPS = 2**31 - 1


class ImageNetTask(Task):
  """The Task of soup/data/task.py for ImageNet; see the module docstring."""

  num_classes = NUM_CLASSES

  def __init__(self, data_config, columns):
    self.columns = columns  # The dataset registry's (soup/data/registry.py).
    self.config = d = data_config
    self.data_dir = os.path.expanduser(d.data_dir or default_data_dir())
    self.image_size = int(d.image_size)
    if d.normalization not in NORMALIZATIONS:
      raise ValueError(f"config.data.normalization must be one of {sorted(NORMALIZATIONS)}, "
                       f"got {d.normalization!r}.")
    mean, std = NORMALIZATIONS[d.normalization]
    self._mean, self._std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    self.fill = tuple(min(255, round(255 * m)) for m in mean)  # timm's img_mean.
    workers = int(d.num_workers)
    if workers < -1:
      raise ValueError(f"config.data.num_workers must be -1 (one per core), 0 (decode in this "
                       f"process) or a number of worker processes, got {workers}.")
    self.num_workers = (os.cpu_count() or 1) if workers == -1 else workers
    self.objectnet_border = objectnet.BORDER if d.get("objectnet_border_crop", False) else 0
    self.pool = concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1))  # Labels.

    self.train_builder, self.train_source = open_tfds("ImageNet2p", self.data_dir)
    self.heldout = imagenet_heldout.load(
        os.path.expanduser(d.heldout_file) if d.heldout_file else None)
    imagenet_heldout.verify(self.heldout, num_train=len(self.train_source),
                            per_class=d.heldout_per_class, num_classes=NUM_CLASSES,
                            tfds_version=str(self.train_builder.version))
    self.finetune_idx = self.heldout.finetune_indices()
    self._eval: Optional[dict[str, EvalSplit]] = None
    self._eval_readers: list = []  # Image readers of the streamed evaluation splits.
    # One worker pool at a time (training, evaluation or probe examples).
    self._streams = grain_input.StreamSlot(self.num_workers)

  def provenance(self) -> dict[str, Any]:
    """What results lines should record about the data: which held-out list was used."""
    return {"heldout_list": self.heldout.source}

  def close(self) -> None:
    """Stops the worker processes (a later read starts them again)."""
    self._streams.close()

  # --- Fine-tuning ----------------------------------------------------------

  def finetune_size(self) -> int:
    return len(self.finetune_idx)

  def _train_batches(self, batch_size: int, seed: int, aug: Optional[str],
                     rows: Optional[np.ndarray] = None) -> grain_input.TrainBatches:
    rows = local_rows(batch_size) if rows is None else rows
    return grain_input.TrainBatches(self.train_source, self.finetune_idx, batch_size, seed, aug,
                                    self.fill, self.image_size, rows,
                                    bool(self.config.get("train_jpeg_draft", False)))

  @functools.lru_cache(maxsize=2)
  def _positions_of(self, batch_size: int, seed: int) -> grain_input.TrainBatches:
    return self._train_batches(batch_size, seed, None, np.arange(batch_size))

  def batch_positions(self, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Positions in the fine-tuning split of step's batch, sorted (faster reads); each
    epoch is a permutation seeded by (seed, epoch), the last partial batch dropped."""
    return self._positions_of(int(batch_size), int(seed)).positions(int(step))

  def finetune_stream(self, batch_size: int, seed: int,
                      hparams: Optional[Mapping[str, Any]] = None) -> grain_input.Stream:
    """The Grain stream of a member's batches (element = step; this host's rows only)."""
    aug = (hparams or {}).get("aug")
    rows = local_rows(int(batch_size))
    key = ("train", int(batch_size), int(seed), aug, rows.tobytes())
    return self._streams.get(key, lambda: (self._train_batches(int(batch_size), int(seed), aug),
                                          TRAIN_STREAM_STEPS))

  def finetune_batch(self, batch_size: int, seed: int, step: int,
                     hparams: Optional[Mapping[str, Any]] = None) -> tuple[np.ndarray, np.ndarray]:
    """The global batch of `step` (batch_positions), augmented per hparams["aug"]. Only
    this process's rows are decoded (see the module docstring), by the worker pool,
    which works ahead on the next steps while the devices run this one."""
    local_images, local_labels = self.finetune_stream(batch_size, seed, hparams).read(int(step))
    rows = local_rows(batch_size)
    if len(rows) == batch_size:
      return local_images, local_labels
    images = np.zeros((batch_size, self.image_size, self.image_size, 3), np.uint8)
    labels = np.zeros((batch_size,), np.int32)
    images[rows], labels[rows] = local_images, local_labels
    return images, labels

  def finetune_examples(self, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` fine-tuning images, eval-preprocessed, the first of a fixed random order
    (seeded by config.data.split_seed): a uniform sample over classes, for the linear probe."""
    order = np.random.default_rng(self.config.split_seed).permutation(self.finetune_size())[:count]
    records = self.finetune_idx[order]
    images = self._decode_once(grain_input.TfdsImages(self.train_source, records, self.image_size),
                               ("examples", int(count)))
    return images, read_labels(self.train_source, records, pool=self.pool)

  def _decode_once(self, reader, key, batch_size: int = 1024) -> np.ndarray:
    """All of a reader's images, decoded by a worker pool that is closed afterwards."""
    batches = grain_input.EvalBatches([reader], batch_size)
    stream = self._streams.get(key, lambda: (batches, len(batches)))
    images = [np.asarray(stream.read(k)) for k in range(len(batches))]
    self.close()
    shape = (0, self.image_size, self.image_size, 3)
    return np.concatenate(images) if images else np.zeros(shape, np.uint8)

  # --- Evaluation -------------------------------------------------------------

  def _eval_stream(self, batch_size: int) -> tuple[grain_input.Stream, grain_input.EvalBatches]:
    readers = tuple(self._eval_readers)
    key = ("eval", int(batch_size), len(readers))

    def make():
      batches = grain_input.EvalBatches(list(readers), batch_size)
      return batches, len(batches)
    stream = self._streams.get(key, make)
    return stream, stream.fn

  def _streamed(self, reader) -> Callable[[int], Iterator[np.ndarray]]:
    """Ordered batches of a reader's images, from the evaluation worker pool."""
    self._eval_readers.append(reader)
    index = len(self._eval_readers) - 1

    def batches(batch_size: int) -> Iterator[np.ndarray]:
      for b in range(-(-len(reader) // batch_size)):
        stream, table = self._eval_stream(batch_size)  # Fetched per batch: it may be replaced.
        yield np.asarray(stream.read(table.first_batch[index] + b))
    return batches

  def _tfds_split(self, column: str, builder, source, indices: Optional[np.ndarray] = None,
                  classes: Optional[Sequence[int]] = None) -> EvalSplit:
    """An EvalSplit over a TFDS split (or its records at `indices`), optionally scored on a
    class subset: labels become positions in `classes`, logits are restricted to them."""
    labels = cached_labels(self.config.cache_dir, self.pool, builder, source,
                           DATASETS[column][1], indices)
    records = np.arange(len(source)) if indices is None else np.asarray(indices)
    reader = grain_input.TfdsImages(source, records, self.image_size)
    labels, logits_map = restrict_to_classes(column, labels, classes)
    return EvalSplit(labels=labels, batches=self._streamed(reader), logits_map=logits_map)

  def _objectnet_split(self) -> EvalSplit:
    mapping = objectnet.load_mapping()
    paths, labels = objectnet.list_images(self.config.objectnet_dir, mapping)
    reader = grain_input.FileImages(paths, self.image_size, self.objectnet_border)
    return EvalSplit(labels=labels, batches=self._streamed(reader), logits_map=mapping.logits)

  def _heldout_split(self) -> EvalSplit:
    labels = cached_labels(self.config.cache_dir, self.pool, self.train_builder,
                           self.train_source, "train", self.heldout.indices)
    if not np.array_equal(labels, self.heldout.labels):
      raise imagenet_heldout.HeldOutError(
          "The held-out list's labels differ from the dataset's at its indices: it was made from "
          f"another preparation of imagenet2012. Remake it with `{imagenet_heldout.MAKE_COMMAND}`.")
    if not self.config.heldout_in_memory:
      return self._tfds_split("ImageNet2p", self.train_builder, self.train_source,
                              self.heldout.indices)
    # Selection reads the held-out set once per candidate (greedy soup: 72 times) and the
    # learned soups need it whole: decode its 26,000 images once (3.9 GB at 224 px).
    log.info("decoding the %d held-out images into memory", len(labels))
    reader = grain_input.TfdsImages(self.train_source, self.heldout.indices, self.image_size)
    return EvalSplit(labels=labels, images=self._decode_once(reader, ("heldout",)))

  def eval_splits(self) -> dict[str, EvalSplit]:
    """Column -> EvalSplit in the columns' order; every missing dataset is reported at once."""
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
            name = (f"imagenet_v2/{self.config.imagenet_v2_variant}" if column == "ImageNetV2"
                    else None)
            builder, source = open_tfds(column, self.data_dir, name)
            classes = {"ImageNetR": IMAGENET_R_CLASSES, "ImageNetA": IMAGENET_A_CLASSES}.get(column)
            makers[column] = functools.partial(self._tfds_split, column, builder, source, None,
                                               classes)
        except (DatasetMissingError, objectnet.ObjectNetMissingError) as e:
          missing.append(str(e))
      if missing:
        raise DatasetMissingError("Evaluation data missing:\n  " + "\n  ".join(missing))
      self._eval = {column: make() for column, make in makers.items()}
    return self._eval

  def keep_eval_decoded(self, budget_bytes: int) -> Optional[int]:  # See decoded_in_memory.
    return decoded_in_memory(self.eval_splits(), self.image_size, budget_bytes)

  # --- In jit -----------------------------------------------------------------

  def preprocess(self, images):
    """uint8 [..., 3] -> float32 normalized with the model's mean/std (CLIP's by default)."""
    import jax.numpy as jnp
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(self._mean)) / jnp.asarray(self._std)

  def augment(self, rng, images, strength):
    return images  # Augmentation is host-side (finetune_batch).


def decoded_in_memory(splits: dict[str, EvalSplit], image_size: int,
                      budget_bytes: int) -> Optional[int]:
  """Replaces the streamed splits of `splits` (in place) by their images decoded once into
  uint8 memory, when they fit in `budget_bytes` (ImageNet's 167k streamed test images at
  224 px: 25 GB): the soups stage then evaluates each soup at memory speed instead of
  decoding every image again. Each split's batches are the stream's (the same images in the
  same order), so logits do not change. Returns the bytes kept, or None."""
  streamed = [c for c, split in splits.items() if split.images is None]
  need = sum(len(splits[c]) for c in streamed) * image_size ** 2 * 3
  if not streamed:
    return None
  if need > budget_bytes:
    log.info("the streamed evaluation splits (%.1f GiB decoded) do not fit in %.1f GiB of "
             "host memory: each soup decodes them again", need / 2**30, budget_bytes / 2**30)
    return None
  for column in streamed:
    split = splits[column]
    images, at = np.empty((len(split), image_size, image_size, 3), np.uint8), 0
    for batch in split.iterate(1024):  # Filled in place: no second copy at the peak.
      images[at:at + len(batch)] = batch
      at += len(batch)
    if at != len(split):
      raise ValueError(f"{column}: the stream gave {at} images for {len(split)} labels.")
    splits[column] = dataclasses.replace(split, images=images, batches=None)
  return need


def local_rows(batch_size: int) -> np.ndarray:
  """Rows of a global batch held by this process's devices (all rows on one host)."""
  return _local_rows(int(batch_size)).copy()


@functools.lru_cache(maxsize=None)
def _local_rows(batch_size: int) -> np.ndarray:
  import jax
  if jax.process_count() == 1:
    return np.arange(batch_size)
  from soup import mesh as mesh_lib
  sharding = mesh_lib.batch_sharding(mesh_lib.make_mesh())
  slices = sharding.addressable_devices_indices_map((batch_size,)).values()
  return np.unique(np.concatenate([np.arange(batch_size)[s[0]] for s in slices]))


def cached_labels(cache_dir: str, pool, builder, source, key: str,
                  indices: Optional[np.ndarray] = None) -> np.ndarray:
  """Labels read once and kept as .npy; the key names dataset, version, split and size."""
  ident = f"{builder.info.full_name}_{key}_{len(source)}".replace("/", "_")
  if indices is not None:
    ident += "_" + hashlib.sha1(np.asarray(indices, np.int64).tobytes()).hexdigest()[:12]
  path = _cache_dir(cache_dir) / f"{ident}.npy"
  if path.exists():
    labels = np.load(path)
    if len(labels) == (len(source) if indices is None else len(indices)):
      return labels
  log.info("reading labels of %s %s (once; cached in %s)", builder.info.full_name, key, path)
  labels = read_labels(source, indices, pool=pool)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_io.atomic_write(path, lambda f: np.save(f, labels), binary=True)
  except OSError as e:  # A read-only cache only costs the re-read.
    log.warning("cannot cache labels in %s: %s", path, e)
  return labels


def restrict_to_classes(column: str, labels: np.ndarray, classes: Optional[Sequence[int]]):
  """Labels as positions in `classes` and a logits map onto them (ImageNet-R/A's 200
  classes); unchanged, with no map, when classes is None."""
  if classes is None:
    return labels, None
  classes = np.asarray(classes)
  outside = ~np.isin(labels, classes)
  if outside.any():
    raise ValueError(f"{column}: {int(outside.sum())} labels outside its {len(classes)} classes.")
  labels = np.searchsorted(classes, labels).astype(np.int32)
  return labels, functools.partial(_take_classes, classes=classes)


def _take_classes(logits: np.ndarray, classes: np.ndarray) -> np.ndarray:
  """ImageNet-R/A scoring: the logits of their 200 classes, in their label order."""
  return np.asarray(logits)[:, classes]
