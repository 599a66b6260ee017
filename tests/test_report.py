"""Tests for soup/report.py: the Table 1 analog, report.md, figure.png and the CLI."""

from __future__ import annotations

import hashlib
import json

import pytest

from soup import recipes, report as rep, results as R
from tests.conftest import ROOT as REPO, run_python

PAPER = REPO / "tests" / "data" / "paper"
OFFICIAL = [PAPER / f"{name}.jsonl" for name in
            ("individual_model_results", "uniform_soup_results", "greedy_soup_results",
             "ensemble_results")]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _official_rows() -> list[dict]:
  rows = []
  for path in OFFICIAL:
    rows += R.read(path, recipes.infer_recipe)
  return rows


def _by_recipe(report: dict) -> dict[str, dict]:
  return {row["recipe"]: row for row in report["rows"]}


def _pct(x: float) -> float:
  return round(100 * x, 2)


@pytest.fixture(scope="module")
def official_report() -> dict:
  return build(_official_rows())


def build(rows):
  return rep.build_report(rows, R.IMAGENET)


# ----------------------------------------------------------------------------
# The paper's released results.
# ----------------------------------------------------------------------------


def test_official_numbers(official_report):
  rows = _by_recipe(official_report)
  assert list(rows) == ["initialization", "best_individual", "uniform_soup", "greedy_soup",
                        "ensemble"]
  best = rows["best_individual"]
  assert best["model_name"] == "model_43"
  assert official_report["best_individual"] == {
      "model_name": "model_43", "selected_by": "ImageNet2p", "source": "selected"}
  assert (_pct(best["test"]), _pct(best["avg_shifts"])) == (80.39, 47.97)
  assert _pct(rows["uniform_soup"]["test"]) == 79.97
  assert _pct(rows["greedy_soup"]["test"]) == 81.03
  assert _pct(rows["ensemble"]["test"]) == 81.19
  assert _pct(rows["initialization"]["test"]) == 75.57
  assert rows["initialization"]["model_name"] == "model_0"
  # Avg. shifts of the soups, from the jsonl columns (the paper's table is ~0.1 off).
  assert _pct(rows["uniform_soup"]["avg_shifts"]) == 51.58
  assert _pct(rows["greedy_soup"]["avg_shifts"]) == 50.86
  assert _pct(rows["ensemble"]["avg_shifts"]) == 50.88


def test_best_individual_uses_held_out_not_test():
  rows = _official_rows()
  # model_44 (second on held-out) made the best on test: selection must not move.
  model_44 = next(r for r in rows if r["model_name"] == "model_44")
  model_44["ImageNet"] = 0.99
  assert _by_recipe(build(rows))["best_individual"]["model_name"] == "model_43"
  # Made the best on held-out instead: selection moves.
  model_44["ImageNet2p"] = 0.99
  assert _by_recipe(build(rows))["best_individual"]["model_name"] == "model_44"


def test_official_ingredients_and_cost(official_report):
  rows = _by_recipe(official_report)
  assert official_report["n_models"] == 72
  assert rows["uniform_soup"]["ingredients"] == 72
  assert rows["ensemble"]["ingredients"] == 72
  assert rows["greedy_soup"]["ingredients"] is None
  assert rows["greedy_soup"]["cells"][-2] == "—"
  assert rows["best_individual"]["ingredients"] == 1
  assert rows["ensemble"]["inference_cost"] == 72
  assert rows["ensemble"]["cells"][-1] == "72 models"
  for recipe in ("initialization", "best_individual", "uniform_soup", "greedy_soup"):
    assert rows[recipe]["inference_cost"] == 1
    assert rows[recipe]["cells"][-1] == "1 model"


def test_avg_shifts_is_plain_mean(official_report):
  for row in official_report["rows"]:
    shifts = [row["line"][c] for c in R.IMAGENET.shifts]
    assert row["avg_shifts"] == pytest.approx(sum(shifts) / 5, abs=1e-12)
    assert list(row["shifts"]) == list(R.IMAGENET.shifts)
  # A wrong avg_shifts field in the input is not trusted.
  rows = _official_rows()
  for r in rows:
    r["avg_shifts"] = 0.0
  greedy = _by_recipe(build(rows))["greedy_soup"]
  assert _pct(greedy["avg_shifts"]) == 50.86


