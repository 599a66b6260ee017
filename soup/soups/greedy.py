"""Greedy soup (the paper's Recipe 1) and the shared greedy selection.

Sort candidates by held-out accuracy, best first; add a candidate only if the
held-out accuracy of the result improves. The official code compares with a
strict `>`, the paper's text with `>=`; `comparison` selects.

Ties in held-out accuracy: the official main.py (model-soups commit d5398f1,
lines 152-153) sorts the (name, accuracy) pairs ascending, a stable sort, then
reverses the list, so tied models come in reverse listed order ("reversed", the
default); "listed" keeps them in listed order. The released results tie model_4
and model_5 on ImageNet2p, so the official order tries model_5 first.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from typing import Any, Callable, Mapping, Optional, Sequence

from soup import memory
from soup.soups import average

log = logging.getLogger(__name__)

PyTree = Any
COMPARISONS = {">": operator.gt, ">=": operator.ge}


@dataclasses.dataclass
class GreedyResult:
  ingredients: list[str]          # Names kept, in the order they were added.
  held_out: float                 # Held-out accuracy of the final result.
  history: list[dict]             # One entry per candidate: name, score, accepted.
  result: Any = None              # The soup's params (or the ensemble's logits).


TIE_ORDERS = ("reversed", "listed")


def ranked(held_out_scores: Mapping[str, float], tie_order: str = "reversed") -> list[str]:
  """Names sorted by held-out accuracy, best first; ties per `tie_order` (module docstring)."""
  names = list(held_out_scores)
  if tie_order == "listed":
    return sorted(names, key=lambda n: -held_out_scores[n])
  if tie_order == "reversed":  # Exactly the official code: ascending, then reversed.
    return sorted(names, key=lambda n: held_out_scores[n])[::-1]
  raise ValueError(f"greedy tie_order must be one of {TIE_ORDERS}, got {tie_order!r}.")


def greedy_select(order: Sequence[str], first_score: float,
                  try_candidate: Callable[[str], float], accept: Callable[[str], None],
                  comparison: str = ">", log_prefix: str = "greedy"
                  ) -> tuple[list[str], float, list[dict]]:
  """The greedy loop shared by greedy soups and greedy ensembles.

  `try_candidate(name)` scores the current selection plus `name` on held-out;
  `accept(name)` commits that candidate.
  """
  if comparison not in COMPARISONS:
    raise ValueError(f"comparison must be one of {list(COMPARISONS)}, got {comparison!r}.")
  better = COMPARISONS[comparison]
  selected, best = [order[0]], first_score
  history = [{"name": order[0], "held_out": first_score, "accepted": True}]
  for name in order[1:]:
    score = try_candidate(name)
    accepted = bool(better(score, best))
    history.append({"name": name, "held_out": score, "accepted": accepted})
    log.info("%s: %s -> held-out %.4f (best %.4f) %s", log_prefix, name, score, best,
                 "added" if accepted else "skipped")
    if accepted:
      accept(name)
      selected.append(name)
      best = score
  return selected, best, history


def greedy_soup(ingredients: Mapping[str, average.Source], held_out_scores: Mapping[str, float],
                evaluate: Callable[[PyTree], float], comparison: str = ">",
                verify: bool = True, tie_order: str = "reversed",
                layout: Optional[average.Layout] = None) -> GreedyResult:
  """Greedy soup over params or checkpoint paths, its running mean in `layout` (host by
  default; soup/soups/average.py).

  Holds the running mean and one candidate soup; each candidate is read into the layout
  (a process reads only its devices' parts) and added without committing. Each step
  costs one held-out evaluation, during which the kernel reads the next candidate's
  files ahead. `held_out_scores[name]` must be the held-out accuracy of that ingredient
  alone under `evaluate`, which receives params in the layout's evaluation form.
  """
  order = ranked({n: held_out_scores[n] for n in ingredients}, tie_order)
  opened = dict(zip(order, average.open_sources([ingredients[n] for n in order], verify)))
  first = opened[order[0]]
  mean = average.RunningMean(layout or average.Layout.host(), first.specs)
  mean.add(first)
  following = dict(zip(order, order[1:]))
  state = {"candidate": None}

  def try_candidate(name):
    state["candidate"] = None  # A rejected candidate: freed before the next is built,
    memory.release_free_memory()  # and its pages returned (glibc keeps them otherwise).
    state["candidate"] = mean.candidate(opened[name])
    if name in following:
      opened[following[name]].prefetch()
    return float(evaluate(average.as_tree(mean.output(state["candidate"]), first)))

  def accept(name):
    mean.accept(state["candidate"])

  selected, best, history = greedy_select(order, float(held_out_scores[order[0]]),
                                          try_candidate, accept, comparison, "greedy soup")
  return GreedyResult(selected, best, history, average.as_tree(mean.output(), first))
