"""Paired bootstrap intervals and the over-seeds interval: exact and known-answer checks."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from soup import stats


def test_identical_models_give_a_zero_width_interval_at_zero():
  rng = np.random.default_rng(0)
  a = rng.random(500) < 0.8
  interval = stats.paired_bootstrap(a, a.copy(), num_resamples=300)
  assert (interval.diff, interval.low, interval.high) == (0.0, 0.0, 0.0)
  shifts = {"V2": a, "Sketch": rng.random(200) < 0.4}
  avg = stats.paired_bootstrap_average(shifts, dict(shifts), num_resamples=300)
  assert (avg.diff, avg.low, avg.high) == (0.0, 0.0, 0.0)


def test_strictly_better_on_every_example_is_above_zero():
  n = 400
  better, worse = np.ones(n, bool), np.zeros(n, bool)
  interval = stats.paired_bootstrap(better, worse, num_resamples=300)
  assert interval.diff == interval.low == interval.high == 1.0
  # Better on a subset, never worse: every resample's difference is >= 0, the interval > 0.
  rng = np.random.default_rng(1)
  b = rng.random(n) < 0.7
  a = b | (rng.random(n) < 0.3)
  interval = stats.paired_bootstrap(a, b, num_resamples=1000)
  assert interval.low > 0 and interval.excludes_zero
  assert interval.low <= interval.diff <= interval.high
  assert interval.diff == pytest.approx(a.mean() - b.mean())


def test_resample_means_by_hand():
  values = np.array([1.0, 0.0, -1.0])
  indices = np.array([[0, 0, 1], [2, 2, 2], [0, 1, 2]])
  np.testing.assert_allclose(stats.resample_means(values, indices), [2 / 3, -1.0, 0.0])


def test_two_example_case_matches_the_exact_bootstrap_distribution():
  # diff = [1, 0]: a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4,
  # so the 2.5th and 97.5th percentiles are 0 and 1, and the draws average 1/2.
  a, b = np.array([1, 0]), np.array([0, 0])
  interval = stats.paired_bootstrap(a, b, num_resamples=4000, seed=3)
  assert (interval.diff, interval.low, interval.high) == (0.5, 0.0, 1.0)
  draws = stats._bootstrap_diff_means(np.array([1.0, 0.0]), 4000, np.random.default_rng(3))
  assert set(np.unique(draws)) == {0.0, 0.5, 1.0}
  assert np.mean(draws == 0.5) == pytest.approx(0.5, abs=0.03)


def test_paired_is_tighter_than_the_unpaired_spread_and_seeded():
  rng = np.random.default_rng(2)
  b = rng.random(2000) < 0.8
  a = b.copy()
  a[rng.choice(2000, 20, replace=False)] ^= True  # The models agree on 99% of examples.
  paired = stats.paired_bootstrap(a, b, seed=5)
  assert paired == stats.paired_bootstrap(a, b, seed=5)
  unpaired_se = np.sqrt(a.mean() * (1 - a.mean()) / 2000 + b.mean() * (1 - b.mean()) / 2000)
  assert paired.high - paired.low < 2 * 1.96 * unpaired_se / 3


def test_shift_average_resamples_each_split_and_averages():
  rng = np.random.default_rng(4)
  splits_a = {"V2": np.ones(100, bool), "R": rng.random(300) < 0.5}
  splits_b = {"V2": np.zeros(100, bool), "R": splits_a["R"].copy()}
  avg = stats.paired_bootstrap_average(splits_a, splits_b, num_resamples=500)
  # V2 differs by 1 on every resample, R by 0: the average is exactly 0.5 on every draw.
  assert (avg.diff, avg.low, avg.high) == (0.5, 0.5, 0.5)
  with pytest.raises(ValueError, match="same non-empty splits"):
    stats.paired_bootstrap_average(splits_a, {"V2": splits_b["V2"]})


def test_mean_interval_over_seeds_by_hand():
  out = stats.mean_interval([0.80, 0.82, 0.84])
  assert out["mean"] == pytest.approx(0.82)
  assert out["std"] == pytest.approx(0.02)
  half = scipy_stats.t.ppf(0.975, 2) * 0.02 / np.sqrt(3)  # 4.303 * 0.02 / 1.732
  assert (out["low"], out["high"]) == (pytest.approx(0.82 - half), pytest.approx(0.82 + half))
  assert np.isnan(stats.mean_interval([0.5])["std"])


def test_pack_correct_round_trips():
  rng = np.random.default_rng(6)
  for n in (1, 7, 8, 1001):
    c = rng.random(n) < 0.5
    packed = stats.pack_correct(c)
    np.testing.assert_array_equal(stats.unpack_correct(packed), c)
    assert packed["n"] == n
