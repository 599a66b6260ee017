"""Paired bootstrap confidence intervals for accuracy differences.

Two models evaluated on the same examples are compared on the same resamples:
each bootstrap draw picks example indices once and scores both models on them,
so the interval reflects the noise of the evaluation set, not of two
independent draws (a paired test, much tighter when the models agree on most
examples). For the shift average, each shift split is resampled on its own and
the per-split differences are averaged with equal weights, as `avg_shifts` is.

Inputs are per-example correctness vectors (bool or 0/1), one per model and
split; `correct(logits, labels)` makes them. Everything is vectorised numpy,
seeded, and chunked so 10,000 resamples of 10,000 examples stay small.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from soup import metrics

NUM_RESAMPLES = 2_000
CONFIDENCE = 0.95
_CHUNK_ELEMENTS = 4_000_000  # Indices drawn at once (int32: 16 MB).


@dataclasses.dataclass(frozen=True)
class Interval:
  """A difference (a - b, in accuracy fraction) and its percentile bootstrap interval."""

  diff: float
  low: float
  high: float

  def as_dict(self) -> dict:
    return {"diff": self.diff, "low": self.low, "high": self.high}

  @property
  def excludes_zero(self) -> bool:
    return self.low > 0 or self.high < 0


def resample_means(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
  """Mean of `values` over each row of `indices` [num_resamples, n]."""
  return np.asarray(values, np.float64)[indices].mean(axis=1)


def _bootstrap_diff_means(diff: np.ndarray, num_resamples: int,
                          rng: np.random.Generator) -> np.ndarray:
  """Means of `diff` over num_resamples resamples with replacement, drawn in chunks."""
  n = len(diff)
  if n == 0:
    raise ValueError("Cannot bootstrap an empty evaluation split.")
  per_chunk = max(1, _CHUNK_ELEMENTS // n)
  out = np.empty(num_resamples)
  for start in range(0, num_resamples, per_chunk):
    stop = min(num_resamples, start + per_chunk)
    out[start:stop] = resample_means(diff, rng.integers(0, n, (stop - start, n), dtype=np.int32))
  return out


def _paired_diff(correct_a: np.ndarray, correct_b: np.ndarray) -> np.ndarray:
  a, b = np.asarray(correct_a, np.float64), np.asarray(correct_b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"Paired comparison needs two 1-D vectors of one length, got {a.shape} "
                     f"and {b.shape}.")
  return a - b


def _interval(point: float, draws: np.ndarray, confidence: float) -> Interval:
  tail = 100 * (1 - confidence) / 2
  low, high = np.percentile(draws, [tail, 100 - tail])
  # The point estimate lies inside the interval up to float rounding of a mean.
  return Interval(float(point), float(min(low, point)), float(max(high, point)))


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, *,
                     num_resamples: int = NUM_RESAMPLES, confidence: float = CONFIDENCE,
                     seed: int = 0, metric: str = "accuracy",
                     labels: np.ndarray | None = None) -> Interval:
  """Accuracy of a minus accuracy of b on one split, with its paired bootstrap interval.

  Another metric of soup.metrics.METRICS (CoLA's Matthews correlation) is scored on each
  resample from the correctness and the labels (binary: a prediction is recovered from them).
  """
  diff = _paired_diff(correct_a, correct_b)
  if metric == "accuracy":
    draws = _bootstrap_diff_means(diff, num_resamples, np.random.default_rng(seed))
    return _interval(diff.mean(), draws, confidence)
  score = metrics.METRICS[metric]
  a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
  y = np.asarray(labels)
  if y.shape != a.shape:
    raise ValueError(f"{metric} needs one label per example: {y.shape} labels for {a.shape}.")
  rng, n = np.random.default_rng(seed), len(a)
  draws = np.empty(num_resamples)
  per_chunk = max(1, _CHUNK_ELEMENTS // n)
  for start in range(0, num_resamples, per_chunk):
    stop = min(num_resamples, start + per_chunk)
    idx = rng.integers(0, n, (stop - start, n), dtype=np.int32)
    draws[start:stop] = score(a[idx], y[idx], axis=1) - score(b[idx], y[idx], axis=1)
  return _interval(float(score(a, y) - score(b, y)), draws, confidence)


def paired_bootstrap_average(correct_a: Mapping[str, np.ndarray],
                             correct_b: Mapping[str, np.ndarray], *,
                             num_resamples: int = NUM_RESAMPLES, confidence: float = CONFIDENCE,
                             seed: int = 0) -> Interval:
  """Difference of the equal-weight average accuracy over several splits (the shift average).

  Each split is resampled independently (its own examples), both models on the
  same indices; the per-split mean differences are averaged per draw.
  """
  if sorted(correct_a) != sorted(correct_b) or not correct_a:
    raise ValueError(f"Both models need the same non-empty splits, got {sorted(correct_a)} and "
                     f"{sorted(correct_b)}.")
  rng = np.random.default_rng(seed)
  points, draws = [], np.zeros(num_resamples)
  for name in sorted(correct_a):
    diff = _paired_diff(correct_a[name], correct_b[name])
    points.append(diff.mean())
    draws += _bootstrap_diff_means(diff, num_resamples, rng)
  return _interval(float(np.mean(points)), draws / len(points), confidence)


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict:
  """Mean, sample standard deviation and Student-t interval of the mean over seeds."""
  from scipy import stats as scipy_stats
  x = np.asarray(values, np.float64)
  if x.size == 0:
    raise ValueError("No values to aggregate.")
  mean = float(x.mean())
  if x.size == 1:
    return {"mean": mean, "std": float("nan"), "low": float("nan"), "high": float("nan"), "n": 1}
  std = float(x.std(ddof=1))
  half = float(scipy_stats.t.ppf(0.5 + confidence / 2, x.size - 1) * std / np.sqrt(x.size))
  return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "n": int(x.size)}


# --- Per-example correctness, carried by results rows ------------------------


def pack_correct(correct: np.ndarray) -> dict:
  """A bool vector as {"n", "bits"} (base64 of packed bits): 10,000 examples in 1.7 kB."""
  import base64
  bits = np.packbits(np.asarray(correct, bool))
  return {"n": int(np.size(correct)), "bits": base64.b64encode(bits.tobytes()).decode("ascii")}


def unpack_correct(packed: dict) -> np.ndarray:
  import base64
  bits = np.frombuffer(base64.b64decode(packed["bits"]), np.uint8)
  return np.unpackbits(bits)[: packed["n"]].astype(bool)
