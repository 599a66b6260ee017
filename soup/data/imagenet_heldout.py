"""The held-out 2% of ImageNet train (column ImageNet2p): 26 images per class.

The paper ranks and selects models (greedy soup, best individual) on 26,000
training images held out from fine-tuning: 26 per class. Two lists can be
used; the file records which (`HeldOut.source`), and results lines carry it
(ImageNetTask.provenance) so the report can say which list its ImageNet2p
column was measured on.

official  The authors' own split, `imagenet_98_idxs.npy` in
          mlfoundations/model-soups. Their datasets/imagenet.py reads it as a
          mask over torchvision ImageFolder's order of the train folder (wnid
          folders sorted, file names sorted within each, as Python sorts
          strings): `ImageNet2p` samples `np.where(idxs)[0]` (value 1: held
          out) and `ImageNet98p` fine-tunes on `np.where(1 - idxs)[0]`. TFDS
          stores train examples in another order (by a hash of their key), but
          each record carries its `file_name` (e.g. n01675722_4108.JPEG), so
          the mask maps onto TFDS indices exactly:
            python scripts/make_imagenet_heldout.py --data_dir=$TFDS_DATA_DIR \
                --official_mask=imagenet_98_idxs.npy
seeded    Ours, when the official file is not at hand: for each class c, the
          TFDS indices whose label is c, sorted; then
          np.random.default_rng([seed, c]).choice(those, 26, replace=False).
          Not the paper's images: the ImageNet2p column, the greedy order and
          the fine-tuning split then differ from theirs.

TFDS writes a prepared split in a deterministic order (examples sorted by a
hash of their key, whatever the machine or shard count), so for one TFDS
version the same indices always name the same images. Making either list
reads the labels (and file names) of the 1.28M train records, which needs the
147 GB dataset; hence the list is made once, where the data is, with the
script above (without --official_mask: the seeded list), and the resulting
DEFAULT_FILE is committed, so that every run, machine and sweep member holds
out the same images. The file stores the indices, their labels and what made
them (source, TFDS version, train size, per-class count, seed); `verify`
checks all of it when a task loads it, and ImageNetTask also checks the
stored labels against the dataset's, which catches a list made from a
different preparation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from soup import atomic_io

DEFAULT_FILE = Path(__file__).parent / "imagenet2012_heldout.npz"
PER_CLASS = 26
NUM_CLASSES = 1000
SEED = 0
SOURCES = ("official", "seeded")
MAKE_COMMAND = ("python scripts/make_imagenet_heldout.py --data_dir=<TFDS data_dir> "
                "[--official_mask=imagenet_98_idxs.npy]")


class HeldOutError(ValueError):
  """The held-out list is missing or does not fit the dataset."""


@dataclasses.dataclass(frozen=True)
class HeldOut:
  indices: np.ndarray   # Sorted TFDS indices into imagenet2012 train, int64.
  labels: np.ndarray    # Their labels (0..999), int32.
  tfds_version: str
  num_train: int
  per_class: int
  seed: int             # -1 for the official list.
  source: str = "seeded"  # "official" (imagenet_98_idxs.npy) or "seeded" (select below).

  def finetune_indices(self) -> np.ndarray:
    """Every other train index, sorted: the fine-tuning split."""
    keep = np.ones(self.num_train, bool)
    keep[self.indices] = False
    return np.flatnonzero(keep)


def select(labels: np.ndarray, per_class: int = PER_CLASS, seed: int = SEED,
           num_classes: int = NUM_CLASSES) -> np.ndarray:
  """Sorted indices of `per_class` examples of each class, by the seeded procedure above."""
  labels = np.asarray(labels)
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < per_class:
      raise HeldOutError(f"class {c} has {len(members)} training examples, fewer than "
                         f"per_class={per_class}.")
    chosen.append(np.random.default_rng([seed, c]).choice(members, per_class, replace=False))
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def imagefolder_order(file_names, labels: np.ndarray, wnids) -> np.ndarray:
  """TFDS indices in torchvision ImageFolder order: the wnid folders sorted, file names
  sorted within each folder (Python string order, so n01675722_10000.JPEG comes before
  n01675722_4108.JPEG). A record's folder is the wnid of its label."""
  names = [n.decode() if isinstance(n, bytes) else str(n) for n in file_names]
  folders = [wnids[int(c)] for c in labels]
  wrong = [i for i in range(len(names)) if not names[i].startswith(folders[i] + "_")]
  if wrong:
    i = wrong[0]
    raise HeldOutError(f"{len(wrong)} train records' file names do not start with their class's "
                       f"wnid (e.g. {names[i]!r}, label {int(labels[i])} = {folders[i]}): not "
                       "ImageNet train file names, so ImageFolder order cannot be rebuilt.")
  return np.asarray(sorted(range(len(names)), key=lambda i: (folders[i], names[i])), np.int64)


def from_official_mask(mask: np.ndarray, file_names, labels: np.ndarray, wnids) -> np.ndarray:
  """Sorted TFDS indices of the images an official imagenet_98_idxs.npy mask holds out.

  `mask[j]` is 1 (held out) or 0 (fine-tuning) for the j-th image of ImageFolder
  order; position j is mapped to its TFDS record through the file names.
  """
  mask = np.asarray(mask)
  n = len(labels)
  if mask.ndim != 1 or len(mask) != n:
    raise HeldOutError(f"The official mask has shape {mask.shape}; expected ({n},): one 0/1 "
                       "value per train image (imagenet_98_idxs.npy from "
                       "mlfoundations/model-soups).")
  if not np.isin(np.unique(mask), (0, 1)).all():
    raise HeldOutError("The official mask must hold only 0 and 1 (1: held out); got values "
                       f"{np.unique(mask)[:5].tolist()}.")
  order = imagefolder_order(file_names, labels, wnids)
  return np.sort(order[np.flatnonzero(mask)])


