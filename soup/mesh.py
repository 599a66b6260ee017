"""The device mesh: one data-parallel axis over every device of every host."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over the first num_devices devices (all by default).

  Axis type Auto lets jit propagate shardings (jax 0.10 defaults to Explicit
  in some constructors, which the training step does not need).
  """
  devices = jax.devices()[: num_devices or None]
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(mesh: Mesh, *arrays: np.ndarray):
  """Host arrays of the global batch -> arrays split over the data axis.

  Each process supplies only the rows its devices hold (multi-host safe when
  every process holds the same global batch, as the in-memory pipeline does).
  """
  sharding = batch_sharding(mesh)
  out = tuple(jax.make_array_from_callback(a.shape, sharding, lambda idx, a=a: a[idx])
              for a in arrays)
  return out if len(out) > 1 else out[0]
