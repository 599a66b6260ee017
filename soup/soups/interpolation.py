"""Beyond the paper: WiSE-FT interpolation and Model Stock.

WiSE-FT (Wortsman et al., 2022b): theta(alpha) = (1 - alpha) theta_0 + alpha theta_ft.
Model Stock (Jang et al., 2024): per layer, with k fine-tunes of one
initialization theta_0 and cos the mean pairwise cosine between their deltas,
    t = k cos / (1 + (k - 1) cos),   theta = t mean(theta_i) + (1 - t) theta_0.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import jax
import numpy as np

from soup.soups import average

PyTree = Any


def wise_ft(initial: PyTree, finetuned: PyTree, alpha: float) -> PyTree:
  average.check_compatible(initial, finetuned, "initialization", "fine-tuned model")
  return jax.tree.map(
      lambda a, b: ((1 - alpha) * np.asarray(a, np.float32) + alpha * np.asarray(b, np.float32)
                    ).astype(np.dtype(a.dtype)), initial, finetuned)


def _mean_pairwise_cosine(deltas: Sequence[np.ndarray]) -> float:
  cosines = []
  for a, b in itertools.combinations(deltas, 2):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    # Two zero deltas leave the layer at theta_0 whatever t is: call them aligned.
    cosines.append(1.0 if na == 0 or nb == 0 else float(np.dot(a, b) / (na * nb)))
  return float(np.mean(cosines))


def model_stock(initial: PyTree, finetuned: Sequence[PyTree]) -> tuple[PyTree, dict[str, float]]:
  """Returns the Model Stock params and each layer's interpolation ratio t."""
  k = len(finetuned)
  if k < 2:
    raise ValueError("Model Stock needs at least two fine-tuned models.")
  for i, f in enumerate(finetuned):
    average.check_compatible(initial, f, "initialization", f"fine-tuned model #{i}")
  from soup.checkpoints import flatten_with_names
  flat0 = flatten_with_names(initial)
  flats = [flatten_with_names(f) for f in finetuned]
  # The running mean: exact when the fine-tunes are identical.
  flat_mean = flatten_with_names(average.weighted_average(finetuned))
  ratios, merged = {}, {}
  for name, w0 in flat0.items():
    w0 = np.asarray(w0, np.float32)
    ws = [np.asarray(f[name], np.float32) for f in flats]
    cos = _mean_pairwise_cosine([(w - w0).reshape(-1).astype(np.float64) for w in ws])
    t = k * cos / (1 + (k - 1) * cos)
    ratios[name] = t
    merged[name] = (t * flat_mean[name].astype(np.float32) + (1 - t) * w0).astype(np.dtype(flat0[name].dtype))
  leaves = [merged[n] for n in flat0]
  return jax.tree.unflatten(jax.tree.structure(initial), leaves), ratios
