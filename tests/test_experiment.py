"""The smoke experiment end to end through the CLI, and its resumption."""

import ast
import json
import re
import shutil
from pathlib import Path

import pytest

from soup import checkpoints, recipes, results
from tests.conftest import run_python

pytestmark = pytest.mark.slow  # The pipeline or several processes: -m 'not slow' skips it.

SMOKE = ["-m", "soup.main", "--config=configs/fashion_mnist.py:smoke"]


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory, fashion_mnist_ready):
  workdir = tmp_path_factory.mktemp("smoke")
  # -X importtime: every module the run imports, listed on stderr (the README test below).
  proc = run_python(["-X", "importtime", *SMOKE, f"--workdir={workdir}"])
  return workdir, proc


def test_smoke_results_have_every_column(smoke_workdir):
  workdir, proc = smoke_workdir
  rows = results.read(workdir / "results.jsonl")
  columns = results.FASHION_MNIST
  names = {r["model_name"] for r in rows}
  assert {"model_0", "model_1", "model_2", "model_3", "best_individual", "uniform_soup",
          "greedy_soup", "learned_soup", "learned_soup_by_layer", "ensemble", "greedy_ensemble",
          "model_stock", "wise_ft_alpha_0", "wise_ft_alpha_0.5", "wise_ft_alpha_1"} <= names
  for row in rows:
    for col in (*columns.all, "avg_shifts", "model_name", "recipe", "ingredients",
                "inference_cost"):
      assert col in row, (row["model_name"], col)
    for col in columns.all:
      assert 0.0 <= row[col] <= 1.0
    assert row["avg_shifts"] == pytest.approx(sum(row[c] for c in columns.shifts) / 5)
  by_name = {r["model_name"]: r for r in rows}
  members = [by_name[f"model_{i}"] for i in (1, 2, 3)]
  assert all("hparams" in m and m["inference_cost"] == 1 for m in members)
  assert by_name["ensemble"]["inference_cost"] == 4
  assert by_name["uniform_soup"]["ingredients"] == ["model_0", "model_1", "model_2", "model_3"]
  # The greedy soup never loses held-out accuracy to the best individual ingredient.
  held = columns.held_out
  best = max(by_name[n][held] for n in ("model_0", "model_1", "model_2", "model_3"))
  assert by_name["greedy_soup"][held] >= best
  # WiSE-FT's endpoints are the initialization and the best individual.
  assert by_name["wise_ft_alpha_0"][columns.test] == by_name["model_0"][columns.test]
  assert by_name["wise_ft_alpha_1"][columns.test] == by_name["best_individual"][columns.test]
  # The report's table shows each method's own numbers, in the results' columns' order.
  report = (workdir / "report.md").read_text()
  for name in ("uniform_soup", "greedy_soup", "ensemble", "pixel_linear"):
    row = by_name[name]
    cells = " | ".join(f"{100 * row[c]:.2f}" for c in (*columns.all, "avg_shifts"))
    assert f"| {recipes.REGISTRY[name].label} | {cells} |" in report, name
  assert (workdir / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "report:" in proc.stdout and "Greedy soup" in proc.stdout


def test_smoke_report_has_baseline_intervals_claims_and_analysis_figures(smoke_workdir):
  workdir, _ = smoke_workdir
  rows = {r["model_name"]: r for r in results.read(workdir / "results.jsonl")}
  assert rows["pixel_linear"]["recipe"] == "pixel_linear"
  assert all("correct" not in r for r in rows.values())  # Kept in the caches, not the results.
  for name in ("greedy_soup", "uniform_soup", "model_0", "pixel_linear"):
    ci = rows[name]["vs_best_individual"]
    for metric in ("test", "avg_shifts"):
      assert ci[metric]["low"] <= ci[metric]["diff"] <= ci[metric]["high"]
  assert rows["greedy_soup"]["vs_ensemble"]["test"]["low"] <= rows["greedy_soup"]["vs_ensemble"][
      "test"]["high"]
  text = (workdir / "report.md").read_text()
  assert "Pixel logistic regression (baseline)" in text and "95% paired bootstrap" in text
  claims_md = text[text.index("## The paper's claims"):]
  # The precondition first, then the paper's four claims.
  assert claims_md.index("- **Fine-tuning improves on the initialization") < claims_md.index(
      "- **The greedy soup")
  assert claims_md.count("- **The ") == 4
  for figure in ("landscape.png", "ingredients.png"):
    assert f"]({figure})" in text
    assert (workdir / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  analysis = json.loads((workdir / "analysis.json").read_text())
  assert len(analysis["curves"]["uniform_test"]) == 4  # model_0 and three members.


def test_both_probes_choose_their_l2_inside_the_grid_they_searched(smoke_workdir):
  workdir, _ = smoke_workdir
  rows = {r["model_name"]: r for r in results.read(workdir / "results.jsonl")}
  model_0 = checkpoints.ingredient_metadata(workdir / "models" / "model_0" / "ingredient")
  for fit in (model_0["metadata"]["probe"], rows["pixel_linear"]["probe"]):
    assert set(fit["l2_grid"]) <= set(fit["l2_searched"])
    assert min(fit["l2_searched"]) < fit["l2"] < max(fit["l2_searched"])
    assert not fit["l2_on_edge"]


def test_training_writes_jsonl_and_tensorboard_metrics(smoke_workdir):
  workdir, _ = smoke_workdir
  logs = workdir / "models" / "model_1" / "logs"
  lines = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
  assert lines and {"step", "train/loss", "train/lr"} <= set(lines[-1])
  assert list(logs.glob("events.out.tfevents.*"))


def test_rerun_skips_finished_work(smoke_workdir):
  workdir, _ = smoke_workdir
  ingredient_files = sorted((workdir / "models").glob("*/ingredient/**/*"))
  before = {p: p.stat().st_mtime_ns for p in ingredient_files if p.is_file()}
  results_before = (workdir / "results.jsonl").read_text()
  proc = run_python([*SMOKE, f"--workdir={workdir}"])
  after = {p: p.stat().st_mtime_ns for p in before}
  assert before == after  # No member was retrained or re-saved.
  assert "sweep 1/" not in proc.stderr
  assert (workdir / "results.jsonl").read_text() == results_before


def test_single_stage_and_unknown_key(smoke_workdir, tmp_path):
  workdir, _ = smoke_workdir
  proc = run_python([*SMOKE, f"--workdir={workdir}", "--config.stages=report"])
  assert "Uniform soup" in proc.stdout
  bad = run_python([*SMOKE, f"--workdir={tmp_path}", "--config.sweep.num_memberz=2"], check=False)
  assert bad.returncode != 0 and "num_memberz" in bad.stderr


CHEAP_SOUPS = ["--config.stages=('evaluate','soups','report')",
               "--config.soups.recipes=('best_individual','uniform_soup','ensemble')"]


def _untimed(rows):
  return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _mtimes(paths):
  return {p.name: p.stat().st_mtime_ns for p in paths}


def test_changed_data_setting_recomputes_logits_and_rows(smoke_workdir, tmp_path):
  """Another data_dir (here: the same data behind a symlink) misses every cache."""
  from soup.data.fashion_mnist_tfds import default_data_dir
  workdir = tmp_path / "run"
  shutil.copytree(smoke_workdir[0], workdir)
  run_python([*SMOKE, f"--workdir={workdir}", *CHEAP_SOUPS])
  before = _mtimes((workdir / "eval").glob("*.npz"))
  rows_before = _untimed(results.read(workdir / "results.jsonl"))
  proc = run_python([*SMOKE, f"--workdir={workdir}", *CHEAP_SOUPS])
  assert "soup recipe" not in proc.stderr and _mtimes((workdir / "eval").glob("*.npz")) == before

  tfds = tmp_path / "tfds"
  tfds.mkdir()
  (tfds / "fashion_mnist").symlink_to(Path(default_data_dir()) / "fashion_mnist")
  proc = run_python([*SMOKE, f"--workdir={workdir}", *CHEAP_SOUPS,
                     f"--config.data.data_dir={tfds}"])
  after = _mtimes((workdir / "eval").glob("*.npz"))
  assert all(after[name] != before[name] for name in before)  # Every model re-evaluated.
  for recipe in ("best_individual", "uniform_soup", "ensemble"):
    assert f"soup recipe: {recipe} " in proc.stderr
  # The same data: the same numbers.
  assert _untimed(results.read(workdir / "results.jsonl")) == rows_before


def test_retrained_member_recomputes_its_logits_and_the_soups(smoke_workdir, tmp_path):
  """A member whose bytes changed (retrained) is re-evaluated; the others are not."""
  workdir = tmp_path / "run"
  shutil.copytree(smoke_workdir[0], workdir)
  run_python([*SMOKE, f"--workdir={workdir}", *CHEAP_SOUPS])
  before = _mtimes((workdir / "eval").glob("*.npz"))
  # "Retrain" model_2 into model_1's weights: its row must become model_1's.
  shutil.rmtree(workdir / "models" / "model_2" / "ingredient")
  shutil.copytree(workdir / "models" / "model_1" / "ingredient",
                  workdir / "models" / "model_2" / "ingredient")
  proc = run_python([*SMOKE, f"--workdir={workdir}", *CHEAP_SOUPS])
  after = _mtimes((workdir / "eval").glob("*.npz"))
  assert [n for n in before if after[n] != before[n]] == ["model_2.npz"]
  for recipe in ("best_individual", "uniform_soup", "ensemble"):
    assert f"soup recipe: {recipe} " in proc.stderr
  rows = {r["model_name"]: r for r in results.read(workdir / "results.jsonl")}
  for column in results.FASHION_MNIST.all:
    assert rows["model_2"][column] == rows["model_1"][column]


def _is_code(path: Path) -> bool:
  """A module with code of its own: a package __init__ that only imports is not."""
  tree = ast.parse(path.read_text())
  return path.name != "__init__.py" or any(
      not isinstance(node, (ast.Import, ast.ImportFrom, ast.Expr)) for node in tree.body)


def test_readme_run_flow_lists_exactly_the_files_a_run_imports(smoke_workdir):
  """README's "How a run flows" names every project file the default's code path imports
  (followed from soup.main by Python's own -X importtime), and no other."""
  _, proc = smoke_workdir
  root = Path(__file__).resolve().parents[1]
  modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
             if line.startswith("import time:") and "|" in line}
  imported = set()
  for module in modules:
    if module.split(".")[0] not in ("soup", "configs"):
      continue
    base = root.joinpath(*module.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    if _is_code(path):
      imported.add(path.relative_to(root).as_posix())
  assert "soup/experiment.py" in imported and "soup/models/vit.py" in imported
  readme = (root / "README.md").read_text()
  section = readme.split("## How a run flows", 1)[1].split("\n## ", 1)[0]
  listed = set(re.findall(r"`((?:soup|configs)/[\w/]+\.py)`", section))
  # soup/main.py runs as __main__; the config file is run from its path by ml_collections'
  # flag. Neither is imported by name.
  imported |= {"soup/main.py", "configs/fashion_mnist.py"}
  # The smoke config pretrains its small start in the run (the default loads a file).
  assert imported - listed == {"soup/contrastive.py"}, "imported but not in README's run flow"
  assert listed - imported == set(), "in README's run flow but not imported by a run"
