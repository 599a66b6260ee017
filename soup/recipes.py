"""The recipe registry: every soup and baseline, declared once.

A recipe is one function `<name>_rows(kitchen) -> rows` plus one `Recipe` line in
REGISTRY. The line declares its name, its label in the report's table, its
marker in the figure, its inference cost, the config.soups settings it reads
(each a `Setting`: type, default, allowed values, help), its note under the
report's table, the other recipes whose output it reads, its kind (a soup, an
ensemble, ...) and whether WiSE-FT may end at it. From these declarations
`default_soups_config` builds the configs' config.soups, soup/validate.py
checks its values, `check` validates config.soups.recipes before any stage
runs, the report takes its labels, markers, notes and row order, and the claims
(soup/claims.py) their soups; `infer_recipe` names the recipe of a results line
that lacks one.
REGISTRY is in the paper's Table 1 order.

To add a recipe, write its function below and add one line to REGISTRY (see
README.md, "Adding a recipe"). This module imports no jax at load time, so the
report and the config check stay jax-free; the recipe functions import what
they use.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any, Callable, Optional, Sequence

from soup import metrics, results
from soup.layout import INITIALIZATION, MEMBER_PREFIX

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


@dataclasses.dataclass(frozen=True)
class Setting:
  """One config.soups setting a recipe reads, as mergekit's ConfigParameterDef.

  soup/validate.py refuses a value of another type, outside `choices` or outside
  `interval`; `default_soups_config` writes `default` into the configs.
  """

  path: str                      # under config.soups: "greedy_comparison", "learned.lr"
  type: type                     # bool, int, float or str; tuple: a non-empty tuple of floats
  default: Any
  help: str                      # one line: what it does
  # The allowed values, when they are a few; a function: read from the registry when checked.
  choices: tuple | Callable[[], tuple] = ()
  interval: str = ""             # the allowed numbers (a tuple's items), as in maths: "[1, inf)"

  def missing(self, soups_config) -> Optional[str]:
    """The first part of the path soups_config lacks ("learned" without learned), or None."""
    node, keys = soups_config, self.path.split(".")
    for i, key in enumerate(keys):
      if not hasattr(node, "keys") or key not in node:
        return ".".join(keys[:i + 1])
      node = node[key]
    return None

  def allowed(self) -> tuple:
    """The allowed values (`choices`, or what its function returns now); () when any."""
    return self.choices() if callable(self.choices) else self.choices

  def value(self, soups_config) -> Any:
    node = soups_config
    for key in self.path.split("."):
      node = node[key]
    return node


Note = Callable[[Rows, dict, Any], Optional[str]]  # (its lines, the one shown, columns) -> text


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
  # Logits of several models, built one group at a time ((makers) -> logits per model): each
  # split read (ImageNet: decoded) once per group. Without it, `evaluate` one by one.
  evaluate_many: Optional[Callable[[Sequence[Callable[[], PyTree]]], list[dict]]] = None

  def evaluate_all(self, makers: Sequence[Callable[[], PyTree]]) -> list[dict]:
    """Logits of the params each of `makers` builds, on every split (see evaluate_many)."""
    if self.evaluate_many is None:
      return [self.evaluate(make()) for make in makers]
    return self.evaluate_many(makers)

  def members(self) -> list[str]:
    """The fine-tuned ingredients (no model_0); all of them if there are none."""
    return [n for n in self.names if n != INITIALIZATION] or self.names

  def best_member(self) -> str:
    return max(self.members(), key=lambda n: self.scores[n])


class Kind(enum.Enum):
  """What a recipe's lines are: the claims (soup/claims.py) and the report read it."""

  BASELINE = "baseline"              # made without the sweep's models (pixel logistic regression)
  INITIALIZATION = "initialization"  # model_0, where every member starts
  INDIVIDUAL = "individual"          # one fine-tuned member, or the one a selection picks
  SOUP = "soup"                      # one model, the ingredients' weights averaged
  INTERPOLATION = "interpolation"    # one model between model_0 and an endpoint (WiSE-FT)
  ENSEMBLE = "ensemble"              # its ingredients all at inference, their outputs averaged


