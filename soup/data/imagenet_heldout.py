"""The held-out 2% of ImageNet train (column ImageNet2p): 26 images per class.

The paper ranks and selects models (greedy soup, best individual) on 26,000
training images held out from fine-tuning: 26 per class, chosen at random per
class (their datasets/imagenet.py, with an unseeded np.random.shuffle over
ImageFolder order, so their exact images cannot be recovered). Ours are
chosen by a seeded per-class procedure over TFDS `imagenet2012`'s train split:

  for each class c: the TFDS indices whose label is c, sorted; then
  np.random.default_rng([seed, c]).choice(those, 26, replace=False).

TFDS writes a prepared split in a deterministic order (examples sorted by a
hash of their key, whatever the machine or shard count), so for one TFDS
version the same indices always name the same images. The labels needed to
run the procedure cannot be read without the 147 GB dataset, which is not
here; hence the list is made once, where the data is, by

  python scripts/make_imagenet_heldout.py --data_dir=$TFDS_DATA_DIR

and the resulting DEFAULT_FILE is committed, so that every run, machine and
sweep member holds out the same images. The file stores the indices, their
labels and what made them (TFDS version, train size, per-class count, seed);
`verify` checks all of it when a task loads it, and ImageNetTask also checks
the stored labels against the dataset's, which catches a list made from a
different preparation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

DEFAULT_FILE = Path(__file__).parent / "imagenet2012_heldout.npz"
PER_CLASS = 26
NUM_CLASSES = 1000
SEED = 0
MAKE_COMMAND = "python scripts/make_imagenet_heldout.py --data_dir=<TFDS data_dir>"


class HeldOutError(ValueError):
  """The held-out list is missing or does not fit the dataset."""


@dataclasses.dataclass(frozen=True)
class HeldOut:
  indices: np.ndarray   # Sorted TFDS indices into imagenet2012 train, int64.
  labels: np.ndarray    # Their labels (0..999), int32.
  tfds_version: str
  num_train: int
  per_class: int
  seed: int

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


def save(path: str | Path, indices: np.ndarray, labels: np.ndarray, *, tfds_version: str,
         num_train: int, per_class: int, seed: int) -> None:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp.npz")
  np.savez_compressed(tmp, indices=np.asarray(indices, np.int64), labels=np.asarray(labels, np.int32),
                      tfds_version=np.array(tfds_version), num_train=np.array(num_train),
                      per_class=np.array(per_class), seed=np.array(seed))
  tmp.replace(path)


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
                   per_class=int(z["per_class"]), seed=int(z["seed"]))


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
                   seed: int = SEED) -> HeldOut:
  """Reads every train label of the prepared TFDS imagenet2012 (images skipped), selects
  the held-out images and writes the list to `out`. What the script runs."""
  import concurrent.futures
  import os

  from soup.data import imagenet

  builder, source = imagenet.open_tfds("ImageNet2p", data_dir)
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    labels = imagenet.read_labels(source, pool=pool)
  indices = select(labels, per_class, seed, NUM_CLASSES)
  held = HeldOut(indices=indices, labels=labels[indices], tfds_version=str(builder.version),
                 num_train=len(labels), per_class=per_class, seed=seed)
  verify(held, num_train=len(labels), per_class=per_class, tfds_version=str(builder.version))
  save(out, held.indices, held.labels, tfds_version=held.tfds_version, num_train=held.num_train,
       per_class=per_class, seed=seed)
  return held
