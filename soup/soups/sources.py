"""Ingredient sources: checkpoint paths and param trees behind one reading interface.

A source is a param pytree (InMemory), the path of an ingredient checkpoint, or an
opened checkpoints.Ingredient: each gives `specs` (name -> shape and dtype) and reads of
a whole leaf, an N-d box or a flat range into a caller's buffer.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np

from soup import checkpoints, trees
from soup.trees import check_compatible

PyTree = Any
Source = Any  # A param pytree, the path of an ingredient checkpoint, or an opened one.


class InMemory:
  """A param pytree with the reading interface of checkpoints.Ingredient."""

  def __init__(self, tree: PyTree, name: str):
    self.name = name
    self.leaves = trees.flatten_with_names(tree)
    self.treedef = jax.tree.structure(tree)
    self.specs = {n: checkpoints.LeafSpec(np.shape(x), getattr(x, "dtype", None)
                                          or np.asarray(x).dtype)
                  for n, x in self.leaves.items()}

  def __str__(self):
    return self.name

  def read(self, name: str, out: Optional[np.ndarray] = None) -> np.ndarray:
    del out  # Already in memory: no copy.
    return np.asarray(self.leaves[name])

  def read_box(self, name: str, box, out: Optional[np.ndarray] = None) -> np.ndarray:
    return _copy_into(np.asarray(self.leaves[name])[tuple(slice(a, b) for a, b in box)], out)

  def read_flat(self, name: str, start: int, stop: int, out: Optional[np.ndarray] = None):
    return _copy_into(np.asarray(self.leaves[name]).reshape(-1)[start:stop], out)

  def prefetch(self, names=None) -> None:
    pass


def _copy_into(part: np.ndarray, out: Optional[np.ndarray]) -> np.ndarray:
  if out is None:
    return part
  out = out.reshape(-1).view(np.uint8)[:part.nbytes].view(part.dtype).reshape(part.shape)
  np.copyto(out, part)
  return out


def open_source(source: Source, verify: bool = True, index: int = 0):
  """A checkpoints.Ingredient for a path (metadata only, no array I/O), InMemory for a tree."""
  if isinstance(source, (checkpoints.Ingredient, InMemory)):
    return source
  if isinstance(source, (str, os.PathLike)):
    return checkpoints.open_ingredient(source, verify)
  return InMemory(source, f"ingredient #{index}")


def open_sources(sources: Sequence[Source], verify: bool = True) -> list:
  """Opens every source and checks each against the first (keys, shapes, dtypes)."""
  if not sources:
    raise ValueError("Cannot average zero ingredients.")
  opened = [open_source(s, verify, i) for i, s in enumerate(sources)]
  for other in opened[1:]:
    check_compatible(opened[0].specs, other.specs, str(opened[0]), str(other))
  return opened


def as_tree(flat: dict, source) -> PyTree:
  """{name: leaf} as a tree structured like `source`: the caller's structure for a
  tree, nested dicts (as load_ingredient gives) for a checkpoint."""
  if isinstance(source, InMemory):
    return jax.tree.unflatten(source.treedef, [flat[n] for n in source.leaves])
  return trees.unflatten(flat)


def nbytes(spec) -> int:
  """Bytes of a leaf of this shape and dtype."""
  return math.prod(spec.shape) * np.dtype(spec.dtype).itemsize
