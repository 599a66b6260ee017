"""The recipe registry: every soup and baseline, declared once.

A recipe is one function `make(kitchen) -> rows` plus one `Recipe` line in
REGISTRY. The line declares its name, its label in the report's table, its
marker in the figure, its inference cost, the config.soups settings it reads
and the other recipes whose output it reads. `check` validates
config.soups.recipes against the registry before any stage runs; the report
takes its labels, markers and row order from here, and `infer_recipe` names the
recipe of a results line that lacks one. REGISTRY is in the paper's Table 1 order.

To add a recipe, write its function below and add one line to REGISTRY (see
README.md, "Adding a recipe"). This module imports no jax at load time, so the
report stays jax-free; the recipe functions import what they use.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional

PyTree = Any
Rows = list[dict]


class RecipeConfigError(ValueError):
  """config.soups.recipes names an unknown recipe or misses one a recipe needs."""


@dataclasses.dataclass(frozen=True)
class Marker:
  """How a single-point recipe is drawn in the figure."""

  label: str
  symbol: str
  color: str
  size: int
  zorder: int = 5


@dataclasses.dataclass
class Kitchen:
  """What a recipe may use, built by the soups stage (soup/experiment.py)."""

  config: Any                               # config.soups
  seed: int
  workdir: Any                              # soup.workdir.Workdir
  names: list[str]                          # usable ingredients, model_0 first
  scores: dict[str, float]                  # held-out accuracy of each
  columns: Any                              # soup.results.Columns
  splits: tuple[str, ...]                   # evaluation splits, in the results' order
  held_out: Any                             # the held-out EvalSplit
  mesh: Any
  layout: Any                               # soup.soups.Layout: where soups are averaged
  load: Callable[[str], PyTree]             # verified params of an ingredient
  logits: Callable[[str], dict]             # cached logits of an ingredient, per split
  evaluate: Callable[[PyTree], dict]        # logits of params on every split
  held_out_accuracy: Callable[[PyTree], float]
  apply_fn: Callable[[], Callable]          # (params, images) -> logits
  row: Callable[..., dict]                  # results row: name, recipe, logits, ingredients, cost
  task: Any = None                          # the dataset (soup/data/task.py), for baselines

  def members(self) -> list[str]:
    """The fine-tuned ingredients (no model_0); all of them if there are none."""
    return [n for n in self.names if n != "model_0"] or self.names

  def best_member(self) -> str:
    return max(self.members(), key=lambda n: self.scores[n])


@dataclasses.dataclass(frozen=True)
class Recipe:
  name: str
  label: str                                     # the report table's method name
  make: Optional[Callable[[Kitchen], Rows]]      # None: rows come from evaluation itself
  marker: Optional[Marker] = None                # None: drawn specially or not at all
  inference_cost: str = "one"                    # "one" forward pass, or "per_ingredient"
  settings: tuple[str, ...] = ()                 # config.soups keys it reads
  needs: Callable[[Any], tuple[str, ...]] = lambda soups_config: ()  # recipes it reads
  every_model: bool = False                      # its ingredients are all models by definition


# --- The recipes ---------------------------------------------------------


def pixel_linear(k: Kitchen) -> Rows:
  """The floor: logistic regression on raw pixels of the fine-tuning split, no pretraining."""
  from soup import baselines
  logits = baselines.pixel_linear_logits(k.task, k.config.pixel_linear, k.seed)
  return [k.row("pixel_linear", "pixel_linear", logits, [], 1,
                info="logistic regression on raw pixels, trained on the fine-tuning split")]


def best_individual(k: Kitchen) -> Rows:
  best = k.best_member()
  return [k.row("best_individual", "best_individual", k.logits(best), [best], 1, selected=best)]


def uniform_soup(k: Kitchen) -> Rows:
  from soup import checkpoints, soups
  # The one averager, in the run's layout: each device reduces its own part.
  params = soups.weighted_average([k.workdir.ingredient_dir(n) for n in k.names], k.layout,
                         verify=k.config.verify_checksums)
  checkpoints.save_ingredient(k.workdir.soup_dir("uniform_soup"), params,
                              {"ingredients": k.names})
  return [k.row("uniform_soup", "uniform_soup", k.evaluate(params), k.names, 1)]


def greedy_soup(k: Kitchen) -> Rows:
  from soup import checkpoints, soups
  result = soups.greedy_soup({n: k.workdir.ingredient_dir(n) for n in k.names}, k.scores,
                             k.held_out_accuracy, k.layout,
                             comparison=k.config.greedy_comparison,
                             verify=k.config.verify_checksums,
                             tie_order=k.config.greedy_tie_order)
  checkpoints.save_ingredient(k.workdir.soup_dir("greedy_soup"), result.result,
                              {"ingredients": result.ingredients})
  return [k.row("greedy_soup", "greedy_soup", k.evaluate(result.result), result.ingredients, 1,
                greedy_history=result.history)]


def _learned(k: Kitchen, by_layer: bool) -> Rows:
  import numpy as np

  from soup import soups
  cfg, held = k.config.learned, k.held_out
  images = held.images if held.images is not None else np.concatenate(list(held.iterate(1024)))
  apply_fn = k.apply_fn()
  if held.logits_map is not None:  # Train on the scored label space.
    raw_apply, mapping = apply_fn, held.logits_map
    apply_fn = lambda p, x: mapping(raw_apply(p, x))  # noqa: E731
  # Paths: each ingredient is read straight into its device shards of the stack.
  result = soups.learned_soup([k.workdir.ingredient_dir(n) for n in k.names], apply_fn, images,
                              held.labels, by_layer=by_layer, epochs=cfg.epochs,
                              learning_rate=cfg.lr, batch_size=cfg.batch_size, seed=k.seed,
                              mesh=k.mesh, verify=k.config.verify_checksums, layout=k.layout)
  # Four decimals: what float32 training reproduces whatever the process layout (the
  # mesh's all-reduces sum in another order across processes than within one).
  r4 = lambda w: [round(float(v), 4) for v in w]  # noqa: E731
  weights = (dict(zip(k.names, r4(result.weights))) if not by_layer else
             {layer: dict(zip(k.names, r4(w))) for layer, w in result.weights.items()})
  name = "learned_soup_by_layer" if by_layer else "learned_soup"
  return [k.row(name, name, k.evaluate(result.params), k.names, 1, weights=weights,
                temperature=round(result.temperature, 4))]


def learned_soup(k: Kitchen) -> Rows:
  return _learned(k, by_layer=False)


def learned_soup_by_layer(k: Kitchen) -> Rows:
  return _learned(k, by_layer=True)


def model_stock(k: Kitchen) -> Rows:
  from soup import soups
  members = [n for n in k.names if n != "model_0"]
  params, ratios = soups.model_stock(  # Read once each, into the run's layout.
      k.workdir.ingredient_dir("model_0"), [k.workdir.ingredient_dir(n) for n in members],
      k.layout, verify=k.config.verify_checksums)
  return [k.row("model_stock", "model_stock", k.evaluate(params), ["model_0", *members], 1,
                ratios={key: round(v, 4) for key, v in ratios.items()})]


WISE_FT_ENDPOINTS = ("best_individual", "uniform_soup", "greedy_soup")


def wise_ft(k: Kitchen) -> Rows:
  from soup import checkpoints, soups
  cfg = k.config.wise_ft
  init = k.workdir.ingredient_dir("model_0")  # Paths: read into the run's layout.
  if cfg.endpoint == "best_individual":
    endpoint_names = [max((n for n in k.names if n != "model_0"), key=lambda n: k.scores[n])]
    endpoint = k.workdir.ingredient_dir(endpoint_names[0])
  else:  # A soup made earlier in this stage (check() enforces the order).
    endpoint = k.workdir.soup_dir(cfg.endpoint)
    endpoint_names = checkpoints.ingredient_metadata(endpoint)["metadata"]["ingredients"]
  verify = k.config.verify_checksums
  return [k.row(f"wise_ft_alpha_{a:g}", "wise_ft",
                k.evaluate(soups.wise_ft(init, endpoint, a, k.layout, verify)),
                sorted({"model_0", *endpoint_names}), 1, alpha=float(a), endpoint=cfg.endpoint)
          for a in cfg.alphas]


def _wise_ft_needs(soups_config) -> tuple[str, ...]:
  endpoint = soups_config.wise_ft.endpoint
  return (endpoint,) if endpoint in ("uniform_soup", "greedy_soup") else ()


def ensemble(k: Kitchen) -> Rows:
  from soup import soups
  logits = {col: soups.logit_ensemble([k.logits(n)[col] for n in k.names])
            for col in k.splits}
  return [k.row("ensemble", "ensemble", logits, k.names, len(k.names))]


def greedy_ensemble(k: Kitchen) -> Rows:
  from soup import soups
  column = k.columns.held_out
  result = soups.greedy_ensemble(
      {n: k.held_out.scored_logits(k.logits(n)[column]) for n in k.names},
      k.held_out.labels, k.scores, k.config.greedy_comparison, k.config.greedy_tie_order)
  logits = {col: soups.logit_ensemble([k.logits(n)[col] for n in result.ingredients])
            for col in k.splits}
  return [k.row("greedy_ensemble", "greedy_ensemble", logits, result.ingredients,
                len(result.ingredients), greedy_history=result.history)]


# --- The registry, in Table 1 order ---------------------------------------

_SHARED = ("include_initialization", "on_bad_ingredient", "verify_checksums")

REGISTRY: dict[str, Recipe] = {r.name: r for r in (
    Recipe("pixel_linear", "Pixel logistic regression (baseline)", pixel_linear,
           Marker("Pixel logistic regression", "x", "k", 160), settings=("pixel_linear",)),
    Recipe("initialization", "Initialization", None),
    Recipe("individual", "Individual model", None),
    Recipe("best_individual", "Best individual model", best_individual),
    Recipe("uniform_soup", "Uniform soup", uniform_soup,
           Marker("Uniform Soup", "o", "C0", 220), settings=_SHARED, every_model=True),
    Recipe("greedy_soup", "Greedy soup", greedy_soup, Marker("Greedy Soup", "*", "C4", 500),
           settings=(*_SHARED, "greedy_comparison", "greedy_tie_order")),
    Recipe("learned_soup", "Learned soup", learned_soup, Marker("Learned Soup", "P", "C1", 220),
           settings=(*_SHARED, "learned")),
    Recipe("learned_soup_by_layer", "Learned soup (by layer)", learned_soup_by_layer,
           Marker("Learned Soup (by layer)", "X", "C8", 220), settings=(*_SHARED, "learned")),
    Recipe("model_stock", "Model stock", model_stock, Marker("Model Stock", "^", "C6", 220),
           settings=_SHARED),
    Recipe("wise_ft", "WiSE-FT", wise_ft, settings=(*_SHARED, "wise_ft"), needs=_wise_ft_needs),
    Recipe("ensemble", "Ensemble", ensemble, Marker("Ensemble", "s", "C3", 150, zorder=4),
           inference_cost="per_ingredient", settings=_SHARED, every_model=True),
    Recipe("greedy_ensemble", "Greedy ensemble", greedy_ensemble,
           Marker("Greedy Ensemble", "D", "C5", 130, zorder=4), inference_cost="per_ingredient",
           settings=(*_SHARED, "greedy_comparison", "greedy_tie_order")),
)}
# Rows the evaluate stage makes for each model; not listed in config.soups.recipes.
MODEL_RECIPES = ("initialization", "individual")
SOUP_RECIPES = tuple(name for name, r in REGISTRY.items() if r.make is not None)


def infer_recipe(model_name: str) -> str:
  """The recipe of a results line without one (the official files).

  Official names: model_0 is the initialization, model_<k> the fine-tunes; any
  other name starts with its recipe's (the longest match wins).
  """
  if model_name == "model_0":
    return "initialization"
  if re.fullmatch(r"model_\d+", model_name):
    return "individual"
  for recipe in sorted(REGISTRY, key=len, reverse=True):
    if model_name.startswith(recipe):
      return recipe
  raise ValueError(f"Cannot tell the recipe of {model_name!r}; add a 'recipe' field.")


def check(soups_config) -> None:
  """Raises RecipeConfigError unless config.soups.recipes can run, in its order."""
  recipes = list(soups_config.recipes)
  for name in recipes:
    if name not in SOUP_RECIPES:
      hint = (" (its rows come from the evaluate stage)" if name in MODEL_RECIPES else "")
      raise RecipeConfigError(
          f"config.soups.recipes: unknown recipe {name!r}{hint}; choose from "
          f"{', '.join(SOUP_RECIPES)}.")
  for name in recipes:
    missing = [key for key in REGISTRY[name].settings if key not in soups_config]
    if missing:
      raise RecipeConfigError(f"config.soups lacks {missing}, which recipe {name} reads; add "
                              "them to the config (see configs/fashion_mnist.py).")
  if len(set(recipes)) != len(recipes):
    raise RecipeConfigError(f"config.soups.recipes lists a recipe twice: {recipes}.")
  if "wise_ft" in recipes and soups_config.wise_ft.endpoint not in WISE_FT_ENDPOINTS:
    raise RecipeConfigError(
        f"config.soups.wise_ft.endpoint must be one of {', '.join(WISE_FT_ENDPOINTS)}, got "
        f"{soups_config.wise_ft.endpoint!r}.")
  for i, name in enumerate(recipes):
    for need in REGISTRY[name].needs(soups_config):
      if need not in recipes[:i]:
        raise RecipeConfigError(
            f"config.soups.recipes: {name} needs {need} before it (its endpoint); add "
            f"{need!r} ahead of {name!r}.")


