"""The precondition claim (fine-tuning improves on the initialization), the model_0 flag and
the best-of-all comparisons, on synthetic rows in both regimes."""

import numpy as np
import pytest

from soup import aggregate, claims, report as rep, results

COLS = results.FASHION_MNIST
N = 400  # Examples per split.
RESAMPLES = 200


def _flip(vector: np.ndarray, count: int, to: bool) -> np.ndarray:
  """A copy with the first `count` examples that are not `to` set to `to`: a known shift."""
  out = vector.copy()
  out[np.flatnonzero(out != to)[:count]] = to
  return out


def _run(regime: str) -> tuple[list[dict], dict]:
  """Rows and per-example correctness of one run.

  "improves": the fine-tunes add 60 correct examples to model_0's on every split, and the
  greedy soup is made of fine-tunes only. "init_wins": the fine-tunes lose 30 and 40, the
  greedy soup starts from model_0 and adds 20, the uniform soup loses 10, model stock is
  model_0 itself.
  """
  rng = np.random.default_rng(0)
  init = {c: rng.random(N) < 0.75 for c in COLS.all}
  if regime == "improves":
    model_1 = {c: _flip(v, 60, True) for c, v in init.items()}
    model_2 = {c: _flip(v, 40, True) for c, v in init.items()}
    greedy = {c: _flip(v, 10, True) for c, v in model_1.items()}
    greedy_ingredients = ["model_1", "model_2"]
    uniform = {c: _flip(v, 50, True) for c, v in init.items()}
    stock = {c: _flip(v, 55, True) for c, v in init.items()}
  else:
    model_1 = {c: _flip(v, 30, False) for c, v in init.items()}
    model_2 = {c: _flip(v, 40, False) for c, v in init.items()}
    greedy = {c: _flip(v, 20, True) for c, v in init.items()}
    greedy_ingredients = ["model_0", "model_1"]
    uniform = {c: _flip(v, 10, False) for c, v in init.items()}
    stock = dict(init)
  correct = {"model_0": init, "model_1": model_1, "model_2": model_2, "best_individual": model_1,
             "greedy_soup": greedy, "uniform_soup": uniform, "model_stock": stock,
             "ensemble": model_1}

  def row(name, recipe, ingredients, **extra):
    accuracies = {c: float(np.mean(correct[name][c])) for c in COLS.all}
    return {"model_name": name, "recipe": recipe, **accuracies, "ingredients": ingredients,
            "inference_cost": 1, **extra}

  everything = ["model_0", "model_1", "model_2"]
  rows = [row("model_0", "initialization", ["model_0"]),
          row("model_1", "individual", ["model_1"]),
          row("model_2", "individual", ["model_2"]),
          row("best_individual", "best_individual", ["model_1"], selected="model_1"),
          row("uniform_soup", "uniform_soup", everything),
          row("greedy_soup", "greedy_soup", greedy_ingredients),
          row("model_stock", "model_stock", everything),
          row("ensemble", "ensemble", everything, inference_cost=3)]
  return rows, correct


def _judged(regime: str) -> tuple[list[dict], list[dict]]:
  rows, correct = _run(regime)
  claims.add_intervals(rows, correct, COLS, num_resamples=RESAMPLES)
  return rows, claims.judge(rows)


FOUR = ["greedy_in_distribution", "greedy_under_shift", "uniform_falls_behind",
        "greedy_close_to_ensemble"]


def test_fine_tuning_improves_precondition_first_and_held():
  rows, judged = _judged("improves")
  assert [c["claim"] for c in judged] == ["fine_tuning_improves", *FOUR]  # No best-of-all.
  first = judged[0]
  assert first["verdict"] == claims.HELD
  assert "warning" not in first
  # +60 of 400 examples on test: +15 points, best individual (model_1) minus model_0.
  ci = {r["model_name"]: r for r in rows}["best_individual"]["vs_initialization"]
  assert ci["against"] == "model_0" and ci["test"]["diff"] == pytest.approx(0.15)
  assert ci["test"]["low"] > 0
  assert "+15.00 points" in first["evidence"] and "`model_1`" in first["evidence"]
  assert all("vs_best_of_all" not in r for r in rows)
  assert claims.init_beats_every_fine_tune(rows) is None
  # The greedy soup holds no model_0: its claims say nothing of it; the uniform soup's does.
  by_claim = {c["claim"]: c for c in judged}
  assert "model_0" not in by_claim["greedy_in_distribution"]["evidence"]
  assert "uniform soup contains model_0" in by_claim["uniform_falls_behind"]["evidence"]


