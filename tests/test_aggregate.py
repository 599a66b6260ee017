"""Aggregation over seeds against hand-computed means; claims' verdicts on known intervals."""

import json

import numpy as np
import pytest

from soup import aggregate, claims, results

COLS = results.FASHION_MNIST


def _row(name, recipe, held, test, shift, **extra):
  row = {"model_name": name, "recipe": recipe, COLS.held_out: held, COLS.test: test,
         **{c: shift for c in COLS.shifts}, "ingredients": [name], "inference_cost": 1}
  row.update(extra)
  return row


EVERY_MODEL = ["model_0", "model_1", "model_2"]


def _seed_rows(best_test, greedy_test, greedy_shift, uniform_test=0.70, ensemble_test=0.86,
               member_held=(0.85, 0.60)):
  return [
      _row("model_0", "initialization", 0.80, 0.79, 0.40),
      _row("model_1", "individual", member_held[0], best_test, 0.45),
      _row("model_2", "individual", member_held[1], 0.55, 0.30),
      _row("best_individual", "best_individual", member_held[0], best_test, 0.45,
           selected="model_1"),
      _row("uniform_soup", "uniform_soup", 0.70, uniform_test, 0.35, ingredients=EVERY_MODEL),
      _row("greedy_soup", "greedy_soup", 0.86, greedy_test, greedy_shift,
           ingredients=["model_1", "model_2"]),
      _row("ensemble", "ensemble", 0.85, ensemble_test, 0.46, inference_cost=3,
           ingredients=EVERY_MODEL),
  ]


def test_aggregate_matches_hand_computed_means(tmp_path):
  by_seed = {0: _seed_rows(0.84, 0.85, 0.47), 1: _seed_rows(0.86, 0.86, 0.44),
             2: _seed_rows(0.88, 0.90, 0.46)}
  agg = aggregate.aggregate(by_seed)
  rows = {r["recipe"]: r for r in agg["rows"]}
  best = rows["best_individual"]["test"]
  assert best["mean"] == pytest.approx((0.84 + 0.86 + 0.88) / 3)
  assert best["std"] == pytest.approx(0.02)
  assert best["n"] == 3
  greedy = rows["greedy_soup"]
  assert greedy["test"]["mean"] == pytest.approx(0.87)
  assert greedy["avg_shifts"]["mean"] == pytest.approx((0.47 + 0.44 + 0.46) / 3)
  assert rows["initialization"]["held_out"]["std"] == pytest.approx(0.0)
  # Greedy minus best: test +0.01, 0, +0.02 (2 wins, 1 tie); shifts +0.02, -0.01, +0.01.
  g = agg["greedy_vs_best"]
  assert (g["test"]["wins"], g["test"]["ties"], g["test"]["seeds"]) == (2, 1, 3)
  assert g["test"]["diff"]["mean"] == pytest.approx(0.01)
  assert g["avg_shifts"]["wins"] == 2
  assert g["avg_shifts"]["diff"]["mean"] == pytest.approx((0.02 - 0.01 + 0.01) / 3)
  text = aggregate.render_markdown(agg, "python -m soup.aggregate --seeds=3", {0: 500.0, 1: 400})
  assert "| Greedy soup | 86.00 ± 0.00" in text and "86.00 ± 2.00" in text
  assert "greedy ahead in 2 of 3 seeds (1 ties)" in text and "total 900 s" in text


def test_load_runs_and_command_line_aggregate_only(tmp_path, capsys):
  for seed, rows in {0: _seed_rows(0.84, 0.85, 0.47), 1: _seed_rows(0.86, 0.87, 0.48)}.items():
    results.write(tmp_path / f"seed_{seed}" / "results.jsonl", rows)
    (tmp_path / f"seed_{seed}" / "wall_seconds.txt").write_text("300.5\n")
  assert aggregate.main([f"--root={tmp_path}", "--aggregate_only"]) == 0
  saved = json.loads((tmp_path / "aggregate.json").read_text())
  assert saved["seeds"] == [0, 1] and saved["seconds"] == {"0": 300.5, "1": 300.5}
  assert "## The paper's claims, over seeds" in (tmp_path / "aggregate.md").read_text()
  with pytest.raises(SystemExit):
    aggregate.main([f"--root={tmp_path / 'empty'}", "--aggregate_only"])


