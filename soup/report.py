"""The Table 1 analog and the Figure 1 scatter, from results.jsonl lines.

    python -m soup.report --results=a.jsonl [--results=b.jsonl ...] --out=DIR

reads one or more results files (concatenated; the paper's released results are
split across four), writes DIR/report.md and DIR/figure.png atomically and
prints the table and the two paths. Nothing is recomputed but the table: no
model code, no jax.

Table rows follow the paper's Table 1 (the registry's order, soup/recipes.py):
the initialization, the best individual model (chosen by HELD-OUT accuracy
among `individual` lines, unless a `best_individual` line exists), the soups,
WiSE-FT (the best alpha by held-out accuracy) and the ensembles. Where a recipe
has several lines, the one with the best held-out accuracy is shown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from soup import atomic_io, claims, layout, metrics, results as R
from soup.data import registry as datasets
from soup.recipes import MODEL_RECIPES, REGISTRY, Name, infer_recipe, is_one_model

DASH = R.DASH


def _method(recipe: str) -> str:
  """The table's name of a recipe: declared once, in the recipe registry."""
  return REGISTRY[recipe].label if recipe in REGISTRY else recipe


# ----------------------------------------------------------------------------
# Rows and the report dict.
# ----------------------------------------------------------------------------


def _prepare(rows: Sequence[dict], columns: R.Columns | None) -> tuple[list[dict], R.Columns]:
  """Copies rows, infers missing recipes, recomputes avg_shifts from the shifts."""
  if not rows:
    raise ValueError("No results rows.")
  columns = columns or R.detect_columns(rows)
  out = []
  for row in rows:
    row = dict(row)
    if not row.get("recipe"):
      row["recipe"] = infer_recipe(row["model_name"])
    if all(_num(row.get(c)) is not None for c in columns.shifts):
      row["avg_shifts"] = R.avg_shifts(row, columns)
    else:
      row["avg_shifts"] = None
    out.append(row)
  return out, columns


_num, _pct = R.number, R.percent  # A line's numbers, and how the report writes them.


def _best(rows: Sequence[dict], key: str) -> dict | None:
  """The row with the highest `key` (first one on ties); rows lacking it last."""
  if not rows:
    return None
  return max(rows, key=lambda r: (_num(r.get(key)) is not None, _num(r.get(key)) or 0.0))


def _cost_str(n: int | None) -> str:
  if n is None:
    return DASH
  return f"{n} model" if n == 1 else f"{n} models"


def _ingredients_count(row: dict, recipe: str, n_models: int) -> int | None:
  ingredients = row.get("ingredients")
  if isinstance(ingredients, (list, tuple, dict)):
    return len(ingredients)
  if isinstance(ingredients, int) and not isinstance(ingredients, bool):
    return ingredients
  if is_one_model(recipe):
    return 1
  # Recipes whose ingredients are, by definition, every individual model and the
  # initialization (the paper's uniform soup and ensemble of all 72 models).
  if recipe in REGISTRY and REGISTRY[recipe].every_model and n_models:
    return n_models
  return None  # e.g. the official greedy soup: which models it took is not recorded.


def _inference_cost(row: dict, recipe: str, ingredients: int | None) -> int | None:
  cost = row.get("inference_cost")
  if isinstance(cost, (int, float)) and not isinstance(cost, bool):
    return int(cost)
  if recipe in REGISTRY and REGISTRY[recipe].inference_cost == "per_ingredient":
    return ingredients
  return 1