def save(path: str | Path, indices: np.ndarray, labels: np.ndarray, *, tfds_version: str,
         num_train: int, per_class: int, seed: int, source: str = "seeded") -> None:
  if source not in SOURCES:
    raise ValueError(f"held-out source must be one of {SOURCES}, got {source!r}.")
  arrays = dict(indices=np.asarray(indices, np.int64), labels=np.asarray(labels, np.int32),
                tfds_version=np.array(tfds_version), num_train=np.array(num_train),
                per_class=np.array(per_class), seed=np.array(seed), source=np.array(source))
  atomic_io.atomic_write(path, lambda f: np.savez_compressed(f, **arrays), binary=True)


def load(path: str | Path | None = None) -> HeldOut:
  """Reads the list; a missing file is an error that says how to make it."""
  path = Path(path or DEFAULT_FILE)
  if not path.exists():
    raise HeldOutError(
        f"The ImageNet held-out list {path} does not exist. Create it once from the prepared "
        f"TFDS imagenet2012 with `{MAKE_COMMAND}` (it reads the 1.28M train labels, a few "
        "minutes) and commit it, so every run holds out the same 26,000 images.")
  with np.load(path, allow_pickle=False) as z:
    return HeldOut(indices=z["indices"].astype(np.int64), labels=z["labels"].astype(np.int32),
                   tfds_version=str(z["tfds_version"]), num_train=int(z["num_train"]),
                   per_class=int(z["per_class"]), seed=int(z["seed"]),
                   source=str(z["source"]) if "source" in z.files else "seeded")


def verify(held: HeldOut, *, num_train: int, per_class: int = PER_CLASS,
           num_classes: int = NUM_CLASSES, tfds_version: str | None = None) -> None:
  """Raises HeldOutError unless the list is per_class unique indices of each class,
  inside a train split of num_train examples, disjoint from fine-tuning."""
  problems = []
  if tfds_version is not None and held.tfds_version != tfds_version:
    problems.append(f"made from TFDS imagenet2012 {held.tfds_version}, the data is {tfds_version}")
  if held.num_train != num_train:
    problems.append(f"made for {held.num_train} train examples, the split has {num_train}")
  if held.per_class != per_class:
    problems.append(f"holds {held.per_class} per class, the config asks {per_class}")
  want = per_class * num_classes
  idx = held.indices
  if len(idx) != want or len(np.unique(idx)) != want:
    problems.append(f"{len(np.unique(idx))} unique indices out of {len(idx)}, expected {want}")
  if len(idx) and (idx.min() < 0 or idx.max() >= num_train):
    problems.append(f"indices outside [0, {num_train})")
  if len(held.labels) != len(idx):
    problems.append(f"{len(held.labels)} labels for {len(idx)} indices")
  else:
    counts = np.bincount(held.labels, minlength=num_classes)
    if len(counts) != num_classes or np.any(counts != per_class):
      bad = np.flatnonzero(counts[:num_classes] != per_class)[:5].tolist()
      problems.append(f"not {per_class} per class (e.g. classes {bad})")
  if not problems:
    finetune = held.finetune_indices()
    if len(np.intersect1d(finetune, idx)) or len(finetune) + len(idx) != num_train:
      problems.append("not disjoint from the fine-tuning split")
  if problems:
    raise HeldOutError("The ImageNet held-out list does not fit: " + "; ".join(problems)
                       + f". Remake it with `{MAKE_COMMAND}`.")


def make_from_tfds(data_dir: str, out: str | Path = DEFAULT_FILE, per_class: int = PER_CLASS,
                   seed: int = SEED, official_mask: str | Path | None = None) -> HeldOut:
  """Reads every train label (and, for the official mask, file name) of the prepared TFDS
  imagenet2012, images skipped, makes the list and writes it to `out`. What the script runs."""
  import concurrent.futures
  import os

  from soup.data import tfds_source

  builder, source = tfds_source.open_tfds("ImageNet2p", data_dir)
  fields = ("label", "file_name") if official_mask else ("label",)
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    values = tfds_source.read_fields(source, fields, pool=pool)
  labels = np.asarray(values[0], np.int32)
  if official_mask:
    indices = from_official_mask(np.load(official_mask), values[1], labels,
                                 tfds_source.imagenet_wnids())
    counts = np.bincount(labels[indices], minlength=NUM_CLASSES)
    per_class, seed, kind = int(counts.max()), -1, "official"
  else:
    indices, kind = select(labels, per_class, seed, NUM_CLASSES), "seeded"
  held = HeldOut(indices=indices, labels=labels[indices], tfds_version=str(builder.version),
                 num_train=len(labels), per_class=per_class, seed=seed, source=kind)
  verify(held, num_train=len(labels), per_class=per_class, tfds_version=str(builder.version))
  save(out, held.indices, held.labels, tfds_version=held.tfds_version, num_train=held.num_train,
       per_class=per_class, seed=seed, source=kind)
  return held
