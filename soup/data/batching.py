"""In-memory splits and their training batches, whatever the dataset.

A dataset small enough to hold in memory (Fashion-MNIST: per-example TFDS reads
are slower than training the tiny ViT) is read once into a `Split` of arrays.
Batch b of a run is a pure function of (seed, b): resuming at any step
replays exactly the batches an uninterrupted run would have seen. The
dataset's own normalization and augmentation live with the dataset
(soup/data/fashion_mnist.py); mixup, which mixes targets too, is the train
step's (soup/train.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # uint8 [n, h, w, c]
  labels: np.ndarray  # int32 [n]

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, indices: np.ndarray) -> "Split":
    return Split(self.images[indices], self.labels[indices])


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Training drops the last partial batch (evaluation never does)."""
  if num_examples < batch_size:
    raise ValueError(f"{num_examples} training examples cannot fill a batch of {batch_size}.")
  return num_examples // batch_size


def train_batch(split: Split, batch_size: int, seed: int,
                step: int) -> tuple[np.ndarray, np.ndarray]:
  """The batch of global step `step`: epoch-wise permutations seeded by (seed, epoch)."""
  per_epoch = steps_per_epoch(len(split), batch_size)
  epoch, index = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(len(split))
  idx = np.sort(order[index * batch_size:(index + 1) * batch_size])
  return split.images[idx], split.labels[idx]
