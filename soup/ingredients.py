"""The ingredient store: load, verify, and exclude bad ingredients with a reason.

An ingredient is a params-only checkpoint under models/<name>/ingredient
(soup/checkpoints.py). A missing, corrupted, non-finite (diverged) or
mismatched one is an error or a logged exclusion, per
config.soups.on_bad_ingredient; the exclusions and their reasons go into the
soup rows.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from soup import checkpoints, soups
from soup.layout import INITIALIZATION
from soup.workdir import Workdir

log = logging.getLogger(__name__)
PyTree = Any
BadIngredient = (checkpoints.CheckpointError, FloatingPointError, soups.IngredientMismatchError)


class IngredientStore:
  """The experiment's models by name (model_0 = initialization, model_k = members)."""

  def __init__(self, workdir: Workdir, soups_config, expected_shapes: Callable[[], PyTree],
               layout: soups.Layout):
    self.workdir = workdir
    self.config = soups_config
    self.layout = layout  # Where ingredients are evaluated (soup/soups/average.py).
    self._expected_shapes = expected_shapes  # The config's model, shapes only.
    self._verified: set[str] = set()  # Ingredients whose bytes passed load(), this process.

  def load(self, name: str) -> PyTree:
    """Params of an ingredient in the evaluation layout (each process reads only its
    devices' shards), checksums (if configured) and finiteness checked."""
    params = soups.restore(self.workdir.ingredient_dir(name), self.layout,
                           self.config.verify_checksums)
    soups.average.check_finite(params, name)
    return params

  def check(self, name: str, reference: PyTree) -> None:
    """Raises one of BadIngredient if `name` cannot go into a soup."""
    path = self.workdir.ingredient_dir(name)
    meta = checkpoints.ingredient_metadata(path)["metadata"]
    if meta.get("diverged"):
      raise FloatingPointError(f"{name} diverged (loss {meta.get('final_loss')}).")
    shapes = checkpoints.ingredient_shapes(path)
    try:
      soups.check_compatible(reference, shapes, "the config's model", name)
    except soups.IngredientMismatchError as e:
      if name == INITIALIZATION:  # Every member would fail: the model code or config changed.
        raise soups.IngredientMismatchError(
            f"{e} The workdir's models do not fit the current model definition; use a new "
            "workdir (or the code version that made this one).") from e
      raise
    if name not in self._verified:  # Bytes and finiteness too, once per process:
      self.load(name)               # a corrupted file is excluded here, not a crash later.
      self._verified.add(name)

  def usable(self, names: list[str]) -> tuple[list[str], dict[str, str]]:
    """The names fit for soups, and the excluded ones with the reason."""
    reference = self._expected_shapes()
    usable, excluded = [], {}
    for name in names:
      try:
        self.check(name, reference)
      except BadIngredient as e:
        if self.config.on_bad_ingredient == "error":
          raise
        log.warning("excluding %s from soups and baselines: %s", name, e)
        excluded[name] = str(e)
        continue
      usable.append(name)
    return usable, excluded