def test_cells_are_percent_with_two_decimals(official_report):
  greedy = _by_recipe(official_report)["greedy_soup"]
  assert greedy["cells"][:3] == ["Greedy soup", "83.98", "81.03"]
  assert greedy["cells"][8] == "50.86"
  assert len(greedy["cells"]) == 1 + 2 + 5 + 1 + 2


def test_render_markdown_official(official_report):
  md = rep.render_markdown(official_report)
  assert md.startswith("# ")
  assert "| Best individual model (model_43) | 83.05 | 80.39 |" in md
  assert "| Uniform soup | 82.70 | 79.97 |" in md
  assert "| Ensemble | 83.81 | 81.19 |" in md and "| 72 | 72 models |" in md
  assert "| Greedy soup | 83.98 | 81.03 |" in md and "| 50.86 | — | 1 model |" in md
  assert "`ImageNet2p`" in md  # the note names the split that selected


def test_input_rows_not_mutated():
  rows = [{k: v for k, v in r.items() if k not in ("recipe", "avg_shifts")}
          for r in _official_rows()]
  before = json.dumps(rows)
  report = rep.build_report(rows)  # columns detected
  assert json.dumps(rows) == before
  assert report["columns"]["test"] == "ImageNet"
  assert _by_recipe(report)["best_individual"]["model_name"] == "model_43"


def test_cli_official(tmp_path):
  out = tmp_path / "out"
  proc = run_python(["-m", "soup.report", *(f"--results={p}" for p in OFFICIAL), f"--out={out}"],
                    timeout=120)
  md = (out / "report.md").read_text()
  png = (out / "figure.png").read_bytes()
  assert png[:8] == PNG_MAGIC
  assert len(png) > 20_000
  for line in ("| Best individual model (model_43) | 83.05 | 80.39 |",
               "| Uniform soup | 82.70 | 79.97 |", "| Greedy soup | 83.98 | 81.03 |",
               "| Ensemble | 83.81 | 81.19 |", "| Initialization | 78.08 | 75.57 |"):
    assert line in proc.stdout
    assert line in md
  assert str(out / "report.md") in proc.stdout
  assert str(out / "figure.png") in proc.stdout
  assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------
# Synthetic Fashion-MNIST results with every recipe.
# ----------------------------------------------------------------------------


def _fm_row(name, held, test, shifts, **extra):
  row = {"model_name": name, "FashionMNISTHeldOut": held, "FashionMNIST": test}
  row.update(dict(zip(R.FASHION_MNIST.shifts, shifts)))
  row.update(extra)
  return row


