"""The paper's precondition and four claims, judged on one run (paired bootstrap) or over seeds.

Each claim is held, not held, or not resolved at this sample size, from a 95%
interval of a paired accuracy difference:
  0. the precondition: fine-tuning improves on the initialization (best
     individual minus model_0, on test); the paper's soups average fine-tunes
     that each did real work (+4.8 points on ImageNet);
  1. the greedy soup beats the best individual in distribution (test);
  2. it beats it under shift (the shift average);
  3. the uniform soup falls behind the best individual (test) when some runs
     leave the basin: a run "left the basin" if its held-out accuracy is below
     the initialization's, or it diverged and was excluded;
  4. the greedy soup comes close to the ensemble of all models at 1/N of the
     inference cost: "close" is within CLOSE_POINTS on test.
A soup of one ingredient, or an ensemble of one member, is one model: nothing
was averaged, so a claim about it is neither held nor not held but "not
applicable", and says so.
When the initialization beats every fine-tune on held-out (the selection
split), the paper's setting does not hold: claims 1-4 compare soups with a best
individual that is not the run's best model. The claims then say so, and
compare each soup with the best of all models, model_0 included.
One run's intervals come from soup/stats.py (rows carry them, see
`add_intervals`); over seeds, from the Student-t interval of the per-seed
differences.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from soup import metrics, recipes, results, stats
from soup.data import registry as datasets
from soup.layout import INITIALIZATION
from soup.recipes import Name

CLOSE_POINTS = 1.0  # Claim 4: greedy soup within this many accuracy points of the ensemble.
HELD, NOT_HELD, OPEN = "held", "not held", "not resolved at this sample size"
NOT_APPLICABLE = "not applicable"  # A soup of one ingredient: no soup to test.
CLAIMS = {
    "fine_tuning_improves": "Fine-tuning improves on the initialization (the paper's "
                            "precondition)",
    "greedy_in_distribution": "The greedy soup beats the best individual model in distribution",
    "greedy_under_shift": "The greedy soup beats the best individual model under shift",
    "uniform_falls_behind": "The uniform soup falls behind when some runs leave the basin",
    "greedy_close_to_ensemble": "The greedy soup comes close to the ensemble at 1/N of the "
                                "inference cost",
}
BEST_OF_ALL = {"best_of_all_in_distribution": "{soup} beats the best of all models in distribution",
               "best_of_all_under_shift": "{soup} beats the best of all models under shift"}


def soups() -> tuple[str, ...]:
  """The weight-space soups (the registry's Kind.SOUP recipes, in its order), compared with the
  best of all models when model_0 is that model."""
  return recipes.of_kind(recipes.Kind.SOUP)


def _held_column(row: Mapping) -> str:
  """The row's held-out column: the first registered dataset's (soup/data/registry.py) it has."""
  return next(c.held_out for c in datasets.known_columns() if c.held_out in row)


def initialization(rows: Sequence[dict]) -> dict | None:
  """The initialization's row: model_0 if named so."""
  inits = [r for r in rows if r.get("recipe") == Name.INITIALIZATION]
  return next((r for r in inits if r["model_name"] == INITIALIZATION), inits[0] if inits else None)


def init_beats_every_fine_tune(rows: Sequence[dict]) -> tuple[dict, dict] | None:
  """(initialization row, best fine-tune row) if model_0 beats every fine-tune on held-out.

  Held-out is the selection split: then the best of all models is the
  initialization, and the best individual is only the best of the rest.
  """
  init = initialization(rows)
  members = [r for r in rows if r.get("recipe") == Name.INDIVIDUAL]
  if init is None or not members:
    return None
  held = _held_column(init)
  best = max(members, key=lambda r: r[held])
  return (init, best) if init[held] > best[held] else None


def contains_init(row: Mapping, init_name: str = INITIALIZATION) -> bool:
  """Whether a soup's (or ensemble's) recorded ingredients include the initialization."""
  ingredients = row.get("ingredients")
  return (not recipes.is_one_model(row.get("recipe"))
          and isinstance(ingredients, (list, tuple, dict)) and init_name in ingredients)


def setting_warning(rows: Sequence[dict]) -> str | None:
  """The plain statement that the paper's setting does not hold, when model_0 wins held-out."""
  found = init_beats_every_fine_tune(rows)
  if found is None:
    return None
  init, best = found
  held = _held_column(init)
  return (f"The paper's setting does not hold in this run: the initialization "
          f"(`{init['model_name']}`, {100 * init[held]:.2f} held-out) beats every fine-tune on "
          f"held-out (the best, `{best['model_name']}`: {100 * best[held]:.2f}), so fine-tuning "
          f"did not improve on the initialization. The claims against the best individual "
          f"compare soups with the best of the fine-tunes, not with the best model of the run: "
          f"they are not evidence for the paper's mechanism. Each soup is also compared with "
          f"the best of all models, `{init['model_name']}` included")


def single_ingredient(row: Mapping | None) -> str | None:
  """The one ingredient of a soup (or member of an ensemble) that has only one, else None."""
  if not row or recipes.is_one_model(row.get("recipe")):
    return None
  ingredients = row.get("ingredients")
  if isinstance(ingredients, (list, tuple, dict)) and len(ingredients) == 1:
    return next(iter(ingredients))
  return None


def _one_model(row: Mapping, label: str, best_name: str | None) -> str:
  """The words for a soup of one ingredient or an ensemble of one member."""
  name = single_ingredient(row)
  what = "the best individual model" if name == best_name else f"one model, `{name}`"
  done = ("ensembled" if row.get("recipe") in recipes.of_kind(recipes.Kind.ENSEMBLE)
          else "averaged")
  return f"one ingredient: the {label} is {what}; nothing was {done}"


# --- Intervals stored in the rows -------------------------------------------


def add_intervals(rows: list[dict], correct: Mapping[str, Mapping[str, np.ndarray]],
                  columns, seed: int = 0, num_resamples: int = stats.NUM_RESAMPLES,
                  labels: Mapping[str, np.ndarray] | None = None) -> None:
  """Adds paired bootstrap intervals to every row that has per-example correctness.

  `correct[model_name][column]` is a bool vector. Each row gets
  `vs_best_individual` = {"test": interval, "avg_shifts": interval} (fractions);
  the greedy soup also gets `vs_ensemble`; the best individual gets
  `vs_initialization` (the precondition: it minus model_0). When the
  initialization beats every fine-tune on held-out, each soup (`soups()`) gets
  `vs_best_of_all`: it minus the initialization. Missing partners leave rows as
  they are. A column whose metric is not accuracy (CoLA's Matthews correlation) is
  bootstrapped on that metric, from the correctness and `labels[column]`; a task without
  shift splits gets no `avg_shifts` interval.
  """
  by_name = {r["model_name"]: r for r in rows}
  best = by_name.get(Name.BEST_INDIVIDUAL)
  best_name = best.get("selected", Name.BEST_INDIVIDUAL) if best else None

  metric = getattr(columns, "metric", "accuracy")
  if metric != "accuracy" and (labels is None or columns.test not in labels):
    raise ValueError(f"Intervals of {metric} need the test split's labels.")

  def compare(a: str, b: str) -> dict:
    test = stats.paired_bootstrap(correct[a][columns.test], correct[b][columns.test],
                                  num_resamples=num_resamples, seed=seed,
                                  metric=metric, labels=(labels or {}).get(columns.test))
    shifts = None
    if columns.shifts:
      shifts = stats.paired_bootstrap_average(
          {c: correct[a][c] for c in columns.shifts}, {c: correct[b][c] for c in columns.shifts},
          num_resamples=num_resamples, seed=seed).as_dict()
    return {"test": test.as_dict(), "avg_shifts": shifts,
            "resamples": num_resamples, "against": b}

  reference = best_name if best_name in correct else (
      Name.BEST_INDIVIDUAL if Name.BEST_INDIVIDUAL in correct else None)
  if reference is not None:
    for row in rows:
      if row["model_name"] in correct:
        row["vs_best_individual"] = compare(row["model_name"], reference)
  if Name.GREEDY_SOUP in correct and Name.ENSEMBLE in correct and Name.GREEDY_SOUP in by_name:
    by_name[Name.GREEDY_SOUP]["vs_ensemble"] = compare(Name.GREEDY_SOUP, Name.ENSEMBLE)
  init = initialization(rows)
  if init is None or init["model_name"] not in correct:
    return
  if reference is not None and best is not None:
    best["vs_initialization"] = compare(reference, init["model_name"])
  if init_beats_every_fine_tune(rows) is not None:
    weight_space = soups()
    for row in rows:
      if row.get("recipe") in weight_space and row["model_name"] in correct:
        row["vs_best_of_all"] = compare(row["model_name"], init["model_name"])


# --- Verdicts ----------------------------------------------------------------


def verdict(low: float, high: float, threshold: float = 0.0) -> str:
  """held if the interval is above threshold, not held if below, else not resolved.

  A zero-width interval at the threshold (two names of one model) is not held:
  nothing is left to resolve. A soup of one ingredient is not judged here: its
  claims are NOT_APPLICABLE (judge).
  """
  if low > threshold:
    return HELD
  if high < threshold or low == high == threshold:
    return NOT_HELD
  return OPEN


def left_basin(rows: Sequence[dict]) -> tuple[int, int]:
  """(runs that left the basin, fine-tuned runs), from the models' held-out accuracy."""
  init = initialization(rows)
  members = [r for r in rows if r.get("recipe") == Name.INDIVIDUAL]
  excluded = set()
  for r in rows:
    excluded |= set((r.get("excluded") or {}).keys())
  if init is None:
    return len(excluded), len(members) + len(excluded)
  held_col = _held_column(init)
  below = sum(r[held_col] < init[held_col] for r in members)
  return below + len(excluded - {INITIALIZATION}), len(members) + len(excluded - {INITIALIZATION})


def _fmt(interval: dict) -> str:
  return (f"{100 * interval['diff']:+.2f} points [95% CI {100 * interval['low']:+.2f}, "
          f"{100 * interval['high']:+.2f}]")


def _is_num(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _negated(interval: Mapping) -> dict:
  """b minus a from a minus b: the same paired resamples, the sign flipped (up to the
  rounding of a percentile)."""
  return {**interval, "diff": -interval["diff"], "low": -interval["high"],
          "high": -interval["low"]}


def best_individual(rows: Sequence[dict]) -> dict | None:
  """The report's best individual: the `best_individual` line, else the best held-out member."""
  by_name = {r["model_name"]: r for r in rows}
  if Name.BEST_INDIVIDUAL in by_name:
    return by_name[Name.BEST_INDIVIDUAL]
  members = [r for r in rows if r.get("recipe") == Name.INDIVIDUAL]
  if not members:
    return None
  held = _held_column(members[0])
  return max(members, key=lambda r: r[held])  # The first on ties, as the report's.


def _contains_init_note(row: Mapping | None, label: str) -> str:
  return f"; the {label} contains model_0 (the initialization)" if row and contains_init(row) \
      else ""


def precondition(rows: Sequence[dict]) -> dict:
  """Claim 0: best individual minus the initialization on test, with its paired interval.

  Judged on test, as claims 1-4; the shift average is reported alongside. The
  interval is the best individual's `vs_initialization`, or, in results made
  before it was stored, the initialization's `vs_best_individual` negated.
  """
  key = "fine_tuning_improves"
  init, best = initialization(rows), best_individual(rows)
  claim = {"claim": key, "text": CLAIMS[key], "verdict": OPEN}
  if init is None or best is None:
    return {**claim, "evidence": "no initialization and best individual in these results"}
  found = best.get("vs_initialization")
  if found is None and init.get("vs_best_individual"):
    found = {m: _negated(ci) for m, ci in init["vs_best_individual"].items()
             if isinstance(ci, Mapping) and "diff" in ci}
  ci = (found or {}).get("test")
  warning = setting_warning(rows)
  if ci is None:
    return {**claim, "evidence": "no paired interval of the best individual and the "
            "initialization in these results", **({"warning": warning} if warning else {})}
  result = verdict(ci["low"], ci["high"])
  name = best.get("selected", best["model_name"])
  evidence = (f"best individual (`{name}`, chosen on held-out) minus the initialization "
              f"(`{init['model_name']}`) on test: {_fmt(ci)}")
  if (found or {}).get("avg_shifts"):
    evidence += f"; on the shift average: {_fmt(found['avg_shifts'])}"
  if warning is None and result == NOT_HELD:
    warning = ("The paper's setting does not hold in this run: the best individual is below "
               "the initialization on test, so fine-tuning did not improve on the "
               "initialization, and the claims against the best individual are not evidence "
               "for the paper's mechanism")
  return {**claim, "verdict": result, "evidence": evidence,
          **({"warning": warning} if warning else {})}


def _best_of_all(rows: Sequence[dict]) -> list[dict]:
  """Each soup minus the best of all models, when the initialization is that model."""
  found = init_beats_every_fine_tune(rows)
  if found is None:
    return []
  init = found[0]["model_name"]
  by_name = {r["model_name"]: r for r in rows}
  try:
    test = results.detect_columns(rows).test
  except ValueError:
    test = None
  out = []
  for recipe in soups():
    row = by_name.get(recipe)
    if row is None:
      continue
    label = recipes.REGISTRY[recipe].label
    for key, metric, where in (("best_of_all_in_distribution", "test", "test"),
                               ("best_of_all_under_shift", "avg_shifts", "the shift average")):
      claim = {"claim": key, "soup": recipe, "text": BEST_OF_ALL[key].format(soup=label)}
      if metric == "avg_shifts" and "avg_shifts" in (row.get("vs_best_of_all") or {}) \
          and row["vs_best_of_all"]["avg_shifts"] is None:
        continue  # No shift splits for this task.
      if single_ingredient(row) is not None:
        out.append({**claim, "verdict": NOT_APPLICABLE,
                    "evidence": _one_model(row, label.lower(), None)})
        continue
      ci = (row.get("vs_best_of_all") or {}).get(metric)
      if ci is None:  # Results made before these intervals were stored: the point difference.
        column = test if metric == "test" else "avg_shifts"
        point = (f"; point difference on {where}: "
                 f"{100 * (row[column] - found[0][column]):+.2f} points"
                 if column and _is_num(row.get(column)) and _is_num(found[0].get(column))
                 else "")
        out.append({**claim, "verdict": OPEN,
                    "evidence": f"no paired interval of the {label.lower()} against `{init}` in "
                                "these results" + point})
        continue
      out.append({**claim, "verdict": verdict(ci["low"], ci["high"]),
                  "evidence": f"{label.lower()} minus the best of all models (`{init}`, the "
                              f"initialization, best on held-out) on {where}: {_fmt(ci)}"
                              + _contains_init_note(row, label.lower())})
  return out


def judge(rows: Sequence[dict]) -> list[dict]:
  """The precondition, the four claims and, where model_0 wins held-out, each soup against it.

  Rows carry their intervals from add_intervals.
  """
  by_name = {r["model_name"]: r for r in rows}
  greedy, uniform = by_name.get(Name.GREEDY_SOUP), by_name.get(Name.UNIFORM_SOUP)
  best = best_individual(rows)
  best_name = best.get("selected", best["model_name"]) if best else None
  out = [precondition(rows)]

  def add(key: str, result: str, evidence: str):
    out.append({"claim": key, "text": CLAIMS[key], "verdict": result, "evidence": evidence})

  no_shifts = greedy is not None and "avg_shifts" in greedy.get("vs_best_individual", {}) \
      and greedy["vs_best_individual"]["avg_shifts"] is None
  for key, metric, where in (("greedy_in_distribution", "test", "test"),
                             ("greedy_under_shift", "avg_shifts", "shift average")):
    ci = (greedy or {}).get("vs_best_individual", {}).get(metric)
    if metric == "avg_shifts" and no_shifts:
      continue  # A task without shift splits (GLUE): the claim does not apply; the report says so.
    if single_ingredient(greedy) is not None:
      add(key, NOT_APPLICABLE, _one_model(greedy, "greedy soup", best_name)
          + (f"; it minus best individual on the {where}: {_fmt(ci)}"
             if ci and single_ingredient(greedy) != best_name else ""))
    elif ci is None:
      add(key, OPEN, "no greedy soup or best individual with intervals in these results")
    else:
      add(key, verdict(ci["low"], ci["high"]),
          f"greedy soup minus best individual on the {where}: {_fmt(ci)}"
          + _contains_init_note(greedy, "greedy soup"))

  off, runs = left_basin(rows)
  # What the rows' columns hold: accuracy, or a GLUE task's metric (CoLA: Matthews correlation).
  metric = (initialization(rows) or {}).get("metric", "accuracy")
  held = f"held-out {metrics.METRIC_NAMES.get(metric, 'score')}"
  ci = (uniform or {}).get("vs_best_individual", {}).get("test")
  if single_ingredient(uniform) is not None:
    add("uniform_falls_behind", NOT_APPLICABLE, _one_model(uniform, "uniform soup", best_name))
  elif ci is None:
    add("uniform_falls_behind", OPEN, "no uniform soup with intervals in these results")
  elif off == 0:
    add("uniform_falls_behind", OPEN,
        f"no run left the basin (0 of {runs} below the initialization's {held}); "
        f"uniform soup minus best individual on test: {_fmt(ci)}"
        + _contains_init_note(uniform, "uniform soup"))
  else:
    add("uniform_falls_behind", verdict(-ci["high"], -ci["low"]),
        f"{off} of {runs} runs left the basin ({held} below the initialization's "
        f"or diverged); uniform soup minus best individual on test: {_fmt(ci)}"
        + _contains_init_note(uniform, "uniform soup"))

  ci = (greedy or {}).get("vs_ensemble", {}).get("test")
  ensemble = by_name.get(Name.ENSEMBLE)
  one = next(((row, label) for row, label in ((greedy, "greedy soup"), (ensemble, Name.ENSEMBLE))
              if single_ingredient(row) is not None), None)
  if one is not None:
    add("greedy_close_to_ensemble", NOT_APPLICABLE, _one_model(*one, best_name)
        + (f"; greedy soup minus ensemble on test: {_fmt(ci)}" if ci else ""))
  elif ci is None or ensemble is None:
    add("greedy_close_to_ensemble", OPEN, "no greedy soup and ensemble with intervals")
  else:
    n = ensemble.get("inference_cost") or len(ensemble.get("ingredients") or [])
    add("greedy_close_to_ensemble", verdict(ci["low"], ci["high"], -CLOSE_POINTS / 100),
        f"greedy soup minus ensemble on test: {_fmt(ci)}, at 1 forward pass against {n}; "
        f"'close' is within {CLOSE_POINTS:g} point")
  return out + _best_of_all(rows)


def _claim_over_seeds(key: str, values: Sequence[float], threshold: float = 0.0,
                      flip: bool = False, note: str = "", suffix: str = "",
                      text: str | None = None, **extra) -> dict:
  """One claim from per-seed differences: the Student-t interval of their mean."""
  claim = {"claim": key, "text": text or CLAIMS[key], **extra}
  if len(values) < 2:
    return {**claim, "verdict": OPEN,
            "evidence": f"{len(values)} seed(s): an interval over seeds needs 2 or more" + suffix}
  s = stats.mean_interval(values)
  low, high = (-s["high"], -s["low"]) if flip else (s["low"], s["high"])
  return {**claim, "verdict": verdict(low, high, -threshold if flip else threshold),
          "evidence": note + f"mean {100 * s['mean']:+.2f} points over {s['n']} seeds "
                      f"(std {100 * s['std']:.2f}) [95% CI {100 * s['low']:+.2f}, "
                      f"{100 * s['high']:+.2f}]; per seed: "
                      + ", ".join(f"{100 * v:+.2f}" for v in values) + suffix}


def _setting_warning_over_seeds(init_wins: Sequence[int], seeds: int, verdict_: str) -> str | None:
  if init_wins:
    return (f"The paper's setting does not hold in {len(init_wins)} of {seeds} seeds "
            f"({'seed' if len(init_wins) == 1 else 'seeds'} "
            + ", ".join(map(str, init_wins)) + "): there the initialization beats every "
            "fine-tune on held-out, so fine-tuning did not improve on the initialization, and "
            "the claims against the best individual are not evidence for the paper's mechanism. "
            "Each soup is also compared with the best of all models, model_0 included")
  if verdict_ == NOT_HELD:
    return ("The paper's setting does not hold over these seeds: the best individual is below "
            "the initialization on test, and the claims against the best individual are not "
            "evidence for the paper's mechanism")
  return None


def _best_of_all_over_seeds(tables: Mapping[int, Mapping[str, dict]],
                            init_wins: Sequence[int]) -> list[dict]:
  """Each soup minus the best of all models per seed: model_0 where it wins held-out, else the
  best individual."""
  best_of_all = {seed: Name.INITIALIZATION if seed in init_wins else Name.BEST_INDIVIDUAL
                 for seed in tables}
  out = []
  for recipe in soups():
    if not any(recipe in t for t in tables.values()):
      continue
    label = recipes.REGISTRY[recipe].label
    for key, metric, where in (("best_of_all_in_distribution", "test", "test"),
                               ("best_of_all_under_shift", "avg_shifts", "the shift average")):
      values = [t[recipe][metric] - t[best_of_all[seed]][metric] for seed, t in tables.items()
                if recipe in t and best_of_all[seed] in t]
      out.append(_claim_over_seeds(
          key, values, text=BEST_OF_ALL[key].format(soup=label), soup=recipe,
          note=f"{label.lower()} minus the best of all models (chosen on held-out: model_0 "
               f"in {len(init_wins)} of {len(tables)} seeds) on {where}: "))
  return out


def _uniform_falls_behind_over_seeds(tables: Mapping[int, Mapping[str, dict]],
                                     rows_by_seed: Mapping[int, Sequence[dict]]) -> dict:
  """Claim 3 over the seeds where some run left the basin: its stated cause. The seeds where
  none did are reported beside it; a uniform soup behind there too is behind for another
  reason."""
  basin = {seed: left_basin(rows) for seed, rows in rows_by_seed.items()}
  note = (f"runs that left the basin per seed: "
          f"{', '.join(f'{o}/{n}' for o, n in basin.values())}; ")
  left = [seed for seed, (off, _) in basin.items() if off > 0]
  if not left:
    return {"claim": "uniform_falls_behind", "text": CLAIMS["uniform_falls_behind"],
            "verdict": OPEN, "evidence": note[:-2] + ": no run left the basin"}

  def behind(seeds):
    return [tables[s][Name.UNIFORM_SOUP]["test"] - tables[s][Name.BEST_INDIVIDUAL]["test"]
            for s in seeds if s in tables and Name.UNIFORM_SOUP in tables[s]
            and Name.BEST_INDIVIDUAL in tables[s]]

  stayed = behind(s for s in tables if s not in left)
  suffix = ("" if not stayed else
            f"; in the {len(stayed)} seed(s) where no run left the basin: "
            + ", ".join(f"{100 * v:+.2f}" for v in stayed))
  return _claim_over_seeds("uniform_falls_behind", behind(left), flip=True, suffix=suffix,
                           note=note + f"uniform soup minus best individual on test, in the "
                                       f"{len(left)} seed(s) where some left it: ")


def judge_over_seeds(tables: Mapping[int, Mapping[str, dict]],
                     rows_by_seed: Mapping[int, Sequence[dict]]) -> list[dict]:
  """The claims from per-seed differences: the Student-t interval of their mean.

  `tables[seed][recipe]` is the report's chosen row (held_out, test, avg_shifts).
  The precondition comes first, with how many seeds hold it on their own paired
  interval; in seeds where the initialization beats every fine-tune on
  held-out, the soups are also compared with the best of all models (model_0
  there, the best individual elsewhere).
  """
  def diffs(a: str, b: str, metric: str) -> list[float]:
    return [t[a][metric] - t[b][metric] for t in tables.values() if a in t and b in t]

  per_seed = {seed: precondition(rows_by_seed[seed]) for seed in tables if seed in rows_by_seed}
  held = sum(c["verdict"] == HELD for c in per_seed.values())
  first = _claim_over_seeds(
      "fine_tuning_improves", diffs(Name.BEST_INDIVIDUAL, Name.INITIALIZATION, "test"),
      note="best individual minus the initialization on test: ",
      suffix=f"; held on its own seed's paired interval in {held} of {len(per_seed)} seeds")
  init_wins = [seed for seed in tables if seed in rows_by_seed
               and init_beats_every_fine_tune(rows_by_seed[seed]) is not None]
  warning = _setting_warning_over_seeds(init_wins, len(tables), first["verdict"])
  out = [{**first, **({"warning": warning} if warning else {})}]

  one = [seed for seed in tables if single_ingredient(next(
      (r for r in rows_by_seed.get(seed, ()) if r["model_name"] == Name.GREEDY_SOUP), None))]
  greedy_note = ("" if not one else
                 f"; in {len(one)} of {len(tables)} seeds ({', '.join(map(str, one))}) the greedy "
                 "soup kept one ingredient: there nothing was averaged")
  # A greedy soup of one ingredient in every seed is one model in every seed: as in one run,
  # no soup was tested (its differences stay in the evidence).
  never_averaged = bool(one) and set(one) >= {s for s, t in tables.items() if Name.GREEDY_SOUP in t}

  def greedy_claim(key: str, values: Sequence[float], **kwargs) -> dict:
    claim = _claim_over_seeds(key, values, suffix=greedy_note, **kwargs)
    return {**claim, "verdict": NOT_APPLICABLE} if never_averaged else claim

  out.append(greedy_claim("greedy_in_distribution",
                          diffs(Name.GREEDY_SOUP, Name.BEST_INDIVIDUAL, "test"),
                          note="greedy soup minus best individual on test: "))
  out.append(greedy_claim("greedy_under_shift",
                          diffs(Name.GREEDY_SOUP, Name.BEST_INDIVIDUAL, "avg_shifts"),
                          note="greedy soup minus best individual on the shift average: "))
  out.append(_uniform_falls_behind_over_seeds(tables, rows_by_seed))
  out.append(greedy_claim(
      "greedy_close_to_ensemble", diffs(Name.GREEDY_SOUP, Name.ENSEMBLE, "test"),
      threshold=-CLOSE_POINTS / 100,
      note=f"greedy soup minus ensemble on test ('close': within {CLOSE_POINTS:g} point): "))
  return out + (_best_of_all_over_seeds(tables, init_wins) if init_wins else [])


def render(claims: Sequence[dict], heading: str = "## The paper's claims") -> list[str]:
  lines = [heading, ""]
  grouped = False
  for c in claims:
    if c.get("soup") and not grouped:  # The best-of-all comparisons, under their own heading.
      lines += ["", "### Each soup against the best of all models, the initialization included",
                ""]
      grouped = True
    lines.append(f"- **{c['text']}: {c['verdict']}.** {c['evidence']}.")
    if c.get("warning"):
      lines += ["", f"> **Warning.** {c['warning']}.", ""]
  return lines + [""]