def test_init_beats_every_fine_tune_compares_soups_with_the_best_of_all():
  rows, judged = _judged("init_wins")
  soups = ["uniform_soup", "greedy_soup", "model_stock"]  # In SOUPS' order, as present.
  assert [c["claim"] for c in judged] == [
      "fine_tuning_improves", *FOUR,
      *(k for _ in soups for k in ("best_of_all_in_distribution", "best_of_all_under_shift"))]
  assert [c["soup"] for c in judged[5:]] == [s for s in soups for _ in range(2)]
  first = judged[0]
  # model_1 lost 30 of 400 examples: -7.5 points, resolved below 0.
  assert first["verdict"] == claims.NOT_HELD
  assert "-7.50 points" in first["evidence"]
  assert first["warning"].startswith("The paper's setting does not hold in this run")
  assert "not evidence for the paper's mechanism" in first["warning"]
  by_name = {r["model_name"]: r for r in rows}
  for soup in soups:
    assert by_name[soup]["vs_best_of_all"]["against"] == "model_0"
  # Greedy: model_0 plus 20 examples (held); uniform: 10 fewer (not held); model stock is
  # model_0 itself (a zero-width interval: not held).
  verdicts = {(c["soup"], c["claim"]): c["verdict"] for c in judged[5:]}
  assert verdicts[("greedy_soup", "best_of_all_in_distribution")] == claims.HELD
  assert verdicts[("uniform_soup", "best_of_all_in_distribution")] == claims.NOT_HELD
  assert verdicts[("model_stock", "best_of_all_in_distribution")] == claims.NOT_HELD
  assert by_name["model_stock"]["vs_best_of_all"]["test"] == {"diff": 0.0, "low": 0.0,
                                                              "high": 0.0}
  greedy_all = judged[5 + 2]
  assert greedy_all["text"] == "Greedy soup beats the best of all models in distribution"
  assert "+5.00 points" in greedy_all["evidence"]
  # The greedy soup starts from model_0: every greedy claim says so.
  by_claim = {c["claim"]: c for c in judged[:5]}
  for key in ("greedy_in_distribution", "greedy_under_shift"):
    assert "greedy soup contains model_0 (the initialization)" in by_claim[key]["evidence"]
  assert "greedy soup contains model_0" in greedy_all["evidence"]


def test_precondition_from_older_results_negates_the_initialization_interval():
  rows, judged = _judged("init_wins")
  for row in rows:  # Results written before vs_initialization was stored.
    row.pop("vs_initialization", None)
  older = claims.precondition(rows)
  # The same paired resamples with the sign flipped: the same verdict and evidence.
  assert older == judged[0]


def test_report_flags_model_0_and_says_the_setting_does_not_hold():
  rows, _ = _judged("init_wins")
  report = rep.build_report(rows)
  cells = {r["recipe"]: r["cells"][-2] for r in report["rows"]}
  assert cells["greedy_soup"] == "2 (incl. model_0)"
  assert cells["uniform_soup"] == "3 (incl. model_0)"
  assert cells["initialization"] == "1" and cells["best_individual"] == "1"
  assert report["notes"][0].startswith("**The paper's setting does not hold in this run")
  assert report["claims"][0]["claim"] == "fine_tuning_improves"
  md = rep.render_markdown(report)
  claims_md = md[md.index("## The paper's claims"):]
  assert claims_md.index("- **Fine-tuning improves on the initialization (the paper's "
                         "precondition): not held.**") < claims_md.index("- **The greedy soup")
  assert "> **Warning.** The paper's setting does not hold in this run" in claims_md
  assert "### Each soup against the best of all models, the initialization included" in md
  assert "- **Greedy soup beats the best of all models in distribution: held.**" in md
  best_of_all = md[md.index("## Differences from the best of all models"):
                   md.index("## The paper's claims")]
  assert "| Greedy soup | +5.00 [" in best_of_all and "| Model stock | +0.00 [+0.00, +0.00]" \
      in best_of_all
  assert "The initialization (`model_0`) beats every fine-tune on held-out" in best_of_all