def build_report(rows: Sequence[dict], columns: R.Columns | None = None) -> dict:
  """Derives the Table 1 analog from results lines.

  Returns a dict with
    columns: {"held_out", "test", "shifts"} column names;
    rows: one dict per table row, in RECIPES order: recipe, method (display
      name), model_name, held_out, test, shifts ({column: accuracy}), avg_shifts
      (fractions in [0, 1] or None), ingredients (int or None), inference_cost
      (forward passes per image or None), cells (the formatted table cells),
      line (the results line shown);
    best_individual: model_name and how it was chosen (selected_by, source);
    wise_ft_curve: the wise_ft lines ordered by alpha;
    n_models: number of individual + initialization models;
    notes: list of markdown strings.
  """
  rows, columns = _prepare(rows, columns)
  by_recipe: dict[str, list[dict]] = {}
  for row in rows:
    by_recipe.setdefault(row["recipe"], []).append(row)
  n_models = len({r["model_name"] for r in rows if r["recipe"] in MODEL_RECIPES})
  chosen, best_info, multi = _choose_rows(by_recipe, columns)
  table = [_table_entry(recipe, row, columns, n_models) for recipe, row in chosen.items()]
  curve = sorted((r for r in by_recipe.get(Name.WISE_FT, []) if _num(r.get("alpha")) is not None),
                 key=lambda r: r["alpha"])

  # Notes.
  notes: list[str] = []
  warning = claims.setting_warning(rows)
  if warning:  # First: it changes how every comparison with the best individual reads.
    notes.append(f"**{warning}.**")
  if best_info is not None:
    if best_info["source"] == "selected":
      notes.append(f"The best individual model, `{best_info['model_name']}`, was chosen by "
                   f"held-out accuracy (`{columns.held_out}`) among the "
                   f"{len(by_recipe.get(Name.INDIVIDUAL, []))} individual models, never by the "
                   f"test split (`{columns.test}`).")
    else:
      notes.append(f"The best individual model, `{best_info['model_name']}`, is the results' own "
                   f"`best_individual` line.")
  notes += _recipe_notes(by_recipe, chosen, columns)
  if multi:
    notes.append("Several lines for " + ", ".join(f"`{m}`" for m in multi)
                 + ": the table shows the one with the best held-out accuracy.")
  with_init = [entry["method"] for entry in table if entry["contains_init"]]
  if with_init:  # A soup of model_0 and fine-tunes may mostly recover the start.
    notes.append("These contain `model_0` (the initialization) among their ingredients: "
                 + ", ".join(with_init) + " (marked \"incl. model_0\" in the table).")
  heldout_note = _heldout_list_note(rows, columns)
  if heldout_note:
    notes.append(heldout_note)
  if columns.shifts:
    notes.append(f"Avg. shifts is the plain mean of "
                 f"{', '.join(f'`{c}`' for c in columns.shifts)}.")
  else:
    notes.append("This task has no distribution-shift splits (GLUE's dev set is the reported "
                 "split): the table has no shift columns and the claims under shift do not "
                 "apply.")
  paper = glue_paper_note(columns)
  if paper:
    notes.append(paper)
  if columns.metric != "accuracy":
    notes.append(f"Every column is the task's {metrics.METRIC_NAMES[columns.metric]} "
                 "(x100), not accuracy; every selection maximizes it on held-out.")
  notes.append(f"Ingredients of the uniform soup and the ensemble: all {n_models} individual and "
               f"initialization models unless recorded.")

  return {
      "columns": {"held_out": columns.held_out, "test": columns.test,
                  "shifts": list(columns.shifts), "metric": columns.metric},
      "rows": table,
      Name.BEST_INDIVIDUAL: best_info,
      "wise_ft_curve": [{"alpha": r["alpha"], "held_out": _num(r.get(columns.held_out)),
                         "test": _num(r.get(columns.test)), "avg_shifts": r["avg_shifts"]}
                        for r in curve],
      "n_models": n_models,
      "notes": notes,
      **_statistics(rows, table),
  }