class Name(enum.StrEnum):
  """The built-in recipes' names, spelled here only: the claims, the report, the evaluate stage
  and the official import name the recipes they are about by these (each a str: results lines,
  config.soups and workdir folders hold the plain string). A new recipe may be registered under
  a plain string; it needs a member here only when code outside this module names it."""

  PIXEL_LINEAR = "pixel_linear"
  INITIALIZATION = "initialization"
  INDIVIDUAL = "individual"
  BEST_INDIVIDUAL = "best_individual"
  UNIFORM_SOUP = "uniform_soup"
  GREEDY_SOUP = "greedy_soup"
  LEARNED_SOUP = "learned_soup"
  LEARNED_SOUP_BY_LAYER = "learned_soup_by_layer"
  MODEL_STOCK = "model_stock"
  WISE_FT = "wise_ft"
  ENSEMBLE = "ensemble"
  GREEDY_ENSEMBLE = "greedy_ensemble"

  def __repr__(self) -> str:  # As the plain string, in messages that quote a name.
    return repr(self.value)


# Kinds whose line is one of the run's models, not made of several: ingredients count 1.
ONE_MODEL = (Kind.INITIALIZATION, Kind.INDIVIDUAL)


@dataclasses.dataclass(frozen=True)
class Recipe:
  name: str
  label: str                                     # the report table's method name
  make: Optional[Callable[[Kitchen], Rows]]      # None: rows come from evaluation itself
  marker: Optional[Marker] = None                # None: drawn specially or not at all
  inference_cost: str = "one"                    # "one" forward pass, or "per_ingredient"
  settings: tuple[Setting, ...] = ()             # the config.soups settings it reads
  needs: Callable[[Any], tuple[str, ...]] = lambda soups_config: ()  # recipes it reads
  every_model: bool = False                      # its ingredients are all models by definition
  note: Optional[Note] = None                    # its line in the report's notes, if any
  note_first: bool = False                       # what a selection kept: noted before weights
  kind: Kind = Kind.SOUP
  # WiSE-FT may end at it: best_individual, or a soup whose function saves its params in
  # soups/<name>/ (config.soups.recipes must then run it before wise_ft).
  wise_ft_endpoint: bool = False


# --- The recipes ---------------------------------------------------------


def pixel_linear_rows(k: Kitchen) -> Rows:
  """The floor: logistic regression on raw pixels of the fine-tuning split, no pretraining."""
  from soup import baselines
  logits, fit = baselines.pixel_linear_logits(k.task, k.config.pixel_linear, k.seed)
  return [k.row(Name.PIXEL_LINEAR, Name.PIXEL_LINEAR, logits, [], 1,
                info="logistic regression on raw pixels, trained on the fine-tuning split",
                probe=fit)]


def best_individual_rows(k: Kitchen) -> Rows:
  best = k.best_member()
  return [k.row(Name.BEST_INDIVIDUAL, Name.BEST_INDIVIDUAL, k.logits(best), [best], 1,
                selected=best)]


def uniform_soup_rows(k: Kitchen) -> Rows:
  from soup import checkpoints, soups
  # The one averager, in the run's layout: each device reduces its own part.
  params = soups.weighted_average([k.workdir.ingredient_dir(n) for n in k.names],
                                  layout=k.layout, verify=k.config.verify_checksums)
  checkpoints.save_ingredient(k.workdir.soup_dir(Name.UNIFORM_SOUP), params,
                              {"ingredients": k.names})
  return [k.row(Name.UNIFORM_SOUP, Name.UNIFORM_SOUP, k.evaluate(params), k.names, 1)]


