"""The linear probe: multinomial logistic regression on frozen features (model_0's head).

`fit_probe` is the paper's "LP initialization" trained to convergence: full-batch
L-BFGS (scipy's L-BFGS-B, the solver scikit-learn's LogisticRegression uses) on
cached features, minimizing

  mean cross-entropy + l2 / 2 * ||kernel||^2     (the bias is not penalized)

which is scikit-learn's objective with C = 1 / (l2 * n). The L2 strength is chosen
on held-out: a seeded `validation_fraction` of the probe's examples is set aside,
one fit per value of `l2_grid` (strongest first, each warm-started from the last)
is scored there by accuracy, and the best value (the stronger one on a tie) is
refitted on every example. A best value at an end of the grid only says the
optimum may lie beyond it, so the search brackets: it adds the next decade past
that end (warm-started from its neighbour) until the best value is inside the
searched grid, at most `l2_bracket` decades (0: the grid as given). The
searched grid is returned and logged. Losses and gradients are computed by XLA in float32
(on the accelerator at paper scale); the optimizer keeps its state in float64.

The paper's LP settings are not published (nor its code); the CLIP paper's own
probes use the same recipe (L-BFGS logistic regression, L2 swept on a validation
split). It replaces a minibatch AdamW probe: a fixed number of Adam steps at lr
1e-3 from a zero head moves each weight by at most about lr per step, so it
stopped far short of this optimum.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

from soup import metrics

log = logging.getLogger(__name__)

# Decades; unit-norm CLIP features need little regularization.
DEFAULT_L2_GRID = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3)
# Decades the search may add past an end of the grid (module docstring).
DEFAULT_L2_BRACKET = 4


@dataclasses.dataclass
class ProbeFit:
  """One L-BFGS fit: its head, and whether and how it converged."""
  head: dict                # {"kernel": [dim, classes], "bias": [classes]}, float32.
  l2: float
  loss: float               # The objective at the solution.
  iterations: int
  converged: bool
  message: str


@dataclasses.dataclass
class ProbeResult:
  head: dict
  l2: float                                      # The chosen strength.
  validation_accuracy: dict[float, float]        # l2 -> accuracy on the held-out part.
  final: ProbeFit                                # The refit on every example.
  searched: tuple[float, ...] = ()               # Every l2 fitted, ascending (grid + bracket).
  on_edge: bool = False                          # The choice is still an end of `searched`.

  def info(self, grid: Sequence[float]) -> dict:
    """The choice and the grid searched, for an ingredient's or a row's info (JSON)."""
    return {"l2": self.l2, "l2_grid": [float(g) for g in sorted(grid)],
            "l2_searched": list(self.searched), "l2_on_edge": self.on_edge,
            "converged": self.final.converged,
            "validation_accuracy": {str(k): v for k, v in self.validation_accuracy.items()}}


@functools.lru_cache(maxsize=None)
def _objective(num_classes: int):
  """Jitted (flat params, features, labels, example weights, l2) -> (objective, gradient).

  In the inputs' dtype. The 0/1 example weights let every fit of the L2 search reuse
  one compilation over all the examples, the held-out part weighted out.
  """

  def loss(flat, x, y, weights, l2):
    dim = x.shape[1]
    kernel = flat[:dim * num_classes].reshape(dim, num_classes)
    bias = flat[dim * num_classes:]
    ce = optax.softmax_cross_entropy_with_integer_labels(x @ kernel + bias, y)
    return jnp.sum(weights * ce) / jnp.sum(weights) + 0.5 * l2 * jnp.sum(kernel * kernel)

  return jax.jit(jax.value_and_grad(loss))


def fit_logistic_regression(features: np.ndarray, labels: np.ndarray, num_classes: int,
                            l2: float, *, max_iterations: int = 1000, tolerance: float = 1e-6,
                            init: Optional[dict] = None, float64_polish: bool = True,
                            mask: Optional[np.ndarray] = None) -> ProbeFit:
  """Full-batch L-BFGS to the optimum of the L2-regularized multinomial log-loss.

  Runs in float32 until the largest gradient entry is below `tolerance` (scipy's
  gtol) or the objective stops decreasing at float32 round-off; then, if the
  gradient is still above `tolerance` and `float64_polish`, goes on from there in
  float64 (one more compile; slower per step on TPUs, but few steps remain).
  `mask` (boolean, one per example) fits on the selected examples only.
  """
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels, np.int32)
  if features.ndim != 2 or len(features) != len(labels):
    raise ValueError(f"features must be [n, dim] with one label each, got {features.shape} "
                     f"and {labels.shape}.")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}.")
  dim = features.shape[1]
  value_and_grad = _objective(num_classes)
  weights = np.ones(len(labels)) if mask is None else np.asarray(mask, np.float64)
  if init is None:
    flat = np.zeros(dim * num_classes + num_classes)
  else:
    flat = np.concatenate([np.ravel(init["kernel"]), np.ravel(init["bias"])]).astype(np.float64)

  def minimize(start, dtype, budget):
    x, y, l2_arr = jnp.asarray(features, dtype), jnp.asarray(labels), jnp.asarray(l2, dtype)
    w = jnp.asarray(weights, dtype)

    def fun(p):
      value, grad = value_and_grad(jnp.asarray(p, dtype), x, y, w, l2_arr)
      return float(value), np.asarray(grad, np.float64)

    # ftol: stop once a step gains less than the dtype can resolve in the objective.
    return scipy.optimize.minimize(
        fun, start, jac=True, method="L-BFGS-B",
        options=dict(maxiter=budget, gtol=tolerance, ftol=10 * float(jnp.finfo(dtype).eps),
                     maxcor=20, maxls=50))

  result = minimize(flat, jnp.float32, max_iterations)
  iterations = result.nit
  if (float64_polish and np.abs(result.jac).max() > tolerance
      and iterations < max_iterations):
    with jax.enable_x64(True):
      result = minimize(result.x, jnp.float64, max_iterations - iterations)
    iterations += result.nit
  flat = result.x.astype(np.float32)
  head = {"kernel": flat[:dim * num_classes].reshape(dim, num_classes),
          "bias": flat[dim * num_classes:]}
  # Without the float64 polish a float32 line search can fail at round-off: that counts
  # when the gradient is within 100x the tolerance (1e-4 for the default: scikit-learn's tol).
  converged = bool(result.success) or float(np.abs(result.jac).max()) <= 100 * tolerance
  return ProbeFit(head, float(l2), float(result.fun), int(iterations), converged,
                  str(result.message))


def accuracy(head: dict, features: np.ndarray, labels: np.ndarray) -> float:
  """The probe's accuracy on these features."""
  return metrics.accuracy(np.asarray(features, np.float32) @ head["kernel"] + head["bias"], labels)


