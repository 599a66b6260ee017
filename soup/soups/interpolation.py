"""Beyond the paper: WiSE-FT interpolation and Model Stock.

WiSE-FT (Wortsman et al., 2022b): theta(alpha) = (1 - alpha) theta_0 + alpha theta_ft.
Model Stock (Jang et al., 2024): per layer, with k fine-tunes of one
initialization theta_0 and cos the mean pairwise cosine between their deltas,
    t = k cos / (1 + (k - 1) cos),   theta = t mean(theta_i) + (1 - t) theta_0.
Both take params or ingredient checkpoint paths and stream them leaf by leaf.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from soup import memory
from soup.soups import average

log = logging.getLogger(__name__)

PyTree = Any


def _leaf_buffer(specs) -> np.ndarray:
  biggest = max(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in specs.values())
  return memory.aligned_empty((biggest,), np.uint8)


def wise_ft(initial: average.Source, finetuned: average.Source, alpha: float,
            verify: bool = True) -> PyTree:
  """(1 - alpha) initial + alpha finetuned, computed in float32 one leaf at a time."""
  init, ft = average.open_sources([initial, finetuned], verify)
  buffers = _leaf_buffer(init.specs), _leaf_buffer(init.specs)
  out = {}
  for name, spec in init.specs.items():
    a, b = init.read(name, buffers[0]), ft.read(name, buffers[1])
    out[name] = ((1 - alpha) * np.asarray(a, np.float32) + alpha * np.asarray(b, np.float32)
                 ).astype(np.dtype(spec.dtype))
  init.release()
  ft.release()
  return average.as_tree(out, init)


def interpolation_ratio(dots: float, zeros: int, k: int) -> float:
  """Model Stock's t for one tensor, before clipping.

  `dots` is the sum over pairs i < j of non-zero deltas of cos(delta_i, delta_j) =
  u_i . u_j, the unit deltas' dot products; `zeros` counts the zero deltas. A pair of
  zero deltas counts as aligned (cos 1: the layer stays at theta_0 whatever t is), a
  zero delta with a non-zero one as orthogonal (cos 0). The mean over the k(k-1)/2
  pairs equals (||sum u_i||^2 - k) / (k (k - 1)) when no delta is zero.
  """
  cos = (dots + zeros * (zeros - 1) / 2) / (k * (k - 1) / 2)
  denominator = 1 + (k - 1) * cos
  if denominator <= 0:  # cos <= -1/(k-1): the deltas cancel; t would be -inf.
    return -np.inf
  return k * cos / denominator


def model_stock(initial: average.Source, finetuned: Sequence[average.Source],
                verify: bool = True) -> tuple[PyTree, dict[str, float]]:
  """Returns the Model Stock params and each tensor's interpolation ratio t.

  One pass over the fine-tunes, each read leaf by leaf: per tensor it keeps the
  running mean of the fine-tunes (stream_average's arithmetic) and the running sum
  S of the unit deltas u_i = (theta_i - theta_0) / ||theta_i - theta_0||; the sum of
  pairwise cosines grows by S . u_i as u_i is added (vectors in float32, the sums of
  dot products in float64). Memory: two models in float32 (mean and S) plus leaf
  buffers; a checkpoint path for theta_0 is re-read per leaf
  rather than held. t is clipped to [0, 1] (degenerate tensors, e.g. attention key
  biases that only weight decay moves, have negative t) and the clipped ones logged.
  """
  k = len(finetuned)
  if k < 2:
    raise ValueError("Model Stock needs at least two fine-tuned models.")
  opened = average.open_sources([initial, *finetuned], verify)
  init, fts = opened[0], opened[1:]
  specs = init.specs
  mean = memory.aligned_tree(specs, np.float32)
  unit_sum = memory.aligned_tree(specs, np.float32)
  dots = dict.fromkeys(specs, 0.0)
  zeros = dict.fromkeys(specs, 0)
  buffers = _leaf_buffer(specs), _leaf_buffer(specs)
  scratch = np.empty(average.BLOCK, np.float32)
  delta = memory.aligned_empty((max(int(np.prod(s.shape)) for s in specs.values()),),
                                    np.float32)
  for i, ft in enumerate(fts):
    coef = np.float32(1.0 / (i + 1))
    for name in specs:
      x = ft.read(name, buffers[0])
      d = delta[:x.size]  # theta_i - theta_0 in float32, as the pairwise implementation had it.
      np.subtract(x.reshape(-1), init.read(name, buffers[1]).reshape(-1), out=d, dtype=np.float32)
      if i == 0:
        np.copyto(mean[name], x, casting="same_kind")
        unit_sum[name][...] = 0
      else:
        average.host_update(mean[name], x, coef, scratch)
      norm = float(np.sqrt(np.dot(d, d)))
      if norm == 0:
        zeros[name] += 1
        continue
      d /= np.float32(norm)  # The unit delta u_i.
      total = unit_sum[name].reshape(-1)
      dots[name] += float(np.dot(total, d))
      total += d
    ft.release()
  del unit_sum
  ratios, clipped = {}, {}
  for name, spec in specs.items():
    raw = interpolation_ratio(dots[name], zeros[name], k)
    t = float(np.clip(raw, 0.0, 1.0))
    if t != raw:
      clipped[name] = raw
    ratios[name] = t
    w0 = np.asarray(init.read(name, buffers[1]), np.float32)
    m = mean[name]
    np.multiply(m, t, out=m)  # t * mean + (1 - t) * theta_0, rounded as written.
    m += (1 - t) * w0
  init.release()
  if clipped:
    log.warning("model stock: t clipped to [0, 1] for %d tensor(s): %s", len(clipped),
                ", ".join(f"{n} ({t:.3g})" for n, t in sorted(clipped.items())))
  merged = {n: mean[n].astype(np.dtype(s.dtype), copy=False) for n, s in specs.items()}
  return average.as_tree(merged, init), ratios