def greedy_soup_rows(k: Kitchen) -> Rows:
  from soup import checkpoints, soups
  result = soups.greedy_soup({n: k.workdir.ingredient_dir(n) for n in k.names}, k.scores,
                             k.held_out_accuracy, layout=k.layout,
                             comparison=k.config.greedy_comparison,
                             verify=k.config.verify_checksums,
                             tie_order=k.config.greedy_tie_order)
  checkpoints.save_ingredient(k.workdir.soup_dir(Name.GREEDY_SOUP), result.result,
                              {"ingredients": result.ingredients})
  # A soup of one ingredient is that model bit for bit (the averager's float32 copy of
  # it), so the model's cached logits are the soup's: no second evaluation.
  logits = (k.logits(result.ingredients[0]) if len(result.ingredients) == 1
            else k.evaluate(result.result))
  return [k.row(Name.GREEDY_SOUP, Name.GREEDY_SOUP, logits, result.ingredients, 1,
                greedy_history=result.history)]


def _learned(k: Kitchen, by_layer: bool) -> Rows:
  from soup import soups
  cfg, held = k.config.learned, k.held_out
  images = held.stacked()
  apply_fn = k.apply_fn()
  if held.logits_map is not None:  # Train on the scored label space.
    raw_apply, mapping = apply_fn, held.logits_map
    apply_fn = lambda p, x: mapping(raw_apply(p, x))  # noqa: E731
  # Paths: each ingredient is read straight into its device shards of the stack.
  result = soups.learned_soup([k.workdir.ingredient_dir(n) for n in k.names], apply_fn, images,
                              held.labels, by_layer=by_layer, epochs=cfg.epochs,
                              learning_rate=cfg.lr, batch_size=cfg.batch_size, seed=k.seed,
                              mesh=k.mesh, verify=k.config.verify_checksums, layout=k.layout)
  weights = (dict(zip(k.names, result.weights)) if not by_layer else
             {layer: dict(zip(k.names, w)) for layer, w in result.weights.items()})
  name = Name.LEARNED_SOUP_BY_LAYER if by_layer else Name.LEARNED_SOUP
  return [k.row(name, name, k.evaluate(result.params), k.names, 1, weights=weights,
                temperature=result.temperature)]


def learned_soup_rows(k: Kitchen) -> Rows:
  return _learned(k, by_layer=False)


def learned_soup_by_layer_rows(k: Kitchen) -> Rows:
  return _learned(k, by_layer=True)


def model_stock_rows(k: Kitchen) -> Rows:
  from soup import soups
  members = [n for n in k.names if n != INITIALIZATION]
  params, ratios = soups.model_stock(  # Read once each, into the run's layout.
      k.workdir.ingredient_dir(INITIALIZATION), [k.workdir.ingredient_dir(n) for n in members],
      k.layout, verify=k.config.verify_checksums)
  name = Name.MODEL_STOCK
  return [k.row(name, name, k.evaluate(params), [INITIALIZATION, *members], 1,
                ratios={key: round(v, 4) for key, v in ratios.items()})]


def wise_ft_rows(k: Kitchen) -> Rows:
  from soup import checkpoints, soups
  cfg = k.config.wise_ft
  init = k.workdir.ingredient_dir(INITIALIZATION)  # Paths: read into the run's layout.
  # The averager skips a zero weight, so an end that is an ingredient is that ingredient bit
  # for bit: its cached logits are the interpolation's there.
  ingredient_at = {0.0: INITIALIZATION}
  if cfg.endpoint == Name.BEST_INDIVIDUAL:
    endpoint_names = [max((n for n in k.names if n != INITIALIZATION), key=lambda n: k.scores[n])]
    endpoint = k.workdir.ingredient_dir(endpoint_names[0])
    ingredient_at[1.0] = endpoint_names[0]
  else:  # A soup made earlier in this stage (check() enforces the order).
    endpoint = k.workdir.soup_dir(cfg.endpoint)
    endpoint_names = checkpoints.ingredient_metadata(endpoint)["metadata"]["ingredients"]
  verify = k.config.verify_checksums

  # The other alphas are evaluated together: each split read once for all of them.
  between = [a for a in dict.fromkeys(cfg.alphas) if a not in ingredient_at]
  made = k.evaluate_all([lambda a=a: soups.wise_ft(init, endpoint, a, k.layout, verify)
                         for a in between])
  logits = {a: k.logits(n) for a, n in ingredient_at.items() if a in cfg.alphas}
  logits.update(zip(between, made))
  return [k.row(f"wise_ft_alpha_{a:g}", Name.WISE_FT, logits[a],
                sorted({INITIALIZATION, *endpoint_names}), 1, alpha=float(a), endpoint=cfg.endpoint)
          for a in cfg.alphas]