def _choice(scores: dict[float, float]) -> float:
  return max(scores, key=lambda l2: (scores[l2], l2))  # Ties: the stronger regularization.


def _on_edge(best: float, scores: dict[float, float]) -> bool:
  return len(scores) > 1 and best in (min(scores), max(scores))


def fit_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, *,
              l2_grid: Sequence[float] = DEFAULT_L2_GRID,
              l2_bracket: int = DEFAULT_L2_BRACKET, validation_fraction: float = 0.1,
              max_iterations: int = 1000, tolerance: float = 1e-6, seed: int = 0,
              name: str = "probe") -> ProbeResult:
  """The converged linear probe, its L2 strength chosen on a held-out part (module docstring).

  `name` names the probe in the log ("probe", "pixel_linear").
  """
  if not l2_grid or min(l2_grid) <= 0:
    raise ValueError(f"config.{name}.l2_grid must hold positive values, got {tuple(l2_grid)}.")
  if not 0 < validation_fraction < 1:
    raise ValueError(f"config.{name}.validation_fraction must lie in (0, 1), "
                     f"got {validation_fraction}.")
  if l2_bracket < 0:
    raise ValueError(f"config.{name}.l2_bracket must be 0 or more, got {l2_bracket}.")
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels)
  order = np.random.default_rng(seed).permutation(len(labels))
  n_val = max(1, int(round(validation_fraction * len(labels))))
  val = order[:n_val]
  train = np.ones(len(labels), bool)
  train[val] = False
  scores, heads = {}, {}

  def score(l2: float, init: Optional[dict]) -> None:
    fit = fit_logistic_regression(features, labels, num_classes, l2, mask=train, init=init,
                                  max_iterations=max_iterations, tolerance=tolerance)
    heads[l2] = fit.head
    scores[l2] = accuracy(fit.head, features[val], labels[val])
    log.info("%s: l2 %.1e -> held-out accuracy %.4f (%d iterations, %s)", name, l2,
             scores[l2], fit.iterations, fit.message)

  head = None
  for l2 in sorted({float(g) for g in l2_grid}, reverse=True):  # Strong to weak: warm starts.
    score(l2, head)
    head = heads[l2]
  best, added = _choice(scores), 0
  while _on_edge(best, scores) and added < l2_bracket:
    step = 0.1 if best == min(scores) else 10.0  # Rounded: 1e-5 / 10 is 1e-6, not 1.0..02e-6.
    score(float(f"{best * step:.12g}"), heads[best])
    best, added = _choice(scores), added + 1
  searched = tuple(sorted(scores))
  on_edge = _on_edge(best, scores)
  listed = ", ".join(f"{g:.0e}" for g in searched)
  if on_edge:
    log.warning("%s: the chosen l2 %.1e is still an end of the searched grid (%s) after %d "
                "added decades; raise config.%s.l2_bracket or move config.%s.l2_grid.",
                name, best, listed, added, name, name)
  else:
    log.info("%s: chose l2 %.1e inside the searched grid (%s; %d decades added past "
             "config.%s.l2_grid's ends)", name, best, listed, added, name)
  final = fit_logistic_regression(features, labels, num_classes, best,
                                  max_iterations=max_iterations, tolerance=tolerance)
  if not final.converged:
    log.warning("%s: L-BFGS stopped before converging (%s); raise config.%s."
                "max_iterations.", name, final.message, name)
  return ProbeResult(final.head, best, scores, final, searched, on_edge)
