"""The recipe registry: its checks, its declared settings, and that a new recipe is one function
plus one registry entry (README's example, run here)."""

import re
from pathlib import Path

import numpy as np
import pytest

from configs import fashion_mnist
from soup import recipes, report, results, validate

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
    for setting in recipe.settings:
      assert setting.missing(config) is None, (name, setting.path)
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


def test_declared_settings_are_one_per_path_and_their_defaults_pass_their_rules():
  declared = recipes.settings()
  assert len({s.path for s in declared}) == len(declared)  # One declaration per setting.
  for setting in declared:
    assert isinstance(setting.default, setting.type) and setting.help, setting.path
    assert validate.setting_rule(setting).ok(setting.default), setting.path
  fields = [path for path, *_ in validate.FIELDS]
  assert not [f for f in fields if f.startswith("soups.")]  # validate.py keeps no copy.


def test_default_soups_config_holds_what_the_listed_recipes_read():
  soups = recipes.default_soups_config(("uniform_soup", "wise_ft"))
  assert soups == {"recipes": ("uniform_soup", "wise_ft"), "include_initialization": True,
                   "on_bad_ingredient": "exclude", "verify_checksums": True,
                   "wise_ft": {"endpoint": "best_individual",
                               "alphas": (0.0, 0.25, 0.5, 0.75, 1.0)}}


class FakeKitchen(recipes.Kitchen):
  """Params are {"w": array}; "evaluation" returns the params as one split's logits."""

  def __init__(self, params_by_name, scores):
    super().__init__(
        config=None, seed=0, workdir=None, names=list(params_by_name), scores=scores,
        columns=None, splits=("split",), held_out=None, mesh=None, layout=None,
        load=lambda n: params_by_name[n], logits=None,
        evaluate=lambda p: {"split": np.asarray(p["w"])}, held_out_accuracy=None,
        apply_fn=None, row=lambda name, recipe, logits, ingredients, cost, **extra: {
            "model_name": name, "recipe": recipe, "logits": logits, "ingredients": ingredients,
            "inference_cost": cost, **extra})


def readme_example():
  """The README's "Adding a recipe" code: the functions and their registry entry."""
  text = (ROOT / "README.md").read_text()
  section = text[text.index("### Adding a recipe"):]
  code = section[section.index("```python") + len("```python"):]
  code = code[:code.index("```")]
  functions, entry = code.split("# In REGISTRY:")
  return functions, entry.strip().rstrip(",")


def test_readme_recipe_is_one_function_and_one_registry_entry(monkeypatch, tmp_path):
  functions, entry = readme_example()
  namespace = vars(recipes).copy()
  exec(functions, namespace)  # noqa: S102 (the README's own example)
  recipe = eval(entry, namespace)  # noqa: S307
  monkeypatch.setitem(recipes.REGISTRY, recipe.name, recipe)
  monkeypatch.setattr(recipes, "SOUP_RECIPES", (*recipes.SOUP_RECIPES, recipe.name))
  (new,) = [s for s in recipe.settings if s not in recipes.SHARED]

  # A config that lists it gets its settings at their defaults, and the config check (the
  # registry's and validate.py's) accepts it ...
  config = fashion_mnist.get_config("smoke")
  config.unlock()
  config.soups = recipes.default_soups_config(("uniform_soup", recipe.name))
  validate.check(config, fashion_mnist.get_sweep, (), tmp_path / "run")
  # ... and refuses a bad value of its new setting, naming it.
  *parents, leaf = new.path.split(".")
  node = config.soups
  for key in parents:
    node = node[key]
  node[leaf] = 0
  with pytest.raises(validate.ConfigError, match=re.escape(f"config.soups.{new.path} must be")):
    validate.check(config, fashion_mnist.get_sweep, (), tmp_path / "run")
  config.soups = recipes.default_soups_config(("uniform_soup", recipe.name))

  # It soups the two best members, as the soups stage calls it ...
  kitchen = FakeKitchen({"model_0": {"w": np.array([0.0])}, "model_1": {"w": np.array([1.0])},
                         "model_2": {"w": np.array([2.0])}, "model_3": {"w": np.array([4.0])}},
                        {"model_0": 0.9, "model_1": 0.5, "model_2": 0.7, "model_3": 0.8})
  kitchen.config = config.soups
  (row,) = recipe.make(kitchen)
  assert row["ingredients"] == ["model_3", "model_2"]
  np.testing.assert_allclose(row["logits"]["split"], [3.0])
  # ... and the report names it by its label, after the registry's earlier recipes, draws its
  # marker and prints its note.
  base = {"FashionMNISTHeldOut": 0.5, "FashionMNIST": 0.5, **{c: 0.5 for c in
          results.FASHION_MNIST.shifts}}
  rows = [{"model_name": "model_0", "recipe": "initialization", **base},
          {"model_name": "uniform_soup", "recipe": "uniform_soup", **base},
          {"model_name": recipe.name, "recipe": recipe.name, **base, "ingredients": ["a", "b"]}]
  built = report.build_report(rows)
  assert [r["method"] for r in built["rows"]] == ["Initialization", "Uniform soup", recipe.label]
  assert recipe.marker.label in report._markers()[recipe.name].label
  note = recipe.note([rows[2]], rows[2], results.FASHION_MNIST)
  assert note and note in built["notes"]


def test_a_new_soup_entry_is_a_soup_of_the_claims_and_a_wise_ft_endpoint(monkeypatch):
  # One registry entry, nothing else edited: the claims compare it with the best of all models
  # as the other soups, and WiSE-FT may end at it once it runs first.
  from soup import claims
  from tests.test_claims_precondition import COLS, RESAMPLES, _run
  soup = recipes.Recipe("top_k_soup", "Top-k soup", lambda k: [], settings=recipes.SHARED,
                        kind=recipes.Kind.SOUP, wise_ft_endpoint=True)
  assert "top_k_soup" not in claims.soups() + recipes.wise_ft_endpoints()
  monkeypatch.setitem(recipes.REGISTRY, soup.name, soup)
  monkeypatch.setattr(recipes, "SOUP_RECIPES", (*recipes.SOUP_RECIPES, soup.name))
  assert claims.soups()[-1] == "top_k_soup"
  assert recipes.wise_ft_endpoints()[-1] == "top_k_soup"

  rows, correct = _run("init_wins")  # model_0 beats every fine-tune: soups face it too.
  rows.append({**next(r for r in rows if r["model_name"] == "model_stock"),
               "model_name": "top_k_soup", "recipe": "top_k_soup"})
  correct["top_k_soup"] = correct["model_stock"]
  claims.add_intervals(rows, correct, COLS, num_resamples=RESAMPLES)
  assert rows[-1]["vs_best_of_all"]["against"] == "model_0"
  judged = [c for c in claims.judge(rows) if c.get("soup") == "top_k_soup"]
  assert [c["text"] for c in judged] == [
      "Top-k soup beats the best of all models in distribution",
      "Top-k soup beats the best of all models under shift"]

  recipes.check(soups_config(recipes=("top_k_soup", "wise_ft"),
                             **{"wise_ft.endpoint": "top_k_soup"}))
  with pytest.raises(recipes.RecipeConfigError, match="wise_ft needs top_k_soup before it"):
    recipes.check(soups_config(recipes=("wise_ft",), **{"wise_ft.endpoint": "top_k_soup"}))
  endpoint = next(s for s in recipes.WISE_FT if s.path == "wise_ft.endpoint")
  assert validate.setting_rule(endpoint).ok("top_k_soup")