def wise_ft_endpoints() -> tuple[str, ...]:
  """The recipes WiSE-FT may end at (config.soups.wise_ft.endpoint), in registry order."""
  return tuple(name for name, r in REGISTRY.items() if r.wise_ft_endpoint)


def _wise_ft_needs(soups_config) -> tuple[str, ...]:
  """A soup endpoint is read from soups/<endpoint>/: its recipe runs first."""
  endpoint = REGISTRY.get(soups_config.wise_ft.endpoint)
  return ((endpoint.name,) if endpoint and endpoint.wise_ft_endpoint
          and endpoint.kind is Kind.SOUP else ())


def _metric_name(columns) -> str:
  """What the columns hold: accuracy, or a GLUE task's metric (CoLA: Matthews correlation)."""
  return metrics.METRIC_NAMES[getattr(columns, "metric", "accuracy")]


def ensemble_rows(k: Kitchen) -> Rows:
  from soup import soups
  logits = {col: soups.logit_ensemble([k.logits(n)[col] for n in k.names])
            for col in k.splits}
  return [k.row(Name.ENSEMBLE, Name.ENSEMBLE, logits, k.names, len(k.names))]


def greedy_ensemble_rows(k: Kitchen) -> Rows:
  from soup import soups
  column = k.columns.held_out
  result = soups.greedy_ensemble(
      {n: k.held_out.scored_logits(k.logits(n)[column]) for n in k.names},
      k.held_out.labels, k.scores, k.config.greedy_comparison, k.config.greedy_tie_order,
      metric=k.held_out.metric)
  logits = {col: soups.logit_ensemble([k.logits(n)[col] for n in result.ingredients])
            for col in k.splits}
  return [k.row(Name.GREEDY_ENSEMBLE, Name.GREEDY_ENSEMBLE, logits, result.ingredients,
                len(result.ingredients), greedy_history=result.history)]


# --- The settings: config.soups, declared once -----------------------------

