"""The random search's sampler, shared by the configs' get_sweep, and its output check.

A config's `get_sweep(config)` returns one dict of hyperparameters per member.
`Sampler` draws them from one seeded numpy generator; each config calls its
draws in a fixed order per member, so adding members never changes the
earlier ones. `check_members` is what the experiment needs of the result.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np

# Keys every member needs (soup/experiment.py's sweep stage reads them), and their kinds.
REQUIRED = {"lr": numbers.Real, "weight_decay": numbers.Real, "epochs": numbers.Integral,
            "label_smoothing": numbers.Real, "mixup": numbers.Real,
            "aug_strength": numbers.Real, "seed": numbers.Integral}


class SweepError(ValueError):
  """get_sweep returned something the experiment cannot train."""


class Sampler:
  """Seeded draws of one random search."""

  def __init__(self, seed: int):
    self.rng = np.random.default_rng(seed)

  def log_uniform(self, lo: float, hi: float) -> float:
    return float(math.exp(self.rng.uniform(math.log(lo), math.log(hi))))

  def uniform(self, lo: float, hi: float) -> float:
    return float(self.rng.uniform(lo, hi))

  def integer(self, lo: int, hi: int) -> int:
    """Uniform over lo..hi, both included."""
    return int(self.rng.integers(lo, hi + 1))

  def chance(self, p: float) -> bool:
    """True with probability p."""
    return bool(self.rng.random() < p)

  def zero_or_uniform(self, p_zero: float, lo: float, hi: float, draw_first: bool) -> float:
    """0.0 with probability p_zero, else uniform in [lo, hi).

    draw_first=False draws the uniform only when needed (one draw fewer); True
    always draws it first, then the coin. Each config keeps the order it was
    published with, since the order decides every later draw.
    """
    if draw_first:
      value = self.uniform(lo, hi)
      return 0.0 if self.chance(p_zero) else value
    return 0.0 if self.chance(p_zero) else self.uniform(lo, hi)

  def choice(self, probs: Sequence[float]) -> int:
    """An index drawn with the given (unnormalised) probabilities."""
    return int(self.rng.choice(len(probs), p=np.asarray(probs) / sum(probs)))


def member_seed(sweep_seed: int, index: int) -> int:
  """Member `index` (0-based)'s training seed."""
  return int(sweep_seed * 1000 + index + 1)


def check_members(members, where: str) -> None:
  """Raises SweepError unless `members` is a list of complete hyperparameter dicts."""
  if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
    raise SweepError(f"{where} must return a list of dicts (one per member), got "
                     f"{type(members).__name__}.")
  for i, member in enumerate(members):
    missing = [k for k in REQUIRED if k not in member]
    if missing:
      raise SweepError(f"{where}: member {i + 1} lacks {missing}; every member needs "
                       f"{sorted(REQUIRED)}.")
    for key, kind in REQUIRED.items():
      value = member[key]
      if isinstance(value, bool) or not isinstance(value, kind):
        raise SweepError(f"{where}: member {i + 1} has {key}={value!r}; it must be "
                         f"{'an integer' if kind is numbers.Integral else 'a number'}.")
    if member["epochs"] < 1 or not member["lr"] > 0:
      raise SweepError(f"{where}: member {i + 1} needs epochs >= 1 and lr > 0, got "
                       f"epochs={member['epochs']}, lr={member['lr']}.")
