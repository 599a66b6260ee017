"""Exact evaluation: ordered data, the last partial batch padded and masked.

Nothing is dropped: a split of n examples yields exactly n rows of logits, in
order, whatever the batch size; accuracies are computed on those rows.

Many models, one decode. `Evaluator.logits_of_batches_many` sends each batch to
the devices once and runs every model of a group on it, so a streamed split
(ImageNet's JPEGs) is decoded once per group, not once per model. Each model
runs the same compiled forward on the same device batch as it would alone: its
logits are bitwise those of model-by-model evaluation. How many models fit on
the devices at once is `group_size`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from soup import mesh as mesh_lib, metrics

PyTree = Any
# Share of a device's free memory a group may fill: XLA's allocator needs room to spare.
DEVICE_MEMORY_FRACTION = 0.9
# Share of the host's available memory a group may hold there (restored params, logits).
HOST_MEMORY_FRACTION = 0.5
# CPU devices report no memory limit: their copies of the params share the host's RAM with
# the host's own share above, so together they may fill this share of its available memory.
CPU_DEVICES_MEMORY_FRACTION = 0.25


class Evaluator:
  """Computes logits of a params tree (or a group of them) on ordered batches."""

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
    return self.logits_of_batches_many([params], batches)[0]

  def place(self, params: PyTree) -> PyTree:
    """Params on the devices: replicated, unless already laid out on this mesh (e.g.
    FSDP-sharded soups), which stay as they are."""
    return jax.tree.map(lambda x: x if getattr(getattr(x, "sharding", None), "mesh", None)
                        == self.mesh else jax.device_put(x, mesh_lib.replicated(self.mesh)),
                        params)

  def logits_of_batches_many(self, group: Sequence[PyTree],
                             batches: Iterable[np.ndarray]) -> list[np.ndarray]:
    """Logits of every model of `group` on one stream of ordered batches: each batch is
    pulled from `batches` and sent to the devices once, then run through each model."""
    group = [self.place(p) for p in group]
    out: list[list[np.ndarray]] = [[] for _ in group]

    def fetch(pending):
      logits, valid = pending
      for rows, x in zip(out, logits):
        rows.append(np.asarray(x)[:valid])

    pending = None  # Fetched after the next batch is dispatched: the devices never idle.
    for batch in batches:
      valid = len(batch)
      if valid > self.batch_size:
        raise ValueError(f"batch of {valid} > eval batch size {self.batch_size}.")
      if valid < self.batch_size:  # Pad the last batch; its padding rows are cut in fetch.
        pad = np.zeros((self.batch_size - valid, *batch.shape[1:]), batch.dtype)
        batch = np.concatenate([batch, pad])
      on_devices = mesh_lib.global_batch(self.mesh, batch)
      logits = [self._logits(params, on_devices) for params in group]
      if pending is not None:
        fetch(pending)
      pending = (logits, valid)
    if pending is not None:
      fetch(pending)
    return [np.concatenate(rows) if rows else np.zeros((0, 0), np.float32) for rows in out]

  def forward_bytes(self, params_shapes: PyTree, image: jax.ShapeDtypeStruct) -> int:
    """Device bytes one forward pass needs besides the params (batch, activations,
    logits), per device, from XLA's memory analysis of the compiled forward."""
    batch = jax.ShapeDtypeStruct((self.batch_size, *image.shape), image.dtype,
                                 sharding=mesh_lib.batch_sharding(self.mesh))
    stats = self._logits.lower(params_shapes, batch).compile().memory_analysis()
    if stats is None:  # A backend without the analysis: count the batch alone.
      return math.prod(batch.shape) * np.dtype(batch.dtype).itemsize
    return int(stats.temp_size_in_bytes + stats.output_size_in_bytes
               + math.prod(batch.shape) * np.dtype(batch.dtype).itemsize
               // self.mesh.shape[mesh_lib.DATA_AXIS])

  def accuracy(self, params: PyTree, images: np.ndarray, labels: np.ndarray,
               class_mask: Optional[np.ndarray] = None) -> float:
    return metrics.accuracy(self.logits(params, images), labels, class_mask)


# --- How many models evaluate together -------------------------------------------


def bytes_per_device(shapes: Mapping[str, Any], shardings: Optional[Mapping[str, Any]] = None
                     ) -> int:
  """Bytes of one model's params on one device: a leaf's shard where `shardings` gives one
  (FSDP), else the whole leaf (replicated)."""
  total = 0
  for name, spec in shapes.items():
    shape = spec.shape if shardings is None else shardings[name].shard_shape(spec.shape)
    total += math.prod(shape) * np.dtype(spec.dtype).itemsize
  return total


def _host_available_bytes() -> int:
  with open("/proc/meminfo") as f:
    fields = dict(line.split(":", 1) for line in f)
  return int(fields["MemAvailable"].split()[0]) * 1024


def free_device_memory(mesh: Mesh) -> tuple[int, str]:
  """Bytes a group may use on each of this process's devices, and where the figure comes
  from: the devices' own memory stats (GPU, TPU), or, for CPU devices (no stats), a share
  of the host's available memory split over them."""
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  stats = [d.memory_stats() for d in local]
  if all(s and "bytes_limit" in s for s in stats):
    free = min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
    return int(free * DEVICE_MEMORY_FRACTION), "device memory"
  share = _host_available_bytes() * CPU_DEVICES_MEMORY_FRACTION / len(local)
  return int(share), (f"CPU devices: {CPU_DEVICES_MEMORY_FRACTION:.0%} of the host's available "
                      f"memory over {len(local)}")


def models_that_fit(model_bytes: int, forward_bytes: int, free_bytes: int) -> int:
  """How many models' params fit beside one forward pass's working memory."""
  return max(0, (free_bytes - forward_bytes) // max(model_bytes, 1))


def group_size(configured: int, models: int, model_bytes: int, forward_bytes: int,
               free_bytes: int, source: str = "device memory", host_model_bytes: int = 0,
               host_free_bytes: Optional[int] = None) -> int:
  """The group of models evaluated together: `configured` (config.eval.group_size), or with
  0 as many as fit (at least one: a single model is what model-by-model evaluation ran).
  Two budgets: each device holds the group's params beside a forward pass; the host holds
  each model's restored params and logits until its group ends (`host_model_bytes` each,
  of `host_free_bytes`). A configured group that cannot fit raises GroupTooLargeError
  before any compute."""
  fit = models_that_fit(model_bytes, forward_bytes, free_bytes)
  host_fit = fit if host_free_bytes is None else models_that_fit(host_model_bytes, 0,
                                                                 host_free_bytes)
  if configured <= 0:
    return max(1, min(models, fit, host_fit))
  gib = 2.0**30
  if configured > max(fit, 1):
    raise GroupTooLargeError(
        f"config.eval.group_size={configured} needs {configured} x {model_bytes / gib:.2f} GiB "
        f"of params + {forward_bytes / gib:.2f} GiB for a forward pass on each device, "
        f"{(configured * model_bytes + forward_bytes) / gib:.2f} GiB; {free_bytes / gib:.2f} GiB "
        f"is free ({source}): e.g. --config.eval.group_size={max(fit, 1)}, or 0 for as many "
        "as fit.")
  if configured > max(host_fit, 1):
    raise GroupTooLargeError(
        f"config.eval.group_size={configured} holds {configured} x "
        f"{host_model_bytes / gib:.2f} GiB (params and logits) on the host until the group "
        f"ends; {host_free_bytes / gib:.2f} GiB is free ({HOST_MEMORY_FRACTION:.0%} of the "
        f"host's available memory): e.g. --config.eval.group_size={max(host_fit, 1)}, or 0 "
        "for as many as fit.")
  return min(models, configured)


def host_free_bytes() -> int:
  """What a group may hold on the host: a share of its available memory."""
  return int(_host_available_bytes() * HOST_MEMORY_FRACTION)


class GroupTooLargeError(ValueError):
  """config.eval.group_size asks for more models than the devices hold."""