# Read for every recipe that touches the ingredients (soup/experiment.py, soup/ingredients.py).
SHARED = (
    Setting("include_initialization", bool, True,
            "model_0 is an ingredient, as in the paper's 72"),
    Setting("on_bad_ingredient", str, "exclude",
            "an ingredient that fails its checks: left out (logged), or the run stops",
            choices=("exclude", "error")),
    Setting("verify_checksums", bool, True,
            "check each ingredient's bytes against its fingerprint before use"),
)
GREEDY = (
    Setting("greedy_comparison", str, ">",
            "keep an ingredient if held-out accuracy improves (official code) or does not drop "
            "(the paper's text)", choices=(">", ">=")),
    Setting("greedy_tie_order", str, "reversed",
            "equal held-out accuracies: in reverse listed order (official code) or as listed",
            choices=("reversed", "listed")),
)
LEARNED = (
    Setting("learned.epochs", int, 3, "passes over the held-out split", interval="[1, inf)"),
    Setting("learned.lr", float, 0.05, "learning rate of the mixing weights",
            interval="(0, inf)"),
    Setting("learned.batch_size", int, 256, "held-out images per step", interval="[1, inf)"),
)
WISE_FT = (
    Setting("wise_ft.endpoint", str, Name.BEST_INDIVIDUAL.value,
            "the fine-tuned end of the interpolation (a soup must run before it)",
            choices=wise_ft_endpoints),
    Setting("wise_ft.alphas", tuple, (0.0, 0.25, 0.5, 0.75, 1.0),
            "one row each: (1 - alpha) model_0 + alpha endpoint", interval="[0, 1]"),
)
PIXEL_LINEAR = (  # Fitted as the probe: L-BFGS, L2 chosen on a part of the fine-tuning split.
    Setting("pixel_linear.l2_grid", tuple, (1e-4, 1e-3, 1e-2), "the L2 strengths tried",
            interval="(0, inf)"),
    # As soup/linear_probe.py's DEFAULT_L2_BRACKET (tests/test_linear_probe.py checks).
    Setting("pixel_linear.l2_bracket", int, 4,
            "decades the L2 search may add past an end of the grid it chose", interval="[0, inf)"),
    Setting("pixel_linear.validation_fraction", float, 0.1,
            "the part of the fine-tuning split that chooses the L2", interval="(0, 1)"),
    Setting("pixel_linear.max_iterations", int, 300, "L-BFGS iterations", interval="[1, inf)"),
    Setting("pixel_linear.tolerance", float, 1e-4, "L-BFGS's tolerance", interval="(0, inf)"),
)


# --- The notes under the report's table (soup/report.py) --------------------
# Each takes the recipe's results lines, the one the table shows, and the columns.


def _names(ingredients: Any) -> list[str]:
  if isinstance(ingredients, dict):
    return [str(k) for k in ingredients]
  if isinstance(ingredients, (list, tuple)):
    return [str(i) for i in ingredients]
  return []


def _flat(x: Any) -> list[float]:
  if isinstance(x, dict):
    return [v for value in x.values() for v in _flat(value)]
  if isinstance(x, (list, tuple)):
    return [v for value in x for v in _flat(value)]
  v = results.number(x)
  return [] if v is None else [v]


def _weights_str(weights: Any, names: list[str], limit: int = 12) -> str:
  """Compact: name=w pairs for a flat vector; a shape and summary otherwise."""
  number = results.number
  if isinstance(weights, dict) and all(number(v) is not None for v in weights.values()):
    pairs = list(weights.items())
  elif isinstance(weights, (list, tuple)) and all(number(v) is not None for v in weights):
    keys = names if len(names) == len(weights) else [f"#{i}" for i in range(len(weights))]
    pairs = list(zip(keys, weights))
  else:
    values = _flat(weights)
    if not values:
      return "(none)"
    groups = len(weights) if isinstance(weights, (list, tuple, dict)) else 1
    return (f"{groups} groups (layers) × {len(values) // max(groups, 1)} weights, "
            f"min {min(values):.3f}, mean {sum(values) / len(values):.3f}, max {max(values):.3f}")
  shown = ", ".join(f"{k}={float(v):.3f}" for k, v in pairs[:limit])
  if len(pairs) > limit:
    shown += f", … ({len(pairs) - limit} more)"
  return shown


def greedy_soup_note(lines: Rows, shown: dict, columns) -> str:
  comparison = (shown.get("soup_settings") or {}).get("greedy_comparison", ">")
  rule = ("does not drop (`>=`)" if comparison == ">="
          else "improves (strict `>`, as the official code)")
  score = f"held-out {_metric_name(columns)}"
  text = (f"The greedy soup adds models in decreasing order of {score} "
          f"(`{columns.held_out}`) and keeps one only if {score} {rule}.")
  names = _names(shown.get("ingredients"))
  if names:
    return text + f" Ingredients ({len(names)}): " + ", ".join(f"`{n}`" for n in names) + "."
  return text + " Its ingredients are not recorded in these results."