def test_seed_overrides_and_shared_upstream_copy(tmp_path):
  assert aggregate.seed_overrides(2, True) == ["--config.sweep.seed=2"]
  assert aggregate.seed_overrides(2, False) == ["--config.sweep.seed=2", "--config.seed=2"]
  source = tmp_path / "seed_0"
  for part in ("upstream/ingredient", "models/model_0/ingredient"):
    (source / part).mkdir(parents=True)
    (source / part / "params").write_text(part)
  aggregate.share_upstream_from(source, tmp_path / "seed_1")
  assert (tmp_path / "seed_1/models/model_0/ingredient/params").read_text() == \
      "models/model_0/ingredient"


def test_claim_verdicts_from_intervals():
  assert claims.verdict(0.001, 0.02) == claims.HELD
  assert claims.verdict(-0.02, -0.001) == claims.NOT_HELD
  assert claims.verdict(-0.01, 0.01) == claims.OPEN
  assert claims.verdict(0.0, 0.0) == claims.NOT_HELD  # The same model: no gain to resolve.
  rows = _seed_rows(0.84, 0.85, 0.47)
  by = {r["model_name"]: r for r in rows}
  by["greedy_soup"]["vs_best_individual"] = {
      "test": {"diff": 0.01, "low": 0.004, "high": 0.016},
      "avg_shifts": {"diff": 0.02, "low": -0.01, "high": 0.05}}
  by["uniform_soup"]["vs_best_individual"] = {
      "test": {"diff": -0.14, "low": -0.15, "high": -0.13}, "avg_shifts": {}}
  by["greedy_soup"]["vs_ensemble"] = {"test": {"diff": -0.01, "low": -0.02, "high": 0.0}}
  verdicts = {c["claim"]: c["verdict"] for c in claims.judge(rows)}
  # No paired interval of the best individual and model_0 here: the precondition is open.
  assert verdicts == {"fine_tuning_improves": claims.OPEN,
                      "greedy_in_distribution": claims.HELD, "greedy_under_shift": claims.OPEN,
                      "uniform_falls_behind": claims.HELD,
                      "greedy_close_to_ensemble": claims.OPEN}
  # model_2 (held-out 0.60 < initialization's 0.80) left the basin; none does here.
  assert claims.left_basin(rows) == (1, 2)
  calm = _seed_rows(0.84, 0.85, 0.47, member_held=(0.85, 0.82))
  assert claims.left_basin(calm) == (0, 2)


def test_add_intervals_pairs_rows_with_the_best_individual():
  rng = np.random.default_rng(0)
  rows = _seed_rows(0.84, 0.85, 0.47)
  base = {c: rng.random(300) < 0.8 for c in COLS.all}
  correct = {"model_1": base, "best_individual": base,
             "greedy_soup": {c: base[c] | (rng.random(300) < 0.5) for c in COLS.all},
             "ensemble": {c: base[c] for c in COLS.all}}
  claims.add_intervals(rows, correct, COLS, num_resamples=200)
  by = {r["model_name"]: r for r in rows}
  assert by["best_individual"]["vs_best_individual"]["test"] == {"diff": 0.0, "low": 0.0,
                                                                 "high": 0.0}
  greedy = by["greedy_soup"]["vs_best_individual"]
  assert greedy["against"] == "model_1" and greedy["test"]["low"] > 0
  assert by["greedy_soup"]["vs_ensemble"]["test"]["low"] > 0
  assert "vs_best_individual" not in by["uniform_soup"]  # No correctness given for it.


def test_uniform_claim_over_seeds_uses_the_seeds_where_runs_left_the_basin():
  # Seeds 0 and 1: model_2 (held-out 0.60) is below model_0 (0.80); seed 2: no run below it.
  by_seed = {0: _seed_rows(0.84, 0.85, 0.47, uniform_test=0.74),
             1: _seed_rows(0.86, 0.86, 0.44, uniform_test=0.76),
             2: _seed_rows(0.88, 0.90, 0.46, uniform_test=0.87, member_held=(0.85, 0.82))}
  claim = next(c for c in aggregate.aggregate(by_seed)["claims"]
               if c["claim"] == "uniform_falls_behind")
  assert claim["verdict"] == claims.HELD  # -10 points twice, where runs left the basin.
  assert "in the 2 seed(s) where some left it: mean -10.00 points over 2 seeds" in claim[
      "evidence"]
  assert claim["evidence"].endswith("in the 1 seed(s) where no run left the basin: -1.00")
