"""Output-space baselines: the logit ensemble and the greedy ensemble.

Both cost N forward passes per image at inference, unlike a soup.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from soup.metrics import score
from soup.soups.greedy import GreedyResult, greedy_select, ranked


def logit_ensemble(logits: Sequence[np.ndarray]) -> np.ndarray:
  """The mean of the members' logits (the paper's ensemble)."""
  return np.mean(np.stack([np.asarray(member, np.float32) for member in logits]), axis=0)


def greedy_ensemble(held_out_logits: Mapping[str, np.ndarray], labels: np.ndarray,
                    held_out_scores: Optional[Mapping[str, float]] = None,
                    comparison: str = ">", tie_order: str = "reversed",
                    metric: str = "accuracy") -> GreedyResult:
  """The greedy procedure with members combined by averaging logits (same order as the soup's),
  on the held-out split's metric (soup.metrics.METRICS)."""
  if held_out_scores is None:
    held_out_scores = {n: score(metric, x, labels) for n, x in held_out_logits.items()}
  order = ranked({n: held_out_scores[n] for n in held_out_logits}, tie_order)
  state = {"sum": np.asarray(held_out_logits[order[0]], np.float64), "count": 1}

  def try_candidate(name):
    state["candidate"] = state["sum"] + held_out_logits[name]
    return score(metric, state["candidate"] / (state["count"] + 1), labels)

  def accept(name):
    state["sum"], state["count"] = state["candidate"], state["count"] + 1

  selected, best, history = greedy_select(order, float(held_out_scores[order[0]]), try_candidate,
                                          accept, comparison, "greedy ensemble")
  return GreedyResult(selected, best, history, (state["sum"] / state["count"]).astype(np.float32))