def greedy_ensemble_note(lines: Rows, shown: dict, columns) -> Optional[str]:
  names = _names(shown.get("ingredients"))
  if names:
    return f"Greedy ensemble members ({len(names)}): " + ", ".join(f"`{n}`" for n in names) + "."
  return None


def learned_note(lines: Rows, shown: dict, columns) -> Optional[str]:
  if shown.get("weights") is None:
    return None
  return (f"{REGISTRY[shown['recipe']].label} weights: "
          + _weights_str(shown["weights"], _names(shown.get("ingredients"))) + ".")


def model_stock_note(lines: Rows, shown: dict, columns) -> Optional[str]:
  ratios = _flat(shown.get("ratios"))
  if not ratios:  # Model Stock records its interpolation ratio t per parameter leaf.
    return None
  return (f"Model stock's ratio t (0: the initialization, 1: the members' mean) over "
          f"{len(ratios)} parameter leaves: min {min(ratios):.3f}, mean "
          f"{sum(ratios) / len(ratios):.3f}, max {max(ratios):.3f}.")


def wise_ft_note(lines: Rows, shown: dict, columns) -> Optional[str]:
  curve = sorted((r for r in lines if results.number(r.get("alpha")) is not None),
                 key=lambda r: r["alpha"])
  if not curve:
    return None
  points = ", ".join(f"α={r['alpha']:g}: {results.percent(results.number(r.get(columns.held_out)))}"
                     for r in curve)
  return (f"WiSE-FT held-out {_metric_name(columns)} (`{columns.held_out}`) by α: {points}; "
          "the table shows the best.")


# --- The registry, in Table 1 order ---------------------------------------

REGISTRY: dict[str, Recipe] = {r.name: r for r in (
    Recipe(Name.PIXEL_LINEAR, "Pixel logistic regression (baseline)", pixel_linear_rows,
           Marker("Pixel logistic regression", "x", "k", 160), settings=PIXEL_LINEAR,
           kind=Kind.BASELINE),
    Recipe(Name.INITIALIZATION, "Initialization", None, kind=Kind.INITIALIZATION),
    Recipe(Name.INDIVIDUAL, "Individual model", None, kind=Kind.INDIVIDUAL),
    Recipe(Name.BEST_INDIVIDUAL, "Best individual model", best_individual_rows,
           kind=Kind.INDIVIDUAL, wise_ft_endpoint=True),
    Recipe(Name.UNIFORM_SOUP, "Uniform soup", uniform_soup_rows,
           Marker("Uniform Soup", "o", "C0", 220), settings=SHARED, every_model=True,
           kind=Kind.SOUP, wise_ft_endpoint=True),
    Recipe(Name.GREEDY_SOUP, "Greedy soup", greedy_soup_rows,
           Marker("Greedy Soup", "*", "C4", 500),
           settings=(*SHARED, *GREEDY), note=greedy_soup_note, note_first=True,
           kind=Kind.SOUP, wise_ft_endpoint=True),
    Recipe(Name.LEARNED_SOUP, "Learned soup", learned_soup_rows,
           Marker("Learned Soup", "P", "C1", 220), settings=(*SHARED, *LEARNED),
           note=learned_note, kind=Kind.SOUP),
    Recipe(Name.LEARNED_SOUP_BY_LAYER, "Learned soup (by layer)", learned_soup_by_layer_rows,
           Marker("Learned Soup (by layer)", "X", "C8", 220), settings=(*SHARED, *LEARNED),
           note=learned_note, kind=Kind.SOUP),
    Recipe(Name.MODEL_STOCK, "Model stock", model_stock_rows,
           Marker("Model Stock", "^", "C6", 220),
           settings=SHARED, note=model_stock_note, kind=Kind.SOUP),
    Recipe(Name.WISE_FT, "WiSE-FT", wise_ft_rows, settings=(*SHARED, *WISE_FT),
           needs=_wise_ft_needs,
           note=wise_ft_note, kind=Kind.INTERPOLATION),
    Recipe(Name.ENSEMBLE, "Ensemble", ensemble_rows,
           Marker("Ensemble", "s", "C3", 150, zorder=4),
           inference_cost="per_ingredient", settings=SHARED, every_model=True,
           kind=Kind.ENSEMBLE),
    Recipe(Name.GREEDY_ENSEMBLE, "Greedy ensemble", greedy_ensemble_rows,
           Marker("Greedy Ensemble", "D", "C5", 130, zorder=4), inference_cost="per_ingredient",
           settings=(*SHARED, *GREEDY), note=greedy_ensemble_note, note_first=True,
           kind=Kind.ENSEMBLE),
)}
# Rows the evaluate stage makes for each model; not listed in config.soups.recipes.
MODEL_RECIPES = tuple(name for name, r in REGISTRY.items() if r.make is None)
SOUP_RECIPES = tuple(name for name, r in REGISTRY.items() if r.make is not None)


