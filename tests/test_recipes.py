"""The recipe registry: its checks, and that a new recipe is one function plus one line."""

import re
from pathlib import Path

import numpy as np
import pytest

from configs import fashion_mnist
from soup import recipes, report, results

ROOT = Path(__file__).resolve().parents[1]


def soups_config(**overrides):
  config = fashion_mnist.get_config("smoke")
  config.unlock()
  for key, value in overrides.items():
    target = config.soups
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config.soups


def test_registry_declares_every_recipe():
  config = soups_config()
  assert set(recipes.SOUP_RECIPES) == set(config.recipes)  # The default runs every recipe.
  for name, recipe in recipes.REGISTRY.items():
    assert recipe.name == name and recipe.label
    assert recipe.inference_cost in ("one", "per_ingredient")
    for key in recipe.settings:
      assert key in config, (name, key)
    assert set(recipe.needs(config)) <= set(recipes.SOUP_RECIPES)
  assert [n for n, r in recipes.REGISTRY.items() if r.make is None] == list(recipes.MODEL_RECIPES)


@pytest.mark.parametrize("recipes_list,endpoint,message", [
    (("uniform_soup", "greedy_soop"), "best_individual", "unknown recipe 'greedy_soop'"),
    (("individual",), "best_individual", "its rows come from the evaluate stage"),
    (("ensemble", "ensemble"), "best_individual", "lists a recipe twice"),
    (("wise_ft",), "greedy_soup", "wise_ft needs greedy_soup before it"),
    (("wise_ft", "uniform_soup"), "uniform_soup", "wise_ft needs uniform_soup before it"),
    (("wise_ft",), "ensemble", "wise_ft.endpoint must be one of"),
])
def test_check_refuses(recipes_list, endpoint, message):
  config = soups_config(recipes=recipes_list, **{"wise_ft.endpoint": endpoint})
  with pytest.raises(recipes.RecipeConfigError, match=re.escape(message)):
    recipes.check(config)


def test_check_refuses_a_config_without_a_recipe_setting():
  config = soups_config(recipes=("learned_soup",))
  del config["learned"]
  with pytest.raises(recipes.RecipeConfigError, match=r"lacks \['learned'\].*learned_soup"):
    recipes.check(config)


def test_check_accepts_dependencies_in_order():
  recipes.check(soups_config(recipes=("uniform_soup", "wise_ft"),
                             **{"wise_ft.endpoint": "uniform_soup"}))
  recipes.check(soups_config(recipes=("wise_ft",)))  # best_individual needs no recipe.
  assert recipes.REGISTRY["wise_ft"].needs(soups_config()) == ()


class FakeKitchen(recipes.Kitchen):
  """Params are {"w": array}; "evaluation" returns the params as one split's logits."""

  def __init__(self, params_by_name, scores):
    super().__init__(
        config=None, seed=0, workdir=None, names=list(params_by_name), scores=scores,
        columns=None, splits=("split",), held_out=None, mesh=None,
        load=lambda n: params_by_name[n], logits=None,
        evaluate=lambda p: {"split": np.asarray(p["w"])}, held_out_accuracy=None,
        apply_fn=None, row=lambda name, recipe, logits, ingredients, cost, **extra: {
            "model_name": name, "recipe": recipe, "logits": logits, "ingredients": ingredients,
            "inference_cost": cost, **extra})


def readme_example():
  """The README's "Adding a recipe" code: the function and its registry line."""
  text = (ROOT / "README.md").read_text()
  section = text[text.index("### Adding a recipe"):]
  code = section[section.index("```python") + len("```python"):]
  code = code[:code.index("```")]
  function, line = code.split("# In REGISTRY:")
  return function, line.strip().rstrip(",")


def test_readme_recipe_is_one_function_and_one_registry_line(monkeypatch):
  function, line = readme_example()
  namespace = vars(recipes).copy()
  exec(function, namespace)  # noqa: S102 (the README's own example)
  recipe = eval(line, namespace)  # noqa: S307
  monkeypatch.setitem(recipes.REGISTRY, recipe.name, recipe)
  monkeypatch.setattr(recipes, "SOUP_RECIPES", (*recipes.SOUP_RECIPES, recipe.name))

  # The config check accepts it ...
  recipes.check(soups_config(recipes=("uniform_soup", recipe.name)))
  # ... it soups the two best members ...
  kitchen = FakeKitchen({"model_0": {"w": np.array([0.0])}, "model_1": {"w": np.array([1.0])},
                         "model_2": {"w": np.array([2.0])}, "model_3": {"w": np.array([4.0])}},
                        {"model_0": 0.9, "model_1": 0.5, "model_2": 0.7, "model_3": 0.8})
  (row,) = recipe.make(kitchen)
  assert row["ingredients"] == ["model_3", "model_2"]
  np.testing.assert_allclose(row["logits"]["split"], [3.0])
  # ... and the report names it by its label, after the registry's earlier recipes.
  base = {"FashionMNISTHeldOut": 0.5, "FashionMNIST": 0.5, **{c: 0.5 for c in
          results.FASHION_MNIST.shifts}}
  rows = [{"model_name": "model_0", "recipe": "initialization", **base},
          {"model_name": "uniform_soup", "recipe": "uniform_soup", **base},
          {"model_name": "top2", "recipe": recipe.name, **base, "ingredients": ["a", "b"]}]
  built = report.build_report(rows)
  assert [r["method"] for r in built["rows"]] == ["Initialization", "Uniform soup", recipe.label]
  assert recipe.marker.label in report._markers()[recipe.name].label
