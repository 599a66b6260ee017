"""The paper's four claims, judged on one run (paired bootstrap) or over seeds.

Each claim is held, not held, or not resolved at this sample size, from a 95%
interval of a paired accuracy difference:
  1. the greedy soup beats the best individual in distribution (test);
  2. it beats it under shift (the shift average);
  3. the uniform soup falls behind the best individual (test) when some runs
     leave the basin: a run "left the basin" if its held-out accuracy is below
     the initialization's, or it diverged and was excluded;
  4. the greedy soup comes close to the ensemble of all models at 1/N of the
     inference cost: "close" is within CLOSE_POINTS on test.
One run's intervals come from soup/stats.py (rows carry them, see
`add_intervals`); over seeds, from the Student-t interval of the per-seed
differences.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from soup import stats

CLOSE_POINTS = 1.0  # Claim 4: greedy soup within this many accuracy points of the ensemble.
HELD, NOT_HELD, OPEN = "held", "not held", "not resolved at this sample size"
CLAIMS = {
    "greedy_in_distribution": "The greedy soup beats the best individual model in distribution",
    "greedy_under_shift": "The greedy soup beats the best individual model under shift",
    "uniform_falls_behind": "The uniform soup falls behind when some runs leave the basin",
    "greedy_close_to_ensemble": "The greedy soup comes close to the ensemble at 1/N of the "
                                "inference cost",
}


# --- Intervals stored in the rows -------------------------------------------


def add_intervals(rows: list[dict], correct: Mapping[str, Mapping[str, np.ndarray]],
                  columns, seed: int = 0, num_resamples: int = stats.NUM_RESAMPLES) -> None:
  """Adds paired bootstrap intervals to every row that has per-example correctness.

  `correct[model_name][column]` is a bool vector. Each row gets
  `vs_best_individual` = {"test": interval, "avg_shifts": interval} (fractions);
  the greedy soup also gets `vs_ensemble`. Missing partners leave rows as they are.
  """
  by_name = {r["model_name"]: r for r in rows}
  best = by_name.get("best_individual")
  best_name = best.get("selected", "best_individual") if best else None

  def compare(a: str, b: str) -> dict:
    test = stats.paired_bootstrap(correct[a][columns.test], correct[b][columns.test],
                                  num_resamples=num_resamples, seed=seed)
    shifts = stats.paired_bootstrap_average(
        {c: correct[a][c] for c in columns.shifts}, {c: correct[b][c] for c in columns.shifts},
        num_resamples=num_resamples, seed=seed)
    return {"test": test.as_dict(), "avg_shifts": shifts.as_dict(),
            "resamples": num_resamples, "against": b}

  reference = best_name if best_name in correct else (
      "best_individual" if "best_individual" in correct else None)
  if reference is not None:
    for row in rows:
      if row["model_name"] in correct:
        row["vs_best_individual"] = compare(row["model_name"], reference)
  if "greedy_soup" in correct and "ensemble" in correct and "greedy_soup" in by_name:
    by_name["greedy_soup"]["vs_ensemble"] = compare("greedy_soup", "ensemble")


# --- Verdicts ----------------------------------------------------------------


def verdict(low: float, high: float, threshold: float = 0.0) -> str:
  """held if the interval is above threshold, not held if below, else not resolved.

  A zero-width interval at the threshold (the same model, as when the greedy soup
  is the best individual alone) is not held: nothing is left to resolve.
  """
  if low > threshold:
    return HELD
  if high < threshold or low == high == threshold:
    return NOT_HELD
  return OPEN


def left_basin(rows: Sequence[dict]) -> tuple[int, int]:
  """(runs that left the basin, fine-tuned runs), from the models' held-out accuracy."""
  init = next((r for r in rows if r.get("recipe") == "initialization"), None)
  members = [r for r in rows if r.get("recipe") == "individual"]
  excluded = set()
  for r in rows:
    excluded |= set((r.get("excluded") or {}).keys())
  if init is None:
    return len(excluded), len(members) + len(excluded)
  held_col = next(k for k in init if k.endswith("HeldOut") or k == "ImageNet2p")
  below = sum(r[held_col] < init[held_col] for r in members)
  return below + len(excluded - {"model_0"}), len(members) + len(excluded - {"model_0"})


def _fmt(interval: dict) -> str:
  return (f"{100 * interval['diff']:+.2f} points [95% CI {100 * interval['low']:+.2f}, "
          f"{100 * interval['high']:+.2f}]")