def _choose_rows(by_recipe: dict[str, list[dict]], columns: R.Columns
                 ) -> tuple[dict[str, dict], dict[str, Any] | None, list[str]]:
  """The row each recipe shows (the best on held-out), how the best individual was found, and
  the recipes with several lines."""
  chosen: dict[str, dict] = {}
  multi: list[str] = []
  best_info: dict[str, Any] | None = None
  known = [r for r in REGISTRY if r != Name.INDIVIDUAL]
  for recipe in known + sorted(set(by_recipe) - set(REGISTRY)):
    if recipe == Name.BEST_INDIVIDUAL:
      if by_recipe.get(Name.BEST_INDIVIDUAL):
        row = _best(by_recipe[Name.BEST_INDIVIDUAL], columns.held_out)
        source = "given"
      elif by_recipe.get(Name.INDIVIDUAL):
        row = _best(by_recipe[Name.INDIVIDUAL], columns.held_out)
        source = "selected"
      else:
        continue
      best_info = {"model_name": row["model_name"], "selected_by": columns.held_out,
                   "source": source}
      chosen[recipe] = row
      continue
    candidates = by_recipe.get(recipe)
    if not candidates:
      continue
    if recipe == Name.INITIALIZATION:
      named = [r for r in candidates if r["model_name"] == layout.INITIALIZATION]
      candidates = named or candidates
    if len(candidates) > 1 and recipe != Name.WISE_FT:
      multi.append(recipe)
    chosen[recipe] = _best(candidates, columns.held_out)
  return chosen, best_info, multi


def _table_entry(recipe: str, row: dict, columns: R.Columns, n_models: int) -> dict:
  """One table row: the numbers, the formatted cells and the results line shown."""
  method = _method(recipe)
  if recipe == Name.WISE_FT and _num(row.get("alpha")) is not None:
    method = f"WiSE-FT (α={row['alpha']:g})"
  if recipe == Name.BEST_INDIVIDUAL:
    method = f"{method} ({row['model_name']})"
  ingredients = _ingredients_count(row, recipe, n_models)
  cost = _inference_cost(row, recipe, ingredients)
  entry = {
      "recipe": recipe,
      "method": method,
      "model_name": row["model_name"],
      "held_out": _num(row.get(columns.held_out)),
      "test": _num(row.get(columns.test)),
      "shifts": {c: _num(row.get(c)) for c in columns.shifts},
      "avg_shifts": row["avg_shifts"],
      "ingredients": ingredients,
      "inference_cost": cost,
      "line": row,
  }
  entry["contains_init"] = claims.contains_init(row)
  shift_cells = ([*(_pct(entry["shifts"][c]) for c in columns.shifts), _pct(entry["avg_shifts"])]
                 if columns.shifts else [])  # A task without shifts (GLUE) has no such columns.
  entry["cells"] = [method, _pct(entry["held_out"]), _pct(entry["test"]), *shift_cells,
                    _ingredients_cell(ingredients, entry), _cost_str(cost)]
  return entry


def _recipe_notes(by_recipe: dict[str, list[dict]], chosen: dict[str, dict],
                  columns: R.Columns) -> list[str]:
  """Each shown recipe's own note (soup/recipes.py): what selections kept, then the rest."""
  noted = sorted((r for r in REGISTRY.values() if r.note is not None and r.name in chosen),
                 key=lambda r: not r.note_first)  # Stable: registry order within each.
  texts = (r.note(by_recipe.get(r.name, []), chosen[r.name], columns) for r in noted)
  return [text for text in texts if text]


def _ingredients_cell(ingredients: int | None, entry: dict) -> str:
  if ingredients is None:
    return DASH
  return f"{ingredients} (incl. model_0)" if entry["contains_init"] else str(ingredients)


