"""What the experiment needs from a dataset, whatever its scale.

A Task supplies fine-tuning batches, the evaluation splits under their result
column names, and the jit-side preprocessing and augmentation. Fashion-MNIST
holds everything in memory; ImageNet streams from TFDS. Both subclass Task.
The trainer and the soups see only this interface; the experiment also reads
Fashion-MNIST's `upstream` split, for the upstream pretraining stage.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import numpy as np

from soup import metrics
from soup.columns import Columns


@dataclasses.dataclass
class EvalSplit:
  """One evaluation split: images in memory or a stream of ordered batches.

  `batches(batch_size)` yields image batches in order (the last one may be
  short); the evaluator pads and masks it. `logits_map` turns the model's
  logits into the split's label space before scoring (ImageNet-R/A keep their
  200 classes, ObjectNet maps ImageNet classes to its 113).
  """

  labels: np.ndarray
  images: Optional[np.ndarray] = None
  batches: Optional[Callable[[int], Iterator[np.ndarray]]] = None
  logits_map: Optional[Callable[[np.ndarray], np.ndarray]] = None
  metric: str = "accuracy"  # soup.metrics.METRICS: what `score` reports (CoLA: Matthews).

  def __post_init__(self):
    if (self.images is None) == (self.batches is None):
      raise ValueError("An EvalSplit needs exactly one of images or batches.")

  def __len__(self) -> int:
    return len(self.labels)

  def iterate(self, batch_size: int) -> Iterator[np.ndarray]:
    if self.images is not None:
      for start in range(0, len(self.images), batch_size):
        yield self.images[start:start + batch_size]
    else:
      yield from self.batches(batch_size)

  def stacked(self, batch_size: int = 1024) -> np.ndarray:
    """Every example as one array, in order. Streamed batches of different shapes (token ids
    padded to length buckets) are padded with zeros, the padding id, to the largest."""
    if self.images is not None:
      return self.images
    batches = list(self.iterate(batch_size))
    shape = np.max([b.shape[1:] for b in batches], axis=0)
    return np.concatenate([np.pad(b, [(0, 0)] + [(0, int(m - n)) for m, n in
                                                  zip(shape, b.shape[1:])]) for b in batches])

  def scored_logits(self, logits: np.ndarray) -> np.ndarray:
    return logits if self.logits_map is None else self.logits_map(logits)

  def accuracy(self, logits: np.ndarray) -> float:
    return metrics.accuracy(self.scored_logits(np.asarray(logits, np.float32)), self.labels)

  def score(self, logits: np.ndarray) -> float:
    """The split's metric: what results rows report and the held-out selection maximizes."""
    if self.metric == "accuracy":
      return self.accuracy(logits)
    return metrics.score(self.metric, self.scored_logits(np.asarray(logits, np.float32)),
                         self.labels)


class Task:
  """Interface; see FashionMNISTTask and ImageNetTask."""

  columns: Columns
  num_classes: int

  def finetune_size(self) -> int:
    raise NotImplementedError

  def finetune_batch(self, batch_size: int, seed: int, step: int,
                     hparams: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The global batch of `step` for a member with these hyperparameters."""
    raise NotImplementedError

  def finetune_examples(self, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` fine-tuning examples in a fixed order (linear probe)."""
    raise NotImplementedError

  def eval_splits(self) -> dict[str, EvalSplit]:
    raise NotImplementedError

  def keep_eval_decoded(self, budget_bytes: int) -> Optional[int]:
    """Streamed evaluation splits decoded once and kept in memory, if they fit in
    `budget_bytes`: later passes read memory, in the same order and batches. Returns the
    bytes kept (None: not kept). In-memory tasks have nothing to keep."""
    return None

  def provenance(self) -> dict[str, Any]:
    """Fields results lines should carry about the data (e.g. which held-out list)."""
    return {}

  def preprocess(self, images: jax.Array) -> jax.Array:
    raise NotImplementedError

  def augment(self, rng: jax.Array, images: jax.Array, strength: jax.Array) -> jax.Array:
    return images