def _synthetic_rows() -> list[dict]:
  rows = [
      _fm_row("model_0", 0.80, 0.79, [0.70, 0.60, 0.50, 0.40, 0.30]),
      _fm_row("model_1", 0.86, 0.84, [0.71, 0.61, 0.51, 0.41, 0.31]),
      _fm_row("model_2", 0.88, 0.83, [0.72, 0.62, 0.52, 0.42, 0.32]),  # best held-out
      _fm_row("model_3", 0.85, 0.87, [0.73, 0.63, 0.53, 0.43, 0.33]),  # best test
      # An explicit best_individual line wins over selection among individuals.
      _fm_row("best_individual", 0.86, 0.84, [0.71, 0.61, 0.51, 0.41, 0.31],
              recipe="best_individual", ingredients=["model_1"]),
      _fm_row("uniform_soup", 0.87, 0.86, [0.74, 0.64, 0.54, 0.44, 0.34], recipe="uniform_soup"),
      _fm_row("greedy_soup", 0.89, 0.88, [0.75, 0.65, 0.55, 0.45, 0.35],
              ingredients=["model_2", "model_1"]),  # recipe inferred from the name
      _fm_row("learned_soup", 0.895, 0.885, [0.76, 0.66, 0.56, 0.46, 0.36], recipe="learned_soup",
              ingredients=["model_0", "model_1", "model_2", "model_3"],
              weights=[0.1, 0.2, 0.3, 0.4]),
      _fm_row("learned_soup_by_layer", 0.9, 0.89, [0.77, 0.67, 0.57, 0.47, 0.37],
              recipe="learned_soup_by_layer", ingredients=["model_0", "model_1", "model_2"],
              weights=[[0.5, 0.25, 0.25], [0.0, 0.5, 0.5]]),
      _fm_row("model_stock", 0.87, 0.875, [0.70, 0.60, 0.50, 0.40, 0.30], recipe="model_stock",
              ingredients=["model_0", "model_1", "model_2"]),
      _fm_row("wise_ft_a0.0", 0.80, 0.79, [0.70, 0.60, 0.50, 0.40, 0.30], recipe="wise_ft",
              alpha=0.0),
      _fm_row("wise_ft_a1.0", 0.88, 0.83, [0.72, 0.62, 0.52, 0.42, 0.32], recipe="wise_ft",
              alpha=1.0),
      _fm_row("wise_ft_a0.5", 0.885, 0.86, [0.78, 0.68, 0.58, 0.48, 0.38], recipe="wise_ft",
              alpha=0.5),
      _fm_row("ensemble", 0.891, 0.881, [0.76, 0.66, 0.56, 0.46, 0.36], recipe="ensemble",
              ingredients=["model_0", "model_1", "model_2", "model_3"], inference_cost=4),
      _fm_row("greedy_ensemble", 0.893, 0.883, [0.75, 0.65, 0.55, 0.45, 0.35],
              ingredients=["model_2", "model_1"]),
  ]
  return rows


def test_synthetic_every_row():
  report = rep.build_report(_synthetic_rows())
  assert report["columns"]["held_out"] == "FashionMNISTHeldOut"
  rows = _by_recipe(report)
  assert list(rows) == ["initialization", "best_individual", "uniform_soup", "greedy_soup",
                        "learned_soup", "learned_soup_by_layer", "model_stock", "wise_ft",
                        "ensemble", "greedy_ensemble"]
  assert rows["best_individual"]["model_name"] == "best_individual"
  assert report["best_individual"]["source"] == "given"
  assert _pct(rows["best_individual"]["test"]) == 84.0
  # WiSE-FT: the best alpha by held-out, and the curve ordered by alpha.
  assert rows["wise_ft"]["line"]["alpha"] == 0.5
  assert rows["wise_ft"]["method"] == "WiSE-FT (α=0.5)"
  assert [p["alpha"] for p in report["wise_ft_curve"]] == [0.0, 0.5, 1.0]
  assert _pct(rows["wise_ft"]["avg_shifts"]) == 58.0
  # Ingredients and cost.
  assert rows["greedy_soup"]["ingredients"] == 2
  assert rows["greedy_soup"]["inference_cost"] == 1
  assert rows["learned_soup"]["ingredients"] == 4
  assert rows["uniform_soup"]["ingredients"] == 4  # 3 individual + initialization
  # The ensemble holds model_0 (the initialization): the table says so.
  assert rows["ensemble"]["cells"][-2:] == ["4 (incl. model_0)", "4 models"]
  assert rows["greedy_ensemble"]["cells"][-2:] == ["2", "2 models"]
  assert rows["model_stock"]["cells"][-1] == "1 model"


def test_synthetic_selection_without_best_line():
  rows = [r for r in _synthetic_rows() if r["model_name"] != "best_individual"]
  report = rep.build_report(rows)
  best = _by_recipe(report)["best_individual"]
  assert best["model_name"] == "model_2"  # held-out 0.88, not model_3 (best test)
  assert _pct(best["test"]) == 83.0
  assert report["best_individual"]["selected_by"] == "FashionMNISTHeldOut"