def _statistics(rows: Sequence[dict], table: Sequence[dict]) -> dict:
  """The rows' paired intervals (against the best individual, and against the best of all
  models where that is the initialization), and the claims they decide."""
  def method(entry):  # A soup of one ingredient is one model: its row says so.
    return entry["method"] + (" (one ingredient)" if claims.single_ingredient(entry["line"])
                              else "")
  intervals = [{"method": method(entry), **entry["line"]["vs_best_individual"]}
               for entry in table if entry["line"].get("vs_best_individual")
               and entry["recipe"] != Name.BEST_INDIVIDUAL]
  best_of_all = [{"method": method(entry), **entry["line"]["vs_best_of_all"]}
                 for entry in table if entry["line"].get("vs_best_of_all")]
  if not intervals:
    return {"intervals": [], "best_of_all_intervals": [], "claims": []}
  return {"intervals": intervals, "best_of_all_intervals": best_of_all,
          "claims": claims.judge(rows)}


def _interval_cell(interval: dict) -> str:
  return (f"{100 * interval['diff']:+.2f} [{100 * interval['low']:+.2f}, "
          f"{100 * interval['high']:+.2f}]")


def statistics_markdown(report: dict) -> list[str]:
  """The intervals tables and the claims section (empty without intervals)."""
  if not report.get("intervals"):
    return []
  first = report["intervals"][0]
  shifts = bool(report["columns"]["shifts"])
  unit = metrics.METRIC_NAMES[report["columns"].get("metric", "accuracy")]
  header = (["| Method | Δ test [95% CI] | Δ avg. shifts [95% CI] |", "| --- | ---: | ---: |"]
            if shifts else ["| Method | Δ test [95% CI] |", "| --- | ---: |"])

  def cells(i: dict) -> str:
    return (f"| {i['method']} | {_interval_cell(i['test'])} |"
            + (f" {_interval_cell(i['avg_shifts'])} |" if shifts else ""))
  text = ["## Differences from the best individual", "",
          f"Points of {unit} minus the best individual model (`{first['against']}`), with a 95% "
          f"paired bootstrap interval ({first['resamples']} resamples of the evaluation "
          "examples, both models scored on the same resample"
          + ("; each shift split resampled on its own for the average" if shifts else "")
          + "). An interval that excludes 0 is a difference this evaluation can resolve.", "",
          *header]
  text += [cells(i) for i in report["intervals"]]
  others = report.get("best_of_all_intervals")
  if others:
    text += ["", "## Differences from the best of all models", "",
             f"The initialization (`{others[0]['against']}`) beats every fine-tune on held-out, "
             "so it is the best of all models: accuracy points of each soup minus it, with the "
             "same paired bootstrap.", "", *header]
    text += [cells(i) for i in others]
  return text + [""] + claims.render(report["claims"])


PAPER_GLUE = (Path(__file__).resolve().parent.parent / "tests" / "data" / "paper"
              / "glue_table5.json")
_GLUE_NAMES = {"SST2": "SST-2", "RTE": "RTE", "CoLA": "CoLA", "MRPC": "MRPC"}


def glue_paper_note(columns: R.Columns) -> str | None:
  """The paper's Table 5 gains for this GLUE task (greedy soup minus best individual), beside
  ours; None for other tasks or without the data file."""
  task = _GLUE_NAMES.get(columns.test[:-len("Dev")]) if columns.test.endswith("Dev") else None
  if task is None or not PAPER_GLUE.exists():
    return None
  table = json.loads(PAPER_GLUE.read_text())
  gains = {model: g[task] for model, g in table["greedy_minus_best_points"].items() if task in g}
  if not gains:
    return None
  return ("The paper's Table 5 on " + task + " (its own sweeps of 32 fine-tunes; greedy soup "
          "minus best individual, points): " + ", ".join(f"{m} {v:+.1f}" for m, v in gains.items())
          + f" (tests/data/paper/{PAPER_GLUE.name}, with its source).")