def judge(rows: Sequence[dict]) -> list[dict]:
  """The four claims on one run's results rows (with intervals from add_intervals)."""
  by_name = {r["model_name"]: r for r in rows}
  greedy, uniform = by_name.get("greedy_soup"), by_name.get("uniform_soup")
  out = []

  def add(key: str, result: str, evidence: str):
    out.append({"claim": key, "text": CLAIMS[key], "verdict": result, "evidence": evidence})

  for key, metric, where in (("greedy_in_distribution", "test", "test"),
                             ("greedy_under_shift", "avg_shifts", "shift average")):
    ci = (greedy or {}).get("vs_best_individual", {}).get(metric)
    if ci is None:
      add(key, OPEN, "no greedy soup or best individual with intervals in these results")
    else:
      add(key, verdict(ci["low"], ci["high"]),
          f"greedy soup minus best individual on the {where}: {_fmt(ci)}")

  off, runs = left_basin(rows)
  ci = (uniform or {}).get("vs_best_individual", {}).get("test")
  if ci is None:
    add("uniform_falls_behind", OPEN, "no uniform soup with intervals in these results")
  elif off == 0:
    add("uniform_falls_behind", OPEN,
        f"no run left the basin (0 of {runs} below the initialization's held-out accuracy); "
        f"uniform soup minus best individual on test: {_fmt(ci)}")
  else:
    add("uniform_falls_behind", verdict(-ci["high"], -ci["low"]),
        f"{off} of {runs} runs left the basin (held-out accuracy below the initialization's "
        f"or diverged); uniform soup minus best individual on test: {_fmt(ci)}")

  ci = (greedy or {}).get("vs_ensemble", {}).get("test")
  ensemble = by_name.get("ensemble")
  if ci is None or ensemble is None:
    add("greedy_close_to_ensemble", OPEN, "no greedy soup and ensemble with intervals")
  else:
    n = ensemble.get("inference_cost") or len(ensemble.get("ingredients") or [])
    add("greedy_close_to_ensemble", verdict(ci["low"], ci["high"], -CLOSE_POINTS / 100),
        f"greedy soup minus ensemble on test: {_fmt(ci)}, at 1 forward pass against {n}; "
        f"'close' is within {CLOSE_POINTS:g} point")
  return out


def judge_over_seeds(tables: Mapping[int, Mapping[str, dict]],
                     rows_by_seed: Mapping[int, Sequence[dict]]) -> list[dict]:
  """The claims from per-seed differences: the Student-t interval of their mean.

  `tables[seed][recipe]` is the report's chosen row (held_out, test, avg_shifts).
  """
  out = []

  def diffs(a: str, b: str, metric: str) -> list[float]:
    return [t[a][metric] - t[b][metric] for t in tables.values() if a in t and b in t]

  def add(key, values, threshold=0.0, flip=False, note=""):
    if len(values) < 2:
      out.append({"claim": key, "text": CLAIMS[key], "verdict": OPEN,
                  "evidence": f"{len(values)} seed(s): an interval over seeds needs 2 or more"})
      return
    s = stats.mean_interval(values)
    low, high = (-s["high"], -s["low"]) if flip else (s["low"], s["high"])
    out.append({"claim": key, "text": CLAIMS[key],
                "verdict": verdict(low, high, -threshold if flip else threshold),
                "evidence": note + f"mean {100 * s['mean']:+.2f} points over {s['n']} seeds "
                            f"(std {100 * s['std']:.2f}) [95% CI {100 * s['low']:+.2f}, "
                            f"{100 * s['high']:+.2f}]; per seed: "
                            + ", ".join(f"{100 * v:+.2f}" for v in values)})

  add("greedy_in_distribution", diffs("greedy_soup", "best_individual", "test"),
      note="greedy soup minus best individual on test: ")
  add("greedy_under_shift", diffs("greedy_soup", "best_individual", "avg_shifts"),
      note="greedy soup minus best individual on the shift average: ")
  basin = [left_basin(rows) for rows in rows_by_seed.values()]
  left = sum(off > 0 for off, _ in basin)
  note = (f"runs that left the basin per seed: {', '.join(f'{o}/{n}' for o, n in basin)}; "
          "uniform soup minus best individual on test: ")
  if left == 0:
    out.append({"claim": "uniform_falls_behind", "text": CLAIMS["uniform_falls_behind"],
                "verdict": OPEN, "evidence": note.split(";")[0] + ": no run left the basin"})
  else:
    add("uniform_falls_behind", diffs("uniform_soup", "best_individual", "test"), flip=True,
        note=note)
  add("greedy_close_to_ensemble", diffs("greedy_soup", "ensemble", "test"),
      threshold=-CLOSE_POINTS / 100,
      note=f"greedy soup minus ensemble on test ('close': within {CLOSE_POINTS:g} point): ")
  return out


def render(claims: Sequence[dict], heading: str = "## The paper's claims") -> list[str]:
  lines = [heading, ""]
  for c in claims:
    lines.append(f"- **{c['text']}: {c['verdict']}.** {c['evidence']}.")
  return lines + [""]
