"""Beyond the paper: WiSE-FT interpolation and Model Stock, both on the one averager.

WiSE-FT (Wortsman et al., 2022b): theta(alpha) = (1 - alpha) theta_0 + alpha theta_ft,
the weighted mean of the two with weights 1 - alpha and alpha.
Model Stock (Jang et al., 2024): per layer, with k fine-tunes of one
initialization theta_0 and cos the mean pairwise cosine between their deltas,
    t = k cos / (1 + (k - 1) cos),   theta = t mean(theta_i) + (1 - t) theta_0.
Both take params or ingredient checkpoint paths and a layout (soup/soups/average.py).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from soup import memory
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


@functools.partial(jax.jit, donate_argnums=0)
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


def _stock_step_host(unit_sum, dots, zeros, x, theta0, delta) -> None:
  """_stock_step in numpy, in place (the host layout: S stays in host memory)."""
  for n in x:
    d = delta[:np.size(x[n])]
    np.subtract(np.asarray(x[n]).reshape(-1), np.asarray(theta0[n]).reshape(-1), out=d,
                dtype=np.float32)
    norm = float(np.sqrt(np.dot(d, d)))
    if norm == 0:
      zeros[n] += 1
      continue
    d /= np.float32(norm)
    total = unit_sum[n].reshape(-1)
    dots[n] += float(np.dot(total, d))
    total += d


@jax.jit
def _stock_mix(mean, theta0, ratios):
  return {n: ratios[n] * m + (1 - ratios[n]) * theta0[n].astype(jnp.float32)
          for n, m in mean.items()}


def model_stock(initial: average.Source, finetuned: Sequence[average.Source],
                layout: Optional[average.Layout] = None,
                verify: bool = True) -> tuple[PyTree, dict[str, float]]:
  """Returns the Model Stock params and each tensor's interpolation ratio t.

  One pass over the fine-tunes, each read once into the layout, group by group of
  leaves: per tensor the running mean of the fine-tunes (the one averager's) and the
  running sum S of the unit deltas u_i = (theta_i - theta_0) / ||theta_i - theta_0||; the
  sum of pairwise cosines grows by S . u_i as u_i is added (float32). theta_0's group is
  re-read with each (from the page cache) rather than held: memory is the mean, S and
  one group. t is clipped to [0, 1] (degenerate tensors, e.g. attention key biases that
  only weight decay moves, have negative t) and the clipped ones logged.
  """
  k = len(finetuned)
  if k < 2:
    raise ValueError("Model Stock needs at least two fine-tuned models.")
  opened = average.open_sources([initial, *finetuned], verify)
  init, specs = opened[0], opened[0].specs
  mean = average.RunningMean(layout or average.Layout.host(), specs)
  reader = mean.reader
  on_host = mean.on_host
  if on_host:  # S and the sums in host memory (numpy; the sums of dot products in float64).
    unit_sum = memory.aligned_tree(specs, np.float32)
    for v in unit_sum.values():
      v[...] = 0
    dots, zeros = dict.fromkeys(specs, 0.0), dict.fromkeys(specs, 0)
    delta = memory.aligned_empty((max(math.prod(s.shape) for s in specs.values()),), np.float32)
  else:
    unit_sum = {}
    dots = {n: jnp.float32(0) for n in specs}
    zeros = {n: jnp.int32(0) for n in specs}
  for i, ft in enumerate(opened[1:]):
    coef = None if i == 0 else np.float32(1.0 / (i + 1))
    for names in reader.groups:
      x = reader.read(ft, reuse=False, names=names)
      theta0 = reader.read(init, reuse=False, names=names)
      if on_host:
        _stock_step_host(unit_sum, dots, zeros, x, theta0, delta)
      else:
        part = {n: unit_sum.get(n, jnp.zeros(np.shape(x[n]), jnp.float32)) for n in names}
        new_sum, new_dots, new_zeros = _stock_step(part, {n: dots[n] for n in names},
                                                   {n: zeros[n] for n in names}, x, theta0)
        unit_sum.update(new_sum)
        dots.update(new_dots)
        zeros.update(new_zeros)
      mean.add_part(x, coef)
      del x, theta0
    memory.release_free_memory()  # The groups' buffers: back to the OS, not kept by glibc.
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
  merged = {}
  for names in reader.groups:  # t mean + (1 - t) theta_0, group by group.
    theta0 = reader.read(init, reuse=False, names=names)
    if on_host:  # In place in the mean, rounded as written.
      for n in names:
        m, t = mean.mean[n], ratios[n]
        np.multiply(m, t, out=m)
        m += (1 - t) * np.asarray(theta0[n], np.float32)
        merged[n] = m
    else:
      merged.update(_stock_mix({n: mean.mean[n] for n in names}, theta0,
                               {n: np.float32(ratios[n]) for n in names}))
  return average.as_tree(mean.output(merged), opened[0]), ratios