def test_report_in_the_papers_regime_has_no_warning():
  rows, _ = _judged("improves")
  report = rep.build_report(rows)
  cells = {r["recipe"]: r["cells"][-2] for r in report["rows"]}
  assert cells["greedy_soup"] == "2" and cells["uniform_soup"] == "3 (incl. model_0)"
  md = rep.render_markdown(report)
  assert "does not hold" not in md and "best of all models" not in md
  assert ("- **Fine-tuning improves on the initialization (the paper's precondition): held.** "
          "best individual (`model_1`, chosen on held-out) minus the initialization (`model_0`) "
          "on test: +15.00 points") in md


def test_aggregate_carries_the_precondition():
  runs = {0: _judged("improves")[0], 1: _judged("init_wins")[0], 2: _judged("init_wins")[0]}
  agg = aggregate.aggregate(runs)
  pre = agg["precondition"]
  # Best individual minus model_0 on test: +15, -7.5, -7.5 points.
  assert pre["test"]["diff"]["mean"] == pytest.approx(0.0)
  assert (pre["test"]["wins"], pre["test"]["seeds"]) == (1, 3)
  assert (pre["held"], pre["held_seeds"]) == (1, 3)
  assert pre["init_beats_every_fine_tune"] == [1, 2]
  over = agg["claims"]
  assert [c["claim"] for c in over[:5]] == ["fine_tuning_improves", *FOUR]
  assert "held on its own seed's paired interval in 1 of 3 seeds" in over[0]["evidence"]
  assert over[0]["warning"].startswith("The paper's setting does not hold in 2 of 3 seeds "
                                       "(seeds 1, 2)")
  # Best of all: the best individual in seed 0, model_0 in seeds 1 and 2; the greedy soup is
  # +2.5 points over model_1 in seed 0 and +5 over model_0 in the others.
  greedy = next(c for c in over if c.get("soup") == "greedy_soup"
                and c["claim"] == "best_of_all_in_distribution")
  assert "per seed: +2.50, +5.00, +5.00" in greedy["evidence"]
  text = aggregate.render_markdown(agg)
  assert ("Best individual minus initialization (points; the precondition, fine-tuning "
          "improves on the initialization): test: ") in text
  assert "best individual ahead in 1 of 3 seeds" in text
  assert "held on its seed's paired test interval in 1 of 3 seeds" in text
  assert text.index("- **Fine-tuning improves") < text.index("- **The greedy soup")


def _one_ingredient(regime: str, **ingredients) -> tuple[list[dict], list[dict]]:
  """A run whose soups (or ensemble) hold the given ingredients, with their correctness."""
  rows, correct = _run(regime)
  for name, kept in ingredients.items():
    row = next(r for r in rows if r["model_name"] == name)
    row["ingredients"] = kept
    if len(kept) == 1:  # A soup of one ingredient is that model.
      correct[name] = correct[kept[0]]
      row.update({c: float(np.mean(correct[name][c])) for c in COLS.all})
  claims.add_intervals(rows, correct, COLS, num_resamples=RESAMPLES)
  return rows, claims.judge(rows)


def test_a_greedy_soup_of_one_ingredient_is_reported_as_such_not_as_a_failed_test():
  rows, judged = _one_ingredient("improves", greedy_soup=["model_1"])
  by_claim = {c["claim"]: c for c in judged}
  for key in ("greedy_in_distribution", "greedy_under_shift", "greedy_close_to_ensemble"):
    assert by_claim[key]["verdict"] == claims.NOT_APPLICABLE
    assert by_claim[key]["evidence"].startswith(
        "one ingredient: the greedy soup is the best individual model; nothing was averaged")
  assert "+0.00" not in by_claim["greedy_in_distribution"]["evidence"]
  assert by_claim["uniform_falls_behind"]["verdict"] != claims.NOT_APPLICABLE  # Three in it.
  md = rep.render_markdown(rep.build_report(rows))
  assert ("- **The greedy soup beats the best individual model in distribution: not "
          "applicable.** one ingredient: the greedy soup is the best individual model; nothing "
          "was averaged.") in md
  assert "| Greedy soup (one ingredient) | +0.00 [+0.00, +0.00]" in md
  assert "in distribution: not held" not in md