def test_synthetic_recipe_inferred():
  # (model_stock keeps its recipe: recipes.infer_recipe reads "model_stock" as an
  # individual "model_*" name.)
  rows = [{k: v for k, v in r.items() if k != "recipe" or r["model_name"] == "model_stock"}
          for r in _synthetic_rows() if "wise_ft" not in r["model_name"]]
  report = rep.build_report(rows)
  recipes = [r["recipe"] for r in report["rows"]]
  assert recipes == ["initialization", "best_individual", "uniform_soup", "greedy_soup",
                     "learned_soup", "learned_soup_by_layer", "model_stock", "ensemble",
                     "greedy_ensemble"]
  assert _by_recipe(report)["initialization"]["model_name"] == "model_0"
  assert _by_recipe(report)["ensemble"]["inference_cost"] == 4


def test_model_stock_note_summarises_its_ratios():
  rows = _synthetic_rows()
  for row in rows:
    if row["model_name"] == "model_stock":
      row["ratios"] = {"a/kernel": 0.5, "a/bias": -0.25, "b/kernel": 1.0}
  notes = [n for n in rep.build_report(rows)["notes"] if n.startswith("Model stock")]
  assert notes == ["Model stock's ratio t (0: the initialization, 1: the members' mean) over 3 "
                   "parameter leaves: min -0.250, mean 0.417, max 1.000."]


def test_synthetic_markdown_and_cli(tmp_path):
  results = tmp_path / "results.jsonl"
  R.write(results, _synthetic_rows())
  md = rep.render_markdown(rep.build_report(R.read(results)))
  for needle in ("| Initialization | 80.00 | 79.00 |",
                 "| Best individual model (best_individual) | 86.00 | 84.00 |",
                 "| Uniform soup | 87.00 | 86.00 |", "| Greedy soup | 89.00 | 88.00 |",
                 "| Learned soup | 89.50 | 88.50 |", "| Learned soup (by layer) | 90.00 | 89.00 |",
                 "| Model stock | 87.00 | 87.50 |", "| WiSE-FT (α=0.5) | 88.50 | 86.00 |",
                 "| Ensemble | 89.10 | 88.10 |", "| Greedy ensemble | 89.30 | 88.30 |",
                 "`model_2`, `model_1`",  # greedy soup ingredients
                 "model_0=0.100, model_1=0.200, model_2=0.300, model_3=0.400",  # learned weights
                 "2 groups (layers) × 3 weights"):  # by-layer weights, compact
    assert needle in md, needle

  out = tmp_path / "out"
  proc = run_python(["-m", "soup.report", f"--results={results}", f"--out={out}"], timeout=120)
  assert "| WiSE-FT (α=0.5) | 88.50 | 86.00 |" in proc.stdout
  assert "| Greedy ensemble | 89.30 | 88.30 |" in proc.stdout
  png = (out / "figure.png").read_bytes()
  assert png[:8] == PNG_MAGIC and len(png) > 20_000
  assert (out / "report.md").read_text() == md


def test_plot_figure_direct(tmp_path):
  path = tmp_path / "sub" / "fig.png"
  rep.plot_figure(_official_rows(), R.IMAGENET, path)
  data = path.read_bytes()
  assert data[:8] == PNG_MAGIC and len(data) > 20_000
  assert [p.name for p in path.parent.iterdir()] == ["fig.png"]


def test_results_digest_ignores_wall_times_and_nothing_else(tmp_path):
  """The digest docs quote per machine kind: equal for two runs that differ only in their
  wall times, different when any number moves."""
  rows = [{"model_name": "model_0", "FashionMNIST": 0.8075, "seconds": 3.1},
          {"model_name": "uniform_soup", "FashionMNIST": 0.8296, "ingredients": ["a", "b"]}]
  a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
  R.write(a, rows)
  R.write(b, [{**rows[0], "seconds": 9.9}, {**rows[1]}])
  R.write(c, [{**rows[0], "FashionMNIST": 0.8073}, rows[1]])
  assert R.digest(a) == R.digest(b)
  assert R.digest(a) != R.digest(c)
  expected = hashlib.sha256(b"".join(
      (json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True) + "\n").encode()
      for r in rows)).hexdigest()
  assert R.digest(a) == expected
