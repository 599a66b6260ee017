"""Analysis figures: the plane's geometry exactly, the ingredient curves by hand, files written."""

import numpy as np
import pytest

from soup import analysis, soups


def _acc(params):
  """Accuracy peaks at w = (1, 1) and falls linearly with distance (a bowl-shaped basin)."""
  return float(max(0.0, 1.0 - np.linalg.norm(params["w"] - 1.0) / 4))


def test_plane_coordinates_reconstruct_the_three_points():
  rng = np.random.default_rng(0)
  origin, a, b = rng.normal(size=(3, 50))
  e1, e2, coords = analysis.plane_coordinates(origin, a, b)
  assert e1 @ e2 == pytest.approx(0.0, abs=1e-12)
  assert np.linalg.norm(e1) == pytest.approx(1.0) and np.linalg.norm(e2) == pytest.approx(1.0)
  for point, (x, y) in zip((origin, a, b), coords):
    np.testing.assert_allclose(origin + x * e1 + y * e2, point, atol=1e-12)
  with pytest.raises(ValueError, match="collinear"):
    analysis.plane_coordinates(origin, a, origin + 2 * (a - origin))


def test_error_landscape_values_and_figure(tmp_path):
  init = {"w": np.zeros(2, np.float32)}
  ft_a, ft_b = {"w": np.array([2.0, 0.0], np.float32)}, {"w": np.array([0.0, 2.0], np.float32)}
  calls = []
  land = analysis.error_landscape(init, ft_a, ft_b, lambda p: calls.append(1) or _acc(p), grid=5,
                                  margin=0.0, names=("init", "A", "B"))
  # margin 0: the grid spans x, y in [0, 2]; e1 = (1, 0), e2 = (0, 1), so grid point (x, y) is w.
  np.testing.assert_allclose(land["xs"], [0, 0.5, 1, 1.5, 2])
  err = np.array(land["error"])
  assert err[2, 2] == pytest.approx(0.0)  # w = (1, 1): the midpoint region is the basin floor.
  assert err[0, 0] == pytest.approx(np.sqrt(2) / 4)
  assert land["points"] == {"init": [0.0, 0.0], "A": [2.0, 0.0], "B": [0.0, 2.0]}
  assert land["point_error"]["A"] == pytest.approx(np.sqrt(2) / 4)
  # The fine-tunes' midpoint (1, 1) is the basin floor, below both.
  assert land["midpoint"] == {"xy": [1.0, 1.0], "error": pytest.approx(0.0)}
  assert len(calls) == 25 + 3 + 1
  path = tmp_path / "landscape.png"
  analysis.plot_landscape(land, path)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


@pytest.mark.parametrize("models", [(14.2, 14.6, 19.3), (14.6, 19.3, 14.2), (30.0, 12.1, 12.0)])
def test_landscape_levels_put_close_models_in_distinct_bands(models):
  grid = np.linspace(12.0, 84.0, 49).reshape(7, 7)  # A typical plane: 12-84% error.
  levels = analysis.landscape_levels(grid, models)
  assert np.all(np.diff(levels) > 0)
  assert levels[0] <= grid.min()  # Every grid point is coloured: none below the lowest level.
  assert levels[-1] == pytest.approx(2 * max(models))  # Dense where the models are.
  bands = np.digitize(models, levels)
  assert len(set(bands.tolist())) == 3 and 0 < bands.min() and bands.max() < len(levels)
  # The old 14 linear levels over the grid's span put the first case's three in one band.
  assert len(set(np.digitize(models, np.linspace(12, 84, 15)).tolist())) < 3


def test_ingredient_curves_by_hand_and_figure(tmp_path):
  models = {"a": np.array([1.0, 1.0]), "b": np.array([1.0, 0.2]), "c": np.array([5.0, 5.0]),
            "d": np.array([1.0, 1.8])}
  params = {n: {"w": w} for n, w in models.items()}
  scores = {n: _acc(p) for n, p in params.items()}  # a 1.0, b 0.8, d 0.8, c 0.0
  test_acc = lambda p: _acc(p) / 2  # noqa: E731
  listed = analysis.ingredient_curves(list(params), scores, params, _acc, test_acc,
                                      tie_order="listed")
  assert listed["order"] == ["a", "b", "d", "c"]
  curves = analysis.ingredient_curves(list(params), scores, params, _acc, test_acc)
  assert curves["order"] == ["a", "d", "b", "c"]  # The default, as the official code: reversed.
  # Uniform soups: a; mean(a, d) = (1, 1.4); mean(a, d, b) = (1, 1); mean of all = (2, 2).
  expected_uniform = [1.0, 1 - 0.4 / 4, 1.0, 1 - np.sqrt(2) / 4]
  np.testing.assert_allclose(curves["uniform_held_out"], expected_uniform)
  np.testing.assert_allclose(curves["uniform_test"], np.array(expected_uniform) / 2)
  # Greedy: a; a+d is worse (rejected); a+b is worse (rejected); a+c is worse (rejected).
  assert curves["greedy_ingredients"] == [["a"]] * 4
  np.testing.assert_allclose(curves["greedy_held_out"], [1.0] * 4)
  np.testing.assert_allclose(curves["greedy_test"], [0.5] * 4)
  path = tmp_path / "ingredients.png"
  analysis.plot_ingredient_curves(curves, path)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _plateaus(params):
  """Accuracy in steps of 0.05 of distance from (1, 1): nearby soups tie exactly."""
  return 1.0 - np.floor(np.linalg.norm(params["w"] - 1.0) * 20) / 80


