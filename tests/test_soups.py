"""Exact checks of the soup recipes (model-agnostic: plain pytrees)."""

import json
from pathlib import Path

import numpy as np
import pytest

from soup import checkpoints, metrics, soups, trees as tree_lib
from soup.soups import greedy


def _tree(rng, scale=1.0, dtype=np.float32):
  return {"dense": {"kernel": (rng.normal(size=(5, 3)) * scale).astype(dtype),
                    "bias": (rng.normal(size=(3,)) * scale).astype(dtype)},
          "norm": {"scale": rng.normal(size=(7,)).astype(dtype)}}


def _assert_trees_equal(a, b, exact=True):
  fa, fb = tree_lib.flatten_with_names(a), tree_lib.flatten_with_names(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert fa[k].dtype == fb[k].dtype, k
    if exact:
      np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
    else:
      np.testing.assert_allclose(fa[k], fb[k], rtol=2e-6, atol=1e-7, err_msg=k)


def test_soup_of_identical_checkpoints_is_that_checkpoint(tmp_path):
  params = _tree(np.random.default_rng(0))
  paths = []
  for i in range(5):
    checkpoints.save_ingredient(tmp_path / f"m{i}", params)
    paths.append(tmp_path / f"m{i}")
  _assert_trees_equal(soups.weighted_average(paths), params)
  _assert_trees_equal(soups.weighted_average([params] * 3, [0.2, 0.5, 0.3]), params)


def test_ingredients_save_and_load_with_relative_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  params = _tree(np.random.default_rng(10))
  checkpoints.save_ingredient("rel/model", params, {"note": "relative"})
  _assert_trees_equal(checkpoints.load_ingredient("rel/model"), params)
  assert checkpoints.ingredient_metadata("rel/model")["metadata"] == {"note": "relative"}


def test_uniform_soup_equals_numpy_mean_of_restored_ingredients(tmp_path):
  rng = np.random.default_rng(1)
  paths = []
  for i in range(6):
    checkpoints.save_ingredient(tmp_path / f"m{i}", _tree(rng))
    paths.append(tmp_path / f"m{i}")
  restored = [checkpoints.load_ingredient(p) for p in paths]
  expected = {k: np.mean(np.stack([tree_lib.flatten_with_names(r)[k] for r in restored]), 0,
                         dtype=np.float64).astype(np.float32)
              for k in tree_lib.flatten_with_names(restored[0])}
  got = tree_lib.flatten_with_names(soups.weighted_average(paths))
  for k, v in expected.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
  # Streaming from paths and averaging in memory run the same arithmetic: bit-equal.
  _assert_trees_equal(soups.weighted_average(paths), soups.weighted_average(restored))


def test_weighted_average_matches_numpy():
  rng = np.random.default_rng(2)
  trees = [_tree(rng) for _ in range(4)]
  w = np.array([0.1, 0.0, 2.0, 0.9])
  got = tree_lib.flatten_with_names(soups.weighted_average(trees, w))
  for k in got:
    stacked = np.stack([tree_lib.flatten_with_names(t)[k] for t in trees]).astype(np.float64)
    np.testing.assert_allclose(got[k], np.tensordot(w / w.sum(), stacked, 1), rtol=1e-5, atol=1e-6)


def test_bfloat16_ingredients_are_averaged_in_float32_and_keep_their_dtype():
  import ml_dtypes
  a = {"w": np.full((4,), 1.0, ml_dtypes.bfloat16)}
  b = {"w": np.full((4,), 1.0078125, ml_dtypes.bfloat16)}  # 1 + 2^-7, one bf16 ulp above 1.
  c = {"w": np.full((4,), 1.0078125, ml_dtypes.bfloat16)}
  out = soups.weighted_average([a, b, c])
  assert out["w"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(out["w"].astype(np.float32), np.float32(1.0078125))


def test_tree_mismatch_is_an_error_naming_the_key_path():
  rng = np.random.default_rng(3)
  a, b = _tree(rng), _tree(rng)
  b["dense"]["kernel"] = np.zeros((5, 4), np.float32)
  with pytest.raises(soups.IngredientMismatchError, match="'dense/kernel' has shape"):
    soups.weighted_average([a, b])
  c = _tree(rng)
  del c["norm"]
  with pytest.raises(soups.IngredientMismatchError, match="norm/scale"):
    soups.weighted_average([a, c])
  d = _tree(rng)
  d["dense"]["bias"] = d["dense"]["bias"].astype(np.float16)
  with pytest.raises(soups.IngredientMismatchError, match="'dense/bias' has dtype"):
    soups.weighted_average([a, d])


def _linear_eval(x_eval, y_eval):
  def evaluate(params):
    return metrics.accuracy(x_eval @ params["w"], y_eval)
  return evaluate


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("comparison", [">", ">="])
def test_greedy_soup_never_below_best_individual(seed, comparison):
  rng = np.random.default_rng(seed)
  x, y = rng.normal(size=(200, 6)).astype(np.float32), rng.integers(0, 3, 200)
  base = rng.normal(size=(6, 3)).astype(np.float32)
  ingredients = {f"m{i}": {"w": base + rng.normal(size=(6, 3)).astype(np.float32)
                                 * rng.uniform(0.1, 3)}
                 for i in range(7)}
  evaluate = _linear_eval(x, y)
  scores = {n: evaluate(p) for n, p in ingredients.items()}
  result = soups.greedy_soup(ingredients, scores, evaluate, comparison=comparison)
  assert result.held_out >= max(scores.values())
  assert result.ingredients[0] == max(scores, key=scores.get)
  # The reported accuracy is the soup's, and the soup is the mean of what it kept.
  assert evaluate(result.result) == result.held_out
  expected = soups.weighted_average([ingredients[n] for n in result.ingredients])
  np.testing.assert_allclose(result.result["w"], expected["w"], rtol=1e-6, atol=1e-7)
  # History: candidates in held-out order, each accepted only when it improved.
  assert [h["name"] for h in result.history] == greedy.ranked(scores)
  best = result.history[0]["held_out"]
  for h in result.history[1:]:
    improved = h["held_out"] > best or (comparison == ">=" and h["held_out"] == best)
    assert h["accepted"] == improved
    best = h["held_out"] if h["accepted"] else best


def test_greedy_comparison_strict_vs_non_strict():
  """A candidate that ties is added with '>=' and skipped with '>'."""
  ingredients = {"a": {"w": np.array([1.0], np.float32)}, "b": {"w": np.array([3.0], np.float32)}}
  evaluate = lambda p: 0.5  # Every soup ties.
  scores = {"a": 0.5, "b": 0.5}  # Tied: the official order tries "b" first.
  assert soups.greedy_soup(ingredients, scores, evaluate, ">").ingredients == ["b"]
  assert soups.greedy_soup(ingredients, scores, evaluate, ">=").ingredients == ["b", "a"]
  assert soups.greedy_soup(ingredients, scores, evaluate, ">=",
                           tie_order="listed").ingredients == ["a", "b"]
  with pytest.raises(ValueError, match="comparison"):
    soups.greedy_soup(ingredients, scores, evaluate, ">>")


def _official_order(scores):
  """model-soups main.py lines 151-154 (commit d5398f1), verbatim but for names."""
  import operator
  accs = sorted(scores.items(), key=operator.itemgetter(1))
  accs.reverse()
  return [x[0] for x in accs]


def test_greedy_tie_order_on_the_released_results():
  path = Path(__file__).parent / "data" / "paper" / "individual_model_results.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  scores = {r["model_name"]: r["ImageNet2p"] for r in rows}
  assert scores["model_4"] == scores["model_5"]  # The released tie.
  order = greedy.ranked(scores)
  assert order == _official_order(scores)
  assert order.index("model_5") + 1 == order.index("model_4")
  listed = greedy.ranked(scores, tie_order="listed")
  assert listed.index("model_4") + 1 == listed.index("model_5")
  # Nothing else moves: only the tied pair differs between the two orders.
  assert [i for i, (a, b) in enumerate(zip(order, listed)) if a != b] == [
      order.index("model_5"), order.index("model_4")]


def test_greedy_tie_order_synthetic_and_shared_by_the_greedy_ensemble():
  scores = {"m0": 0.5, "m1": 0.7, "m2": 0.5, "m3": 0.7, "m4": 0.6, "m5": 0.5}
  assert greedy.ranked(scores) == ["m3", "m1", "m4", "m5", "m2", "m0"] == _official_order(scores)
  assert greedy.ranked(scores, "listed") == ["m1", "m3", "m4", "m0", "m2", "m5"]
  with pytest.raises(ValueError, match="tie_order"):
    greedy.ranked(scores, "random")
  labels = np.arange(4) % 2
  logits = {n: np.zeros((4, 2), np.float32) for n in scores}
  for order in ("reversed", "listed"):
    result = soups.greedy_ensemble(logits, labels, scores, tie_order=order)
    assert [h["name"] for h in result.history] == greedy.ranked(scores, order)


def test_greedy_ensemble_of_one_member_is_that_member():
  rng = np.random.default_rng(4)
  logits = {"only": rng.normal(size=(50, 5)).astype(np.float32)}
  labels = rng.integers(0, 5, 50)
  result = soups.greedy_ensemble(logits, labels)
  assert result.ingredients == ["only"]
  np.testing.assert_array_equal(result.result, logits["only"])
  assert result.held_out == metrics.accuracy(logits["only"], labels)


def test_greedy_ensemble_never_below_best_member_and_averages_logits():
  rng = np.random.default_rng(5)
  labels = rng.integers(0, 4, 300)
  logits = {f"m{i}": (np.eye(4)[labels] * rng.uniform(0, 2)
                      + rng.normal(size=(300, 4)) * 1.5).astype(np.float32)
            for i in range(6)}
  result = soups.greedy_ensemble(logits, labels)
  best = max(metrics.accuracy(member, labels) for member in logits.values())
  assert result.held_out >= best
  np.testing.assert_allclose(result.result,
                             soups.logit_ensemble([logits[n] for n in result.ingredients]),
                             rtol=1e-6, atol=1e-6)
  assert metrics.accuracy(result.result, labels) == result.held_out


def test_logit_ensemble_and_class_mask():
  a = np.array([[1.0, 0.0, 5.0]], np.float32)
  b = np.array([[3.0, 0.0, -5.0]], np.float32)
  np.testing.assert_array_equal(soups.logit_ensemble([a, b]), [[2.0, 0.0, 0.0]])
  assert metrics.accuracy(a, np.array([2])) == 1.0
  assert metrics.accuracy(a, np.array([0]), class_mask=np.array([True, True, False])) == 1.0


def test_wise_ft_endpoints_and_midpoint():
  rng = np.random.default_rng(6)
  theta0, theta1 = _tree(rng), _tree(rng)
  _assert_trees_equal(soups.wise_ft(theta0, theta1, 0.0), theta0)
  _assert_trees_equal(soups.wise_ft(theta0, theta1, 1.0), theta1)
  mid = soups.wise_ft(theta0, theta1, 0.5)
  np.testing.assert_allclose(mid["dense"]["kernel"],
                             (theta0["dense"]["kernel"] + theta1["dense"]["kernel"]) / 2,
                             rtol=1e-6)


def test_model_stock_with_identical_deltas_is_the_finetuned_model():
  rng = np.random.default_rng(7)
  theta0, ft = _tree(rng), _tree(rng)
  merged, ratios = soups.model_stock(theta0, [ft, ft, ft])
  assert all(abs(t - 1.0) < 1e-6 for t in ratios.values())
  _assert_trees_equal(merged, ft, exact=False)


def test_model_stock_orthogonal_deltas_pull_toward_the_initialization():
  theta0 = {"w": np.zeros(2, np.float32)}
  a, b = {"w": np.array([1.0, 0.0], np.float32)}, {"w": np.array([0.0, 1.0], np.float32)}
  merged, ratios = soups.model_stock(theta0, [a, b])
  assert ratios["w"] == 0.0  # cos = 0 -> t = 0: the initialization itself.
  np.testing.assert_array_equal(merged["w"], [0.0, 0.0])
  c = {"w": np.array([1.0, 1.0], np.float32)}  # 45 degrees: t = 2cos/(1+cos).
  merged, ratios = soups.model_stock(theta0, [a, c])
  cos = 1 / np.sqrt(2)
  assert ratios["w"] == pytest.approx(2 * cos / (1 + cos))
  np.testing.assert_allclose(merged["w"], ratios["w"] * np.array([1.0, 0.5]), rtol=1e-6)


def _linear_apply(params, x):
  import jax.numpy as jnp
  return jnp.asarray(x, jnp.float32) @ params["w"] + params["b"]


def test_learned_soup_weights_on_the_simplex_and_identical_ingredients_reproduced():
  rng = np.random.default_rng(8)
  x = rng.normal(size=(100, 4)).astype(np.float32)
  y = rng.integers(0, 3, 100).astype(np.int32)
  same = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
  for by_layer in (False, True):
    result = soups.learned_soup([same, same, same], _linear_apply, x, y, by_layer=by_layer,
                                epochs=2,
                                batch_size=32)
    weights = np.array(list(result.weights.values()) if by_layer
                       else [result.weights]).reshape(-1, 3)
    assert np.all(weights >= 0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(result.params["w"], same["w"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result.params["b"], same["b"], atol=1e-7)


def test_learned_soup_learns_to_prefer_the_good_ingredient():
  rng = np.random.default_rng(9)
  x = rng.normal(size=(512, 4)).astype(np.float32)
  w_true = rng.normal(size=(4, 3)).astype(np.float32)
  y = np.argmax(x @ w_true, -1).astype(np.int32)
  good = {"w": w_true * 3, "b": np.zeros(3, np.float32)}
  bad = {"w": -w_true * 3, "b": np.zeros(3, np.float32)}
  result = soups.learned_soup([bad, good], _linear_apply, x, y, epochs=10, batch_size=64)
  assert result.weights[1] > 0.8
  assert abs(sum(result.weights) - 1) < 1e-6
  assert result.losses[-1] < result.losses[0]
