"""Baselines without pretraining: the floor every pretrained model must clear."""

from __future__ import annotations

import numpy as np


def pixel_features(task, images: np.ndarray) -> np.ndarray:
  """The task's own preprocessing (normalisation), flattened: one feature per pixel."""
  import jax.numpy as jnp
  return np.asarray(task.preprocess(jnp.asarray(images))).reshape(len(images), -1)


def pixel_linear_logits(task, settings, seed: int, batch_size: int = 2048
                        ) -> tuple[dict[str, np.ndarray], dict]:
  """Multinomial logistic regression on raw pixels of the fine-tuning split: logits per split,
  and the fit's info (the L2 chosen and the grid searched).

  Fitted by the same routine as the linear probe (soup/linear_probe.py's fit_probe, its L2
  bracketed the same way), so the comparison with model_0 differs only in the features.
  """
  from soup.linear_probe import fit_probe
  images, labels = task.finetune_examples(task.finetune_size())
  fit = fit_probe(pixel_features(task, images), labels, task.num_classes,
                  l2_grid=settings.l2_grid, l2_bracket=settings.l2_bracket,
                  validation_fraction=settings.validation_fraction,
                  max_iterations=settings.max_iterations, tolerance=settings.tolerance,
                  seed=seed, name="soups.pixel_linear")
  head = fit.head
  out = {}
  for column, split in task.eval_splits().items():
    out[column] = np.concatenate([pixel_features(task, batch) @ head["kernel"] + head["bias"]
                                  for batch in split.iterate(batch_size)])
  return out, fit.info(settings.l2_grid)
