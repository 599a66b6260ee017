"""Exact evaluation: ordered data, the last partial batch padded and masked.

Nothing is dropped: a split of n examples yields exactly n rows of logits, in
order, whatever the batch size; accuracies are computed on those rows.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from soup import mesh as mesh_lib, metrics

PyTree = Any


class Evaluator:
  """Computes logits of a params tree on an in-memory split, in order."""

  def __init__(self, apply_fn: Callable[[PyTree, jax.Array], jax.Array], mesh: Mesh,
               batch_size: int):
    devices = mesh.shape[mesh_lib.DATA_AXIS]
    if batch_size % devices:
      raise ValueError(f"eval batch size {batch_size} must be a multiple of the {devices} devices.")
    self.mesh, self.batch_size = mesh, batch_size
    self._logits = jax.jit(apply_fn, out_shardings=mesh_lib.replicated(mesh))

  def logits(self, params: PyTree, images: np.ndarray) -> np.ndarray:
    """Logits of in-memory images, in order."""
    return self.logits_of_batches(
        params, (images[i:i + self.batch_size] for i in range(0, len(images), self.batch_size)))

  def logits_of_batches(self, params: PyTree, batches: Iterable[np.ndarray]) -> np.ndarray:
    """Logits of a stream of ordered batches of at most batch_size images."""
    # Params already laid out on this mesh (e.g. FSDP-sharded soups) stay as they are.
    params = jax.tree.map(lambda x: x if getattr(getattr(x, "sharding", None), "mesh", None)
                          == self.mesh else jax.device_put(x, mesh_lib.replicated(self.mesh)),
                          params)
    out = []
    for batch in batches:
      valid = len(batch)
      if valid > self.batch_size:
        raise ValueError(f"batch of {valid} > eval batch size {self.batch_size}.")
      if valid < self.batch_size:  # Pad the last batch; its padding rows are cut below.
        pad = np.zeros((self.batch_size - valid, *batch.shape[1:]), batch.dtype)
        batch = np.concatenate([batch, pad])
      logits = self._logits(params, mesh_lib.global_batch(self.mesh, batch))
      out.append(np.asarray(logits)[:valid])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

  def accuracy(self, params: PyTree, images: np.ndarray, labels: np.ndarray,
               class_mask: Optional[np.ndarray] = None) -> float:
    return metrics.accuracy(self.logits(params, images), labels, class_mask)
