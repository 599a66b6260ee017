"""What one config's run computes with, built on first use: data, model, mesh, evaluator.

`Resources` is handed to every stage of soup/experiment.py; `make_task` builds the
dataset a config names, from soup/data/registry.py (soup/data/task.py is the interface).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from soup import evaluate as evaluate_lib, mesh as mesh_lib, models, results, rows
from soup.data import registry as datasets
from soup.soups import average

log = logging.getLogger(__name__)
PyTree = Any


class Resources:
  """The task (data), the model, the mesh and the evaluator of one config."""

  def __init__(self, config):
    self.config = config
    self.mesh = mesh_lib.make_mesh()
    self.columns = task_columns(config.data)
    self._task = None
    self._evaluator = None

  @property
  def task(self):
    """The dataset behind the experiment (see soup/data/task.py)."""
    if self._task is None:
      t = time.time()
      self._task = make_task(self.config.data)
      log.info("data ready in %.1fs", time.time() - t)
    return self._task

  @property
  def num_classes(self) -> int:
    return self.task.num_classes

  def splits(self):
    """Column name -> EvalSplit, in the results' column order."""
    return self.task.eval_splits()

  def model(self, num_classes: int):
    return models.build(self.config.model, num_classes)

  def apply_fn(self, num_classes: Optional[int] = None) -> Callable:
    model = self.model(num_classes or self.num_classes)
    preprocess = self.task.preprocess
    return lambda params, images: model.apply({"params": params}, preprocess(images))

  @property
  def layout(self):
    """Where soups are averaged and ingredients evaluated: the train state's shardings
    when the config has sharding rules, else every leaf split flat over the mesh."""
    return average.Layout.of_run(self.mesh, self.config.get("sharding_rules", ()))

  @property
  def evaluator(self) -> evaluate_lib.Evaluator:
    if self._evaluator is None:
      self._evaluator = evaluate_lib.Evaluator(self.apply_fn(), self.mesh,
                                               self.config.eval.batch_size)
    return self._evaluator

  def evaluate(self, params: PyTree) -> dict[str, np.ndarray]:
    bs = self.config.eval.batch_size
    return {col: self.evaluator.logits_of_batches(params, split.iterate(bs))
            for col, split in self.splits().items()}

  def held_out_accuracy(self, params: PyTree) -> float:
    """The held-out split's metric (accuracy; a GLUE task's own, e.g. CoLA's Matthews)."""
    split = self.splits()[self.columns.held_out]
    return split.score(self.evaluator.logits_of_batches(
        params, split.iterate(self.config.eval.batch_size)))

  def expected_param_shapes(self) -> PyTree:
    """Param shapes and dtypes the config's model has (no computation)."""
    sample = next(iter(self.splits()[self.columns.held_out].iterate(1)))
    model = self.model(self.num_classes)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), self.task.preprocess(x)),
                          jnp.asarray(sample))["params"]

  def row(self, name: str, recipe: str, logits: dict, ingredients: list[str], cost: int,
          **extra) -> dict:
    """A results row of this task's splits (soup/rows.py)."""
    return rows.make_row(self.splits(), self.columns, self.task.provenance(), name, recipe,
                         logits, ingredients, cost, **extra)


# --- Tasks ----------------------------------------------------------------------


def make_task(data_config):
  return datasets.get(data_config.name).task(data_config)


def task_columns(data_config) -> results.Columns:
  return datasets.get(data_config.name).columns_of(data_config)