@pytest.mark.parametrize("tie_order", soups.greedy.TIE_ORDERS)
@pytest.mark.parametrize("comparison", [">", ">="])
def test_the_last_greedy_point_is_the_greedy_soup(tie_order, comparison):
  # a and b tie alone and soups tie on plateaus: each of the four settings keeps a
  # different selection, and the curve must end at the greedy soup's on each.
  models = {"a": [1.04, 0.89], "b": [1.06, 0.9], "c": [0.93, 1.23], "d": [0.84, 1.07]}
  params = {n: {"w": np.array(w, np.float32)} for n, w in models.items()}
  scores = {n: _plateaus(p) for n, p in params.items()}
  soup = soups.greedy_soup(params, scores, _plateaus, comparison=comparison,
                           tie_order=tie_order)
  curves = analysis.ingredient_curves(list(params), scores, params, _plateaus,
                                      lambda p: 1 - _plateaus(p), comparison, tie_order)
  assert curves["order"] == [h["name"] for h in soup.history]
  assert curves["greedy_ingredients"][-1] == soup.ingredients
  assert curves["greedy_held_out"][-1] == soup.held_out
  assert curves["greedy_test"][-1] == pytest.approx(1 - _plateaus(soup.result))
  assert len({tuple(g) for g in curves["greedy_ingredients"]}) == len(soup.ingredients)
  # Given the greedy soup's own history and the models' test scores, the curves measure
  # none of those again and come out the same.
  counted = []
  reused = analysis.ingredient_curves(
      list(params), scores, params, lambda p: counted.append("held") or _plateaus(p),
      lambda p: counted.append("test") or 1 - _plateaus(p), comparison, tie_order,
      greedy_history=soup.history, test_scores={n: 1 - s for n, s in scores.items()})
  assert reused == curves
  assert counted.count("held") == len(params) - 1  # The uniform soups of 2..N only.
  with pytest.raises(ValueError, match="another greedy run"):
    analysis.ingredient_curves(list(params), scores, params, _plateaus, _plateaus, comparison,
                               tie_order, greedy_history=soup.history[::-1])
  expected = {("reversed", ">"): ["b", "d"], ("reversed", ">="): ["b", "a", "d", "c"],
              ("listed", ">"): ["a", "d"], ("listed", ">="): ["a", "b", "d", "c"]}
  assert soup.ingredients == expected[tie_order, comparison]


def test_greedy_curve_keeps_an_ingredient_that_helps():
  params = {"a": {"w": np.array([1.4, 1.0])}, "b": {"w": np.array([0.5, 1.0])}}
  scores = {n: _acc(p) for n, p in params.items()}  # a 0.9, b 0.875
  curves = analysis.ingredient_curves(["b", "a"], scores, params, _acc, _acc)
  assert curves["order"] == ["a", "b"]
  assert curves["greedy_ingredients"][-1] == ["a", "b"]  # The mean (0.95, 1) is near the optimum.
  assert curves["greedy_held_out"] == [pytest.approx(0.9), pytest.approx(1 - 0.05 / 4)]
  with pytest.raises(ValueError, match="comparison"):
    analysis.ingredient_curves(["a"], scores, params, _acc, _acc, comparison="<")


def test_first_plane_skips_a_copy_and_the_initialization():
  init = {"w": np.zeros(3)}
  models = {"copy_of_a": {"w": np.array([1.0, 0, 0])}, "a": {"w": np.array([1.0, 0, 0])},
            "same_as_init": {"w": np.zeros(3)}, "b": {"w": np.array([0.0, 2, 0])}}
  ranked = ["a", "copy_of_a", "same_as_init", "b"]
  assert analysis.first_plane(init, ranked, models.__getitem__) == ("a", "b")
  assert analysis.first_plane(init, ["a", "copy_of_a"], models.__getitem__) is None
