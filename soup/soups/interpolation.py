"""Beyond the paper: WiSE-FT interpolation and Model Stock, both on the one averager.

WiSE-FT (Wortsman et al., 2022b): theta(alpha) = (1 - alpha) theta_0 + alpha theta_ft,
the weighted mean of the two with weights 1 - alpha and alpha.
Model Stock (Jang et al., 2024): per layer, with k fine-tunes of one
initialization theta_0 and cos the mean pairwise cosine between their deltas,
    t = k cos / (1 + (k - 1) cos),   theta = t mean(theta_i) + (1 - t) theta_0.
Both take params or ingredient checkpoint paths and a layout (soup/soups/average.py).
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from soup.soups import average

log = logging.getLogger(__name__)

PyTree = Any


def wise_ft(initial: average.Source, finetuned: average.Source, alpha: float,
            layout: Optional[average.Layout] = None, verify: bool = True) -> PyTree:
  """(1 - alpha) initial + alpha finetuned: the running mean of the two, in float32."""
  return average.weighted_average([initial, finetuned], [1 - alpha, alpha], layout,
                                  verify=verify)


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


@jax.jit
def _stock_step(unit_sum, dots, zeros, x, theta0):
  """Adds fine-tune x: per tensor, its unit delta u to the running sum S of unit deltas,
  and S . u (before adding it) to the sum of pairwise cosines."""
  def one(s, dot, zero, v, w):
    d = v.astype(jnp.float32) - w.astype(jnp.float32)
    norm = jnp.sqrt(jnp.vdot(d, d))
    u = jnp.where(norm > 0, d / jnp.where(norm > 0, norm, 1), 0)
    return (s + u, dot + jnp.where(norm > 0, jnp.vdot(s, u), 0),
            zero + jnp.where(norm > 0, 0, 1))
  out = {n: one(unit_sum[n], dots[n], zeros[n], x[n], theta0[n]) for n in x}
  return ({n: o[0] for n, o in out.items()}, {n: o[1] for n, o in out.items()},
          {n: o[2] for n, o in out.items()})


@jax.jit
def _stock_mix(mean, theta0, ratios):
  return {n: ratios[n] * m + (1 - ratios[n]) * theta0[n].astype(jnp.float32)
          for n, m in mean.items()}


def model_stock(initial: average.Source, finetuned: Sequence[average.Source],
                layout: Optional[average.Layout] = None,
                verify: bool = True) -> tuple[PyTree, dict[str, float]]:
  """Returns the Model Stock params and each tensor's interpolation ratio t.

  One pass over the fine-tunes, each read once into the layout: per tensor the running
  mean of the fine-tunes (the one averager's) and the running sum S of the unit deltas
  u_i = (theta_i - theta_0) / ||theta_i - theta_0||; the sum of pairwise cosines grows by
  S . u_i as u_i is added (float32). Memory: theta_0, the mean, S and one fine-tune, in
  the layout. t is clipped to [0, 1] (degenerate tensors, e.g. attention key biases that
  only weight decay moves, have negative t) and the clipped ones logged.
  """
  k = len(finetuned)
  if k < 2:
    raise ValueError("Model Stock needs at least two fine-tuned models.")
  opened = average.open_sources([initial, *finetuned], verify)
  specs = opened[0].specs
  mean = average.RunningMean(layout or average.Layout.host(), specs)
  theta0 = mean.reader.read(opened[0], reuse=False)
  unit_sum = jax.tree.map(lambda x: jnp.zeros_like(x, jnp.float32), theta0)
  dots = {n: jnp.float32(0) for n in specs}
  zeros = {n: jnp.int32(0) for n in specs}
  for ft in opened[1:]:
    x = mean.reader.read(ft)
    unit_sum, dots, zeros = _stock_step(unit_sum, dots, zeros, x, theta0)
    jax.block_until_ready(unit_sum)
    mean.add(x)  # Blocks too: then the reader's buffers are free for the next fine-tune.
    del x
  del unit_sum
  ratios, clipped = {}, {}
  for name in specs:
    raw = interpolation_ratio(float(dots[name]), int(zeros[name]), k)
    t = float(np.clip(raw, 0.0, 1.0))
    if t != raw:
      clipped[name] = raw
    ratios[name] = t
  if clipped:
    log.warning("model stock: t clipped to [0, 1] for %d tensor(s): %s", len(clipped),
                ", ".join(f"{n} ({t:.3g})" for n, t in sorted(clipped.items())))
  merged = _stock_mix(mean.mean, theta0, {n: np.float32(t) for n, t in ratios.items()})
  return average.as_tree(mean.output(merged), opened[0]), ratios