def _heldout_list_note(rows: Sequence[dict], columns: R.Columns) -> str | None:
  """Which held-out list the lines were measured on (their `heldout_list`, if recorded)."""
  kinds = sorted({str(r["heldout_list"]) for r in rows if r.get("heldout_list")})
  if kinds == ["official"]:
    return (f"`{columns.held_out}` is the paper's own held-out split (the official "
            "imagenet_98_idxs.npy, mapped onto TFDS records by file name).")
  if kinds == ["seeded"]:
    return (f"`{columns.held_out}` is our seeded draw of the held-out images, not the paper's "
            "(its imagenet_98_idxs.npy was not used): held-out accuracies, the greedy order and "
            "the fine-tuning split differ from the paper's.")
  if kinds:
    return (f"Warning: these lines mix held-out lists ({', '.join(kinds)}): their "
            f"`{columns.held_out}` accuracies are not comparable.")
  return None


# ----------------------------------------------------------------------------
# Markdown.
# ----------------------------------------------------------------------------


def markdown_table(report: dict) -> str:
  cols = report["columns"]
  shifts = [*cols["shifts"], "Avg. shifts"] if cols["shifts"] else []
  header = ["Method", f"{cols['held_out']} (held-out)", f"{cols['test']} (test)", *shifts,
            "Ingredients", "Inference cost"]
  lines = ["| " + " | ".join(header) + " |",
           "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
  for row in report["rows"]:
    lines.append("| " + " | ".join(row["cells"]) + " |")
  return "\n".join(lines) + "\n"


def render_markdown(report: dict) -> str:
  cols = report["columns"]
  unit = metrics.METRIC_NAMES[cols.get("metric", "accuracy")]
  where = (f" and {len(cols['shifts'])} distribution shifts" if cols["shifts"]
           else " (no distribution shifts for this task)")
  text = ["# Model soups: Table 1 analog", "",
          f"{unit[0].upper() + unit[1:]} (%) on `{cols['held_out']}` (held-out, used for every "
          f"selection) and `{cols['test']}` (test){where}.", "",
          markdown_table(report), "## Notes", ""]
  text += [f"- {note}" for note in report["notes"]]
  stats_text = statistics_markdown(report)
  if stats_text:
    text += [""] + stats_text
  if report.get("figures"):
    text += ["## Analysis figures", ""]
    text += [f"- [{title}]({name})" for title, name in report["figures"].items()]
  return "\n".join(text) + "\n"


# ----------------------------------------------------------------------------
# Figure.
# ----------------------------------------------------------------------------


def _markers() -> dict:
  """The single-point recipes' markers (registry order), drawn over the individual models."""
  return {name: r.marker for name, r in REGISTRY.items() if r.marker is not None}


def plot_figure(rows: Sequence[dict], columns: R.Columns | None, path: str | os.PathLike) -> None:
  """Figure 1 analog: test accuracy (x) against avg. shifts accuracy (y), in %. A task without
  shifts (GLUE) plots its test (dev) metric against its held-out metric instead."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows, columns = _prepare(rows, columns)
  report = build_report(rows, columns)

  def xy(r):
    x = _num(r.get(columns.test))
    y = r.get("avg_shifts") if columns.shifts else _num(r.get(columns.held_out))
    return None if x is None or y is None else (100 * x, 100 * y)

  fig, ax = plt.subplots(figsize=(9.6, 7.2))
  handles = {}

  individuals = [p for p in (xy(r) for r in rows if r["recipe"] == Name.INDIVIDUAL) if p]
  if not individuals and report[Name.BEST_INDIVIDUAL]:
    best = next(r["line"] for r in report["rows"] if r["recipe"] == Name.BEST_INDIVIDUAL)
    individuals = [p for p in [xy(best)] if p]
  if individuals:
    handles[Name.INDIVIDUAL] = ax.scatter(*zip(*individuals), marker="d", s=150, color="C2",
                                       label="Various hyperparameters", zorder=2)

  init = next((r["line"] for r in report["rows"] if r["recipe"] == Name.INITIALIZATION), None)
  if init is not None and xy(init):
    label = "Initialization (LP)" if columns == R.IMAGENET else "Initialization"
    handles[Name.INITIALIZATION] = ax.scatter(*xy(init), marker="h", s=200, color="slategray",
                                           label=label, zorder=3)

  curve = [p for p in (xy(r) for r in sorted(
      (r for r in rows if r["recipe"] == Name.WISE_FT and _num(r.get("alpha")) is not None),
      key=lambda r: r["alpha"])) if p]
  if curve:
    (handles[Name.WISE_FT],) = ax.plot(*zip(*curve), "-o", color="C9", markersize=5, linewidth=2,
                                    label="WiSE-FT (varying α)", zorder=3)
  else:
    wise = next((r["line"] for r in report["rows"] if r["recipe"] == Name.WISE_FT), None)
    if wise is not None and xy(wise):
      handles[Name.WISE_FT] = ax.scatter(*xy(wise), marker="v", s=200, color="C9", label="WiSE-FT",
                                      zorder=4)

  for recipe, m in _markers().items():
    row = next((r["line"] for r in report["rows"] if r["recipe"] == recipe), None)
    if row is not None and xy(row):
      handles[recipe] = ax.scatter(*xy(row), marker=m.symbol, s=m.size, color=m.color,
                                   label=m.label, zorder=m.zorder)

  if columns == R.IMAGENET:
    ax.set_xlabel("ImageNet Accuracy (top-1%)", fontsize=16)
    ax.set_ylabel("Avg. accuracy on 5 distribution shifts", fontsize=16)
  elif not columns.shifts:
    unit = metrics.METRIC_NAMES[columns.metric]
    ax.set_xlabel(f"{columns.test} {unit} (%, test)", fontsize=16)
    ax.set_ylabel(f"{columns.held_out} {unit} (%, held-out)", fontsize=16)
    ax.set_title("No distribution shifts for this task: held-out against test", fontsize=9)
  else:
    ax.set_xlabel(f"{columns.test} accuracy (%)", fontsize=16)
    ax.set_ylabel(f"Avg. accuracy on {len(columns.shifts)} shifts (%)", fontsize=16)
    ax.set_title("Shifts: " + ", ".join(columns.shifts), fontsize=9)
  ax.grid(True)
  order = [*_markers(), Name.WISE_FT, Name.INITIALIZATION, Name.INDIVIDUAL]
  shown = [handles[k] for k in order if k in handles]
  # The paper's legend sits lower right; with many entries let matplotlib avoid the points.
  if len(shown) <= 5:
    ax.legend(handles=shown, fontsize=13, loc="lower right")
  else:
    ax.legend(handles=shown, fontsize=10, loc="best", framealpha=0.8)
  fig.tight_layout()

  try:
    atomic_io.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)
  finally:
    plt.close(fig)


# ----------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------

_COLUMN_PRESETS = datasets.column_presets()  # The datasets of one set of columns, by name.


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m soup.report", description=__doc__.split("\n")[0])
  parser.add_argument("--results", action="append", required=True,
                      help="results jsonl; repeat to concatenate several files")
  parser.add_argument("--out", required=True, help="directory for report.md and figure.png")
  parser.add_argument("--columns", choices=sorted(_COLUMN_PRESETS),
                      help="column preset (default: detected from the first line)")
  args = parser.parse_args(argv)

  rows: list[dict] = []
  for path in args.results:
    try:
      rows += R.read(path, infer_recipe)
    except (R.ResultsError, OSError) as e:  # A bad file: one line naming it, not a traceback.
      print(f"error: {e}", file=sys.stderr)
      return 2
  columns = _COLUMN_PRESETS[args.columns] if args.columns else R.detect_columns(rows)
  report = build_report(rows, columns)
  out = Path(args.out)
  md_path, fig_path = out / layout.REPORT, out / layout.FIGURE
  atomic_io.atomic_write_text(md_path, render_markdown(report))
  plot_figure(rows, columns, fig_path)
  print(markdown_table(report))
  print(f"wrote {md_path}")
  print(f"wrote {fig_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
