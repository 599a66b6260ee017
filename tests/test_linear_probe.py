"""The converged linear probe against scikit-learn's LogisticRegression on the same features."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from soup import linear_probe

sklearn_linear = pytest.importorskip("sklearn.linear_model")

CLASSES, DIM = 6, 16


def blobs(seed, n, spread=0.7):
  """Overlapping Gaussian classes: a probe reaches about 80-90%, so errors exist to disagree on."""
  rng = np.random.default_rng(0)
  means = rng.normal(size=(CLASSES, DIM)) * spread
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, CLASSES, n)
  return (means[labels] + rng.normal(size=(n, DIM))).astype(np.float32), labels


def objective(head, x, y, l2):
  """The probe's objective in float64 NumPy: mean cross-entropy + l2/2 ||kernel||^2."""
  logits = x.astype(np.float64) @ head["kernel"] + head["bias"]
  logits -= logits.max(1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  return -log_probs[np.arange(len(y)), y].mean() + 0.5 * l2 * np.sum(
      np.asarray(head["kernel"], np.float64) ** 2)


def sklearn_fit(x, y, l2):
  """scikit-learn's objective is C * sum(loss) + ||coef||^2 / 2: C = 1 / (l2 n)."""
  model = sklearn_linear.LogisticRegression(C=1.0 / (l2 * len(y)), max_iter=10_000, tol=1e-10)
  return model.fit(x, y)


@pytest.mark.parametrize("l2", [1e-3, 1e-2])
def test_fixed_l2_matches_sklearn(l2):
  x, y = blobs(1, 1500)
  x_test, y_test = blobs(2, 3000)
  fit = linear_probe.fit_logistic_regression(x, y, CLASSES, l2)
  assert fit.converged, fit.message
  ref = sklearn_fit(x, y, l2)
  ref_head = {"kernel": ref.coef_.T, "bias": ref.intercept_}
  # Same optimum: objectives agree to float32 precision, and ours is no worse.
  ours, theirs = objective(fit.head, x, y, l2), objective(ref_head, x, y, l2)
  assert ours <= theirs + 1e-6
  assert ours == pytest.approx(theirs, rel=1e-5)
  # Logits agree up to a per-example constant (softmax is shift-invariant).
  a, b = x_test @ fit.head["kernel"] + fit.head["bias"], ref.decision_function(x_test)
  a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
  np.testing.assert_allclose(a, b, atol=2e-3 * np.abs(b).max())
  accuracy = linear_probe.accuracy(fit.head, x_test, y_test)
  ref_accuracy = ref.score(x_test, y_test)
  assert 0.6 < ref_accuracy < 0.98
  assert abs(accuracy - ref_accuracy) <= 0.001  # 0.1 points.


def test_l2_chosen_on_held_out_then_refit_matches_sklearn():
  x, y = blobs(3, 1200, spread=0.5)
  x_test, y_test = blobs(4, 3000, spread=0.5)
  grid = (1e-4, 1e-3, 1e-2, 1e-1)
  result = linear_probe.fit_probe(x, y, CLASSES, l2_grid=grid, validation_fraction=0.25, seed=0)
  # 1e-1 was best and an end: the bracket tried 1, worse; the choice is inside.
  assert result.searched == (*grid, 1.0) and set(result.validation_accuracy) == {*grid, 1.0}
  assert result.l2 == max(result.searched, key=lambda l2: (result.validation_accuracy[l2], l2))
  assert result.l2 == 1e-1 and not result.on_edge
  # The same selection with scikit-learn on the same split.
  val = np.random.default_rng(0).permutation(len(y))[:300]
  train = np.setdiff1d(np.arange(len(y)), val)
  for l2 in result.searched:
    ref = sklearn_fit(x[train], y[train], l2)  # Mean over the fitted part, as ours.
    assert abs(ref.score(x[val], y[val]) - result.validation_accuracy[l2]) <= 1 / 300 + 1e-9
  final = sklearn_fit(x, y, result.l2)
  assert result.final.converged and result.final.l2 == result.l2
  assert abs(linear_probe.accuracy(result.head, x_test, y_test)
             - final.score(x_test, y_test)) <= 0.001


def test_converges_where_a_fixed_adam_budget_does_not():
  # The replaced probe, 20 Adam steps at lr 1e-3 from a zero head, moves each
  # weight by about 0.02 at most and stops far short of the optimum.
  x, y = blobs(5, 1000, spread=1.5)
  fit = linear_probe.fit_logistic_regression(x, y, CLASSES, 1e-4)
  head = {"kernel": jnp.zeros((DIM, CLASSES)), "bias": jnp.zeros(CLASSES)}
  adam = optax.adam(1e-3)
  state = adam.init(head)
  loss = lambda h: optax.softmax_cross_entropy_with_integer_labels(
      x @ h["kernel"] + h["bias"], y).mean()
  for _ in range(20):
    updates, state = adam.update(jax.grad(loss)(head), state)
    head = optax.apply_updates(head, updates)
  assert np.abs(np.asarray(head["kernel"])).max() <= 20 * 1e-3 * 1.1  # About lr per step.
  adam_head = jax.tree.map(np.asarray, head)
  assert objective(fit.head, x, y, 1e-4) < objective(adam_head, x, y, 1e-4) - 0.1


def test_bad_arguments_say_what_to_do():
  x, y = blobs(6, 50)
  with pytest.raises(ValueError, match="l2_grid"):
    linear_probe.fit_probe(x, y, CLASSES, l2_grid=(0.0, 1e-3))
  with pytest.raises(ValueError, match="validation_fraction"):
    linear_probe.fit_probe(x, y, CLASSES, validation_fraction=1.0)
  with pytest.raises(ValueError, match="l2_bracket"):
    linear_probe.fit_probe(x, y, CLASSES, l2_bracket=-1)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
    linear_probe.fit_logistic_regression(x, y, 3, 1e-3)
  with pytest.raises(ValueError, match="one label each"):
    linear_probe.fit_logistic_regression(x, y[:10], CLASSES, 1e-3)


def weak_signal(n, dims, signal, seed=0):
  """Three classes, each a shift of `signal` along one of `dims` Gaussian dimensions."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n)
  x = rng.normal(size=(n, dims))
  x[:, :3] += signal * np.eye(3)[y]
  return x.astype(np.float32), y


@pytest.mark.parametrize("grid, direction", [((1e-5, 1e-4), "up"), ((10.0, 100.0), "down")])
def test_an_edge_choice_is_bracketed_to_an_interior_optimum(grid, direction):
  # Up: few examples of many noise dimensions want a strong L2, far above the grid.
  # Down: a clear signal in few dimensions wants a weak one, below it.
  x, y = weak_signal(1000, 100, 1.0) if direction == "up" else weak_signal(1000, 4, 2.0)
  fraction = 0.8 if direction == "up" else 0.5
  alone = linear_probe.fit_probe(x, y, 3, l2_grid=grid, l2_bracket=0,
                                 validation_fraction=fraction)
  assert alone.on_edge and alone.searched == grid  # The grid as given: the optimum is outside.
  result = linear_probe.fit_probe(x, y, 3, l2_grid=grid, validation_fraction=fraction)
  assert not result.on_edge
  assert min(result.searched) < result.l2 < max(result.searched)
  assert (result.l2 > max(grid)) if direction == "up" else (result.l2 < min(grid))
  decades = np.log10(result.searched)
  np.testing.assert_allclose(np.diff(decades), 1.0)  # One decade at a time, no more.
  assert result.l2 == max(result.validation_accuracy,
                          key=lambda l2: (result.validation_accuracy[l2], l2))
  info = result.info(grid)
  assert info["l2_grid"] == list(grid) and info["l2_searched"] == list(result.searched)
  assert not info["l2_on_edge"] and info["l2"] == result.l2


def test_the_bracket_stops_at_its_limit_and_says_so(caplog):
  x, y = weak_signal(1000, 100, 1.0)
  with caplog.at_level("WARNING"):
    result = linear_probe.fit_probe(x, y, 3, l2_grid=(1e-5, 1e-4), l2_bracket=1,
                                    validation_fraction=0.8)
  assert result.searched == (1e-5, 1e-4, 1e-3) and result.on_edge
  assert "still an end of the searched grid" in caplog.text and "l2_bracket" in caplog.text


def test_the_pixel_baseline_brackets_by_the_probes_default():
  from soup import recipes
  setting = next(s for s in recipes.settings() if s.path == "pixel_linear.l2_bracket")
  assert setting.default == linear_probe.DEFAULT_L2_BRACKET
