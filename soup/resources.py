"""What one config's run computes with, built on first use: data, model, mesh, evaluator.

`Resources` is handed to every stage of soup/experiment.py; `make_task` builds the
dataset a config names, from soup/data/registry.py (soup/data/task.py is the interface).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from soup import evaluate as evaluate_lib, mesh as mesh_lib, models, results, stats, trees
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
    self._param_shapes = None

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
    return self.evaluate_many([params])[0]

  def evaluate_many(self, group: Sequence[PyTree]) -> list[dict[str, np.ndarray]]:
    """Logits of each model of `group` on every split; each split's batches are read
    (ImageNet's: decoded) once for the whole group (soup/evaluate.py)."""
    bs = self.config.eval.batch_size
    per_split = {col: self.evaluator.logits_of_batches_many(group, split.iterate(bs))
                 for col, split in self.splits().items()}
    return [{col: logits[i] for col, logits in per_split.items()} for i in range(len(group))]

  def eval_group_size(self, models: int) -> int:
    """How many of `models` models to evaluate together: config.eval.group_size, or with 0
    as many as the devices hold (their params beside one forward pass's working memory).
    A configured group that cannot fit stops here, before any model is evaluated."""
    configured = int(self.config.eval.get("group_size", 0))
    if models <= 1 or configured == 1:
      return 1
    model_bytes, forward_bytes = self.eval_footprint()
    free, source = evaluate_lib.free_device_memory(self.mesh)
    host_free = evaluate_lib.host_free_bytes()
    if jax.process_count() > 1:  # One group size for every process: each runs the same steps.
      from jax.experimental import multihost_utils
      free, host_free = (int(v) for v in multihost_utils.process_allgather(
          np.array([free, host_free], np.int64)).min(axis=0))
    # The host keeps each model's logits (and, in the host layout, its params) until the
    # group ends: ImageNet's 193k x 1000 float32 logits are 0.77 GB a model.
    logits_bytes = sum(len(s) for s in self.splits().values()) * self.num_classes * 4
    host_params = 0 if self.layout.is_sharded else model_bytes
    size = evaluate_lib.group_size(configured, models, model_bytes, forward_bytes, free, source,
                                   host_params + logits_bytes, host_free)
    log.info("evaluating %d models in groups of %d (%.2f GiB of params each, %.2f GiB for a "
             "forward pass, %.2f GiB free per device: %s; %.2f GiB of logits each on the host)",
             models, size, model_bytes / 2**30, forward_bytes / 2**30, free / 2**30, source,
             logits_bytes / 2**30)
    return size

  def eval_footprint(self) -> tuple[int, int]:
    """Device bytes of one model's params as evaluated (replicated, or the rules' shards),
    and of one forward pass besides them (batch, activations, logits), per device."""
    flat = trees.flatten_with_names(self.expected_param_shapes())
    shardings = (self.layout.output_shardings(flat) if self.layout.is_sharded
                 else dict.fromkeys(flat, mesh_lib.replicated(self.mesh)))
    placed = trees.unflatten({n: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shardings[n])
                              for n, s in flat.items()})
    return (evaluate_lib.bytes_per_device(flat, shardings),
            self.evaluator.forward_bytes(placed, self.image_spec()))

  def held_out_accuracy(self, params: PyTree) -> float:
    """The held-out split's metric (accuracy; a GLUE task's own, e.g. CoLA's Matthews)."""
    split = self.splits()[self.columns.held_out]
    return split.score(self.evaluator.logits_of_batches(
        params, split.iterate(self.config.eval.batch_size)))

  def image_spec(self) -> jax.ShapeDtypeStruct:
    """Shape and dtype of one evaluation image as it reaches the devices (uint8)."""
    sample = next(iter(self.splits()[self.columns.held_out].iterate(1)))
    return jax.ShapeDtypeStruct(sample.shape[1:], sample.dtype)

  def expected_param_shapes(self) -> PyTree:
    """Param shapes and dtypes the config's model has (no computation; traced once)."""
    if self._param_shapes is None:
      image = self.image_spec()
      model = self.model(self.num_classes)
      self._param_shapes = jax.eval_shape(
          lambda x: model.init(jax.random.key(0), self.task.preprocess(x)),
          jax.ShapeDtypeStruct((1, *image.shape), image.dtype))["params"]
    return self._param_shapes

  def row(self, name: str, recipe: str, logits: dict, ingredients: list[str], cost: int,
          **extra) -> dict:
    """A results row: the metric on every split, their shift mean, the recipe's details, and
    per-example correctness (packed, soup/stats.py), which stays in the soups' caches for
    the report's paired bootstrap intervals while the rest goes to results.jsonl."""
    splits = self.splits()
    scores = {col: splits[col].score(logits[col]) for col in splits}
    scores["avg_shifts"] = results.avg_shifts(scores, self.columns)
    correct = {col: stats.pack_correct(np.argmax(splits[col].scored_logits(
        np.asarray(logits[col], np.float32)), axis=-1) == splits[col].labels) for col in splits}
    return {"model_name": name, "recipe": recipe, **scores, "ingredients": ingredients,
            "inference_cost": cost, **self.task.provenance(), **extra, "correct": correct}


# --- Tasks ----------------------------------------------------------------------


def make_task(data_config):
  return datasets.get(data_config.name).task(data_config)


def task_columns(data_config) -> results.Columns:
  return datasets.get(data_config.name).columns_of(data_config)
