"""The smoke experiment end to end through the CLI, and its resumption."""

import json

import pytest

from conftest import run_python
from soup import results

SMOKE = ["-m", "soup.main", "--config=configs/fashion_mnist.py:smoke"]


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory, fashion_mnist_ready):
  workdir = tmp_path_factory.mktemp("smoke")
  proc = run_python([*SMOKE, f"--workdir={workdir}"])
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
    for col in (*columns.all, "avg_shifts", "model_name", "recipe", "ingredients", "inference_cost"):
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
  assert (workdir / "report.md").read_text().count("|") > 50
  assert (workdir / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "report:" in proc.stdout and "Greedy soup" in proc.stdout


def test_training_writes_jsonl_and_tensorboard_metrics(smoke_workdir):
  workdir, _ = smoke_workdir
  logs = workdir / "models" / "model_1" / "logs"
  lines = [json.loads(l) for l in (logs / "metrics.jsonl").read_text().splitlines()]
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