def test_a_uniform_soup_and_an_ensemble_of_one_model_are_not_judged():
  rows, judged = _one_ingredient("improves", uniform_soup=["model_1"], ensemble=["model_1"])
  by_claim = {c["claim"]: c for c in judged}
  assert by_claim["uniform_falls_behind"]["verdict"] == claims.NOT_APPLICABLE
  assert by_claim["uniform_falls_behind"]["evidence"] == (
      "one ingredient: the uniform soup is the best individual model; nothing was averaged")
  ensemble = by_claim["greedy_close_to_ensemble"]
  assert ensemble["verdict"] == claims.NOT_APPLICABLE
  assert ensemble["evidence"].startswith(
      "one ingredient: the ensemble is the best individual model; nothing was ensembled; "
      "greedy soup minus ensemble on test: ")
  # The greedy soup of two fine-tunes is still judged.
  assert by_claim["greedy_in_distribution"]["verdict"] in (claims.HELD, claims.NOT_HELD,
                                                           claims.OPEN)


def test_a_soup_of_model_0_alone_is_not_compared_with_model_0():
  rows, judged = _one_ingredient("init_wins", greedy_soup=["model_0"])
  by_claim = {(c.get("soup"), c["claim"]): c for c in judged}
  for key in ("best_of_all_in_distribution", "best_of_all_under_shift"):
    claim = by_claim[("greedy_soup", key)]
    assert claim["verdict"] == claims.NOT_APPLICABLE
    assert claim["evidence"] == ("one ingredient: the greedy soup is one model, `model_0`; "
                                 "nothing was averaged")
  # Against the best individual it is still one model, not a soup; its difference is shown.
  greedy = by_claim[(None, "greedy_in_distribution")]
  assert greedy["verdict"] == claims.NOT_APPLICABLE
  assert "one model, `model_0`" in greedy["evidence"] and "+7.50 points" in greedy["evidence"]
  # The uniform soup of three models keeps its verdict.
  assert by_claim[("uniform_soup", "best_of_all_in_distribution")]["verdict"] == claims.NOT_HELD


def test_claims_over_seeds_count_the_seeds_where_the_greedy_soup_kept_one_ingredient():
  runs = {0: _one_ingredient("improves", greedy_soup=["model_1"])[0],
          1: _judged("improves")[0], 2: _judged("improves")[0]}
  agg = aggregate.aggregate(runs)
  by_claim = {c["claim"]: c for c in agg["claims"]}
  for key in ("greedy_in_distribution", "greedy_under_shift", "greedy_close_to_ensemble"):
    assert by_claim[key]["evidence"].endswith(
        "in 1 of 3 seeds (0) the greedy soup kept one ingredient: there nothing was averaged")


def test_claims_over_seeds_are_not_applicable_when_every_greedy_soup_kept_one_ingredient():
  # Per run a one-ingredient greedy soup is "not applicable"; over seeds, so is a claim whose
  # every seed kept one (its differences, all +0.00 here, stay in the evidence). One seed that
  # averaged two makes the claims judged again (the test above).
  runs = {seed: _one_ingredient("improves", greedy_soup=["model_1"])[0] for seed in (0, 1, 2)}
  by_claim = {c["claim"]: c for c in aggregate.aggregate(runs)["claims"]}
  for key in ("greedy_in_distribution", "greedy_under_shift", "greedy_close_to_ensemble"):
    assert by_claim[key]["verdict"] == claims.NOT_APPLICABLE, by_claim[key]
    assert by_claim[key]["evidence"].endswith(
        "in 3 of 3 seeds (0, 1, 2) the greedy soup kept one ingredient: there nothing was "
        "averaged")
  assert "per seed: +0.00, +0.00, +0.00" in by_claim["greedy_in_distribution"]["evidence"]
  assert by_claim["fine_tuning_improves"]["verdict"] != claims.NOT_APPLICABLE
  mixed = {0: runs[0], 1: _judged("improves")[0], 2: _judged("improves")[0]}
  by_claim = {c["claim"]: c for c in aggregate.aggregate(mixed)["claims"]}
  assert by_claim["greedy_in_distribution"]["verdict"] != claims.NOT_APPLICABLE
