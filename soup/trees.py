"""Naming and comparing param trees (no I/O, no models).

A leaf is named by its key path joined with "/" ("Transformer/encoder_norm/scale"):
`flatten_with_names` and its inverse `unflatten` are the one flatten/unflatten of the
project (flax.traverse_util); names come in sorted key order, as jax orders dict leaves.
`check_compatible` is the one structure check: soups use it to compare ingredients,
checkpoint converters to compare a converted tree with the model's.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import traverse_util

PyTree = Any


class TreeMismatchError(ValueError):
  """Two param trees differ in keys, shapes or dtypes."""


class MissingKeyError(TreeMismatchError, KeyError):
  """A tree lacks a key the reference has (also a KeyError, as a missing key is)."""

  def __str__(self):  # KeyError would print the repr of the message.
    return str(self.args[0])


def flatten_with_names(tree: PyTree, sep: str = "/") -> dict[str, Any]:
  """{"a": {"b": x}} -> {"a/b": x} for nested dicts, in sorted key order."""
  flat = traverse_util.flatten_dict(tree)
  return {sep.join(str(k) for k in path): flat[path] for path in sorted(flat)}


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict:
  """{"a/b": x} -> {"a": {"b": x}}: the inverse of flatten_with_names."""
  return traverse_util.unflatten_dict(dict(flat), sep=sep)


def _shape(leaf) -> tuple[int, ...]:
  return tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)


def check_compatible(reference: PyTree, other: PyTree, reference_name: str = "reference",
                     other_name: str = "other", *, dtypes: bool = True) -> None:
  """Raises if `other` differs from `reference` in keys, leaf shapes or (with `dtypes`) dtypes.

  Leaves may be arrays or jax.ShapeDtypeStructs. MissingKeyError (a KeyError) for keys
  `other` lacks, TreeMismatchError (a ValueError) for unexpected keys, shapes and dtypes;
  each names the "/"-joined key.
  """
  ref, oth = flatten_with_names(reference), flatten_with_names(other)
  missing = sorted(ref.keys() - oth.keys())
  if missing:
    raise MissingKeyError(f"{other_name}: missing key(s) {missing[:10]}"
                          f"{' ...' if len(missing) > 10 else ''} that {reference_name} has.")
  extra = sorted(oth.keys() - ref.keys())
  if extra:
    raise TreeMismatchError(f"{other_name}: unexpected key(s) {extra[:10]}"
                            f"{' ...' if len(extra) > 10 else ''} that {reference_name} lacks.")
  for key in ref:
    want, got = _shape(ref[key]), _shape(oth[key])
    if got != want:
      raise TreeMismatchError(f"{other_name}: key {key!r} has shape {got}, expected {want} "
                              f"(as in {reference_name}).")
    if dtypes and np.dtype(oth[key].dtype) != np.dtype(ref[key].dtype):
      raise TreeMismatchError(f"{other_name}: key {key!r} has dtype {oth[key].dtype}, expected "
                              f"{ref[key].dtype} (as in {reference_name}).")
