"""Do two fine-tunes average above the mean of their accuracies? From the greedy soup's trials.

  python experiments/pair_midpoints.py experiments/fashion_mnist_seeds experiments/ablation_low_lr

For each seed of each run folder, every candidate the greedy soup tried while it still held
one model is a pair (the best model and that candidate), and its `greedy_history` has the
held-out accuracy of their average. Prints, per run, the pair's accuracy minus the mean of the
two members' held-out accuracies (points): above 0, the two average inside one convex basin,
as the paper's fine-tunes do; near 0, the average only interpolates. Also the gap between the
best and the second-best member on held-out, per seed.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def run_pairs(root: Path) -> tuple[list[float], list[float]]:
  """(pair minus midpoint, best minus second-best member) in accuracy fractions."""
  gaps, leads = [], []
  for path in sorted(root.glob("seed_*/results.jsonl")):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    held = next(k for k in rows[0] if k.endswith("HeldOut") or k == "ImageNet2p")
    accuracy = {r["model_name"]: r[held] for r in rows
                if r.get("recipe") in ("individual", "initialization")}
    greedy = [r for r in rows if r["model_name"] == "greedy_soup"][-1]
    history = greedy["greedy_history"]
    first = history[0]["name"]
    for trial in history[1:]:
      if trial["accepted"]:  # From here on the soup holds more than one model.
        break
      gaps.append(trial["held_out"] - (accuracy[first] + accuracy[trial["name"]]) / 2)
    members = sorted((a for n, a in accuracy.items() if n != "model_0"), reverse=True)
    leads.append(members[0] - members[1])
  return gaps, leads


def main(roots: list[str]) -> int:
  for root in roots:
    gaps, leads = run_pairs(Path(root))
    if not gaps:
      print(f"{root}: no pair tried")
      continue
    print(f"{root}: {len(gaps)} pairs, pair minus midpoint {100 * statistics.mean(gaps):+.2f} "
          f"points on average (min {100 * min(gaps):+.2f}, max {100 * max(gaps):+.2f}), "
          f"{sum(g > 0 for g in gaps)} of {len(gaps)} above; best minus second-best member per "
          "seed: " + ", ".join(f"{100 * x:.2f}" for x in leads))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