def of_kind(*kinds: Kind) -> tuple[str, ...]:
  """The registered recipes of these kinds, in registry order (read when called, so a recipe
  added to REGISTRY is among them)."""
  return tuple(name for name, r in REGISTRY.items() if r.kind in kinds)


def is_one_model(recipe: str | None) -> bool:
  """Whether a line of this recipe is one of the run's models (model_0, a member, the best
  one), not a soup, an ensemble or a baseline; False for a recipe the registry lacks."""
  return recipe in REGISTRY and REGISTRY[recipe].kind in ONE_MODEL


def infer_recipe(model_name: str) -> str:
  """The recipe of a results line without one (the official files).

  Official names: model_0 is the initialization, model_<k> the fine-tunes; any
  other name starts with its recipe's (the longest match wins).
  """
  if model_name == INITIALIZATION:
    return Name.INITIALIZATION
  if re.fullmatch(rf"{re.escape(MEMBER_PREFIX)}\d+", model_name):
    return Name.INDIVIDUAL
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
    missing = list(dict.fromkeys(filter(None, (s.missing(soups_config)
                                               for s in REGISTRY[name].settings))))
    if missing:
      raise RecipeConfigError(f"config.soups lacks {missing}, which recipe {name} reads; add "
                              "them to the config (see configs/fashion_mnist.py).")
  if len(set(recipes)) != len(recipes):
    raise RecipeConfigError(f"config.soups.recipes lists a recipe twice: {recipes}.")
  for setting in dict.fromkeys(s for name in recipes for s in REGISTRY[name].settings):
    value = setting.value(soups_config)  # A choice picks a code path (wise_ft's endpoint).
    allowed = setting.allowed()
    if allowed and value not in allowed:
      raise RecipeConfigError(
          f"config.soups.{setting.path} must be one of {', '.join(map(str, allowed))}, "
          f"got {value!r}.")
  for i, name in enumerate(recipes):
    for need in REGISTRY[name].needs(soups_config):
      if need not in recipes[:i]:
        raise RecipeConfigError(
            f"config.soups.recipes: {name} needs {need} before it (its endpoint); add "
            f"{need!r} ahead of {name!r}.")


def settings() -> tuple[Setting, ...]:
  """Every declared setting once: the shared ones, then the registry's, in its order."""
  return tuple(dict.fromkeys([*SHARED, *(s for r in REGISTRY.values() for s in r.settings)]))


def default_soups_config(names: Sequence[str]) -> dict:
  """config.soups that runs these recipes in this order: the shared settings and the ones the
  recipes read, at their declared defaults (a config then changes what it must)."""
  soups: dict[str, Any] = {"recipes": tuple(names)}
  read = {*SHARED, *(s for name in names if name in REGISTRY for s in REGISTRY[name].settings)}
  for setting in settings():
    if setting in read:
      *parents, leaf = setting.path.split(".")
      node = soups
      for key in parents:
        node = node.setdefault(key, {})
      node[leaf] = setting.default
  return soups
