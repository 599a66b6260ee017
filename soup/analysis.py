"""The paper's analysis figures, from any model's parameters and an evaluation function.

- The error landscape (the paper's Figure 2): held-out error on the plane
  through the initialization and two fine-tuned solutions, as a contour plot
  with the three points and the fine-tunes' midpoint marked. Fine-tunes that
  share a basin have a lower error between them than at either end: why
  averaging works. The colour levels are dense where the models are, so that
  a basin a fraction of a point deep shows.
- Accuracy as ingredients are added: held-out and test accuracy of the greedy
  and the uniform soup of the first k ingredients, in the greedy soup's order
  (decreasing held-out accuracy, its tie order). The uniform soup falls when runs
  from outside the basin join; the greedy soup never loses held-out accuracy.

Nothing here knows the model: parameters are pytrees of arrays, and the caller
passes the accuracy functions (params -> fraction correct). Outputs are plain
dicts (written as JSON) and PNGs.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from soup import atomic_io
from soup.soups import average, greedy

PyTree = Any
AccuracyFn = Callable[[PyTree], float]


def _ravel(params: PyTree):
  import jax
  from jax.flatten_util import ravel_pytree
  flat, unravel = ravel_pytree(jax.tree.map(lambda x: np.asarray(x, np.float32), params))
  return np.asarray(flat, np.float64), unravel


def plane_coordinates(origin: np.ndarray, a: np.ndarray, b: np.ndarray):
  """Orthonormal basis (e1 along a - origin) of the plane of three points; their 2-D coordinates."""
  da, db = a - origin, b - origin
  norm_a = np.linalg.norm(da)
  if norm_a == 0:
    raise ValueError("The first fine-tune equals the initialization: no plane to draw.")
  e1 = da / norm_a
  rest = db - (db @ e1) * e1
  norm_rest = np.linalg.norm(rest)
  if norm_rest <= 1e-9 * max(np.linalg.norm(db), 1e-30):
    raise ValueError("The three models are collinear: no plane to draw.")
  e2 = rest / norm_rest
  coords = np.array([[0.0, 0.0], [norm_a, 0.0], [db @ e1, norm_rest]])
  return e1, e2, coords


def first_plane(init: PyTree, ranked: Sequence[str], load: Callable[[str], PyTree]):
  """The first pair (a, b) of `ranked` fine-tunes that spans a plane with init, or None.

  Pairs are tried in rank order ((1, 2), (1, 3), ..., (2, 3), ...): a fine-tune equal to
  the initialization, or a copy of a better-ranked one, is passed over.
  """
  origin, _ = _ravel(init)
  flat = functools.lru_cache(maxsize=None)(lambda name: _ravel(load(name))[0])
  for i, a in enumerate(ranked):
    for b in ranked[i + 1:]:
      try:
        plane_coordinates(origin, flat(a), flat(b))
      except ValueError:
        continue
      return a, b
  return None


def error_landscape(init: PyTree, finetune_a: PyTree, finetune_b: PyTree,
                    held_out_accuracy: AccuracyFn, grid: int = 7, margin: float = 0.25,
                    names: Sequence[str] = ("init", "fine-tune A", "fine-tune B"),
                    ) -> dict:
  """Held-out error on a grid x grid lattice of the plane through the three models."""
  if grid < 2:
    raise ValueError(f"The landscape grid needs at least 2 points per side, got {grid}.")
  origin, unravel = _ravel(init)
  a, _ = _ravel(finetune_a)
  b, _ = _ravel(finetune_b)
  e1, e2, coords = plane_coordinates(origin, a, b)
  lo, hi = coords.min(axis=0), coords.max(axis=0)
  pad = margin * (hi - lo).max()
  xs = np.linspace(lo[0] - pad, hi[0] + pad, grid)
  ys = np.linspace(lo[1] - pad, hi[1] + pad, grid)
  error = np.empty((grid, grid))
  for j, y in enumerate(ys):
    for i, x in enumerate(xs):
      point = (origin + x * e1 + y * e2).astype(np.float32)
      error[j, i] = 1.0 - held_out_accuracy(unravel(point))
  points = {name: [float(c) for c in xy] for name, xy in zip(names, coords)}
  point_error = {name: 1.0 - held_out_accuracy(p)
                 for name, p in zip(names, (init, finetune_a, finetune_b))}
  # The uniform soup of the two fine-tunes: inside a shared basin it beats both.
  midpoint = {"xy": [float(c) for c in (coords[1] + coords[2]) / 2],
              "error": 1.0 - held_out_accuracy(unravel(((a + b) / 2).astype(np.float32)))}
  return {"xs": xs.tolist(), "ys": ys.tolist(), "error": error.tolist(), "points": points,
          "point_error": point_error, "midpoint": midpoint}


def ingredient_curves(names: Sequence[str], held_out_scores: dict[str, float],
                      sources: Mapping[str, Any], held_out_accuracy: AccuracyFn,
                      test_accuracy: AccuracyFn, comparison: str = ">",
                      tie_order: str = "reversed",
                      layout: Optional[average.Layout] = None,
                      greedy_history: Optional[Sequence[dict]] = None,
                      test_scores: Optional[Mapping[str, float]] = None) -> dict:
  """Greedy and uniform soups of the first k ingredients (the greedy order), k = 1..N.

  The greedy soup's order and choices are soup/soups/greedy.py's own (`ranked` with
  `tie_order`, `greedy_select` with `comparison`), so the last greedy point is the
  greedy soup. Both soups are the one averager's running means (soup/soups/average.py)
  in `layout`, fed one read of each ingredient. Test accuracy is measured only when a
  soup changes.

  Measured already, not again: `greedy_history`, the greedy soup's own (GreedyResult's,
  over these names and settings), gives each candidate's held-out score (the same soup,
  bit for bit); `test_scores[name]`, an ingredient's test score, is the first soup's.
  """
  order = greedy.ranked({n: held_out_scores[n] for n in names}, tie_order)
  opened = dict(zip(order, average.open_sources([sources[n] for n in order])))
  first = opened[order[0]]
  layout = layout or average.Layout.host()
  uniform = average.RunningMean(layout, first.specs)
  greedy_mean = average.RunningMean(layout, first.specs)
  as_params = lambda home: average.as_tree(uniform.output(home), first)  # noqa: E731
  out = {"order": order, "uniform_held_out": [], "uniform_test": [], "greedy_held_out": [],
         "greedy_test": [], "greedy_ingredients": []}
  state: dict[str, Any] = {}
  known = {h["name"]: float(h["held_out"]) for h in greedy_history or ()}
  if greedy_history is not None and [h["name"] for h in greedy_history] != order:
    raise ValueError("greedy_history is another greedy run's (its order differs from "
                     f"{order}); pass the greedy soup's own history or none.")

  def add_to_uniform(name):
    x = uniform.reader.read(opened[name], reuse=False)  # One read feeds both soups.
    uniform.add(x)
    soup = as_params(uniform.mean)
    alone = name == order[0]  # The soup of one ingredient is that ingredient, bit for bit.
    out["uniform_held_out"].append(held_out_scores[name] if alone else held_out_accuracy(soup))
    out["uniform_test"].append(test_scores[name] if alone and test_scores
                               else test_accuracy(soup))
    return x

  def try_candidate(name):
    state["candidate"] = None  # The rejected one is freed before the next is built.
    state["candidate"] = greedy_mean.candidate(add_to_uniform(name))
    if name in known:
      return known[name]
    return float(held_out_accuracy(as_params(state["candidate"])))

  accepted_test = []

  def accept(name):
    greedy_mean.accept(state["candidate"])
    accepted_test.append(test_accuracy(as_params(greedy_mean.mean)))

  greedy_mean.add(add_to_uniform(order[0]))
  _, _, history = greedy.greedy_select(order, float(held_out_scores[order[0]]), try_candidate,
                                       accept, comparison, "ingredient curves")
  members, held, test_now, test = [], None, None, iter([out["uniform_test"][0], *accepted_test])
  for step in history:
    if step["accepted"]:
      members, held, test_now = members + [step["name"]], step["held_out"], next(test)
    out["greedy_held_out"].append(held)
    out["greedy_test"].append(test_now)
    out["greedy_ingredients"].append(list(members))
  return out


def landscape_levels(grid_error: np.ndarray, model_errors: Sequence[float],
                     bands: int = 12) -> np.ndarray:
  """Contour levels of error in percent, dense where the models are.

  Geometric from just below the lowest error (models' or grid's: the basin floor) to
  twice the worst model's (100 at most), plus a level between each two neighbouring model errors, so
  that models a fraction of a point apart sit in different bands. Errors above the top
  level share one colour (the plot's extend="max").
  """
  models = np.sort(np.asarray(model_errors, np.float64))
  floor = min(float(np.min(grid_error)), float(models[0]))
  low = 0.95 * floor if floor > 0 else 1e-3 * max(float(models[-1]), 1e-6)
  high = max(min(2 * float(models[-1]), 100.0), 1.05 * low)
  geometric = low * (high / low) ** np.linspace(0, 1, bands + 1)
  between = (models[1:] + models[:-1]) / 2
  levels = np.unique(np.concatenate([geometric, between[models[1:] > models[:-1]]]))
  return levels[np.concatenate([[True], np.diff(levels) > 1e-9 * high])]


def plot_landscape(landscape: dict, path: str | Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.colors
  import matplotlib.pyplot as plt

  xs, ys = np.array(landscape["xs"]), np.array(landscape["ys"])
  error = 100 * np.array(landscape["error"])
  levels = landscape_levels(error, [100 * e for e in landscape["point_error"].values()])
  cmap = plt.get_cmap("viridis_r")
  # One colour per band however narrow (a linear norm would give close bands one colour).
  norm = matplotlib.colors.BoundaryNorm(levels, cmap.N, extend="max")
  fig, ax = plt.subplots(figsize=(6.2, 5))
  filled = ax.contourf(xs, ys, error, levels=levels, cmap=cmap, norm=norm, extend="max")
  ax.contour(xs, ys, error, levels=levels, colors="k", linewidths=0.3, alpha=0.5)
  fig.colorbar(filled, ax=ax, label="held-out error (%)", format="%.1f")
  for (name, (x, y)), marker in zip(landscape["points"].items(), ("s", "o", "o")):
    err = 100 * landscape["point_error"][name]
    ax.scatter([x], [y], marker=marker, s=90, c="white", edgecolors="k", zorder=3)
    ax.annotate(f"{name}\n{err:.1f}%", (x, y), textcoords="offset points", xytext=(6, 6),
                fontsize=8, bbox=dict(boxstyle="round,pad=0.2", fc="white", alpha=0.8))
  if "midpoint" in landscape:
    (x, y), err = landscape["midpoint"]["xy"], 100 * landscape["midpoint"]["error"]
    ax.scatter([x], [y], marker="X", s=90, c="white", edgecolors="k", zorder=3)
    ax.annotate(f"midpoint\n{err:.1f}%", (x, y), textcoords="offset points", xytext=(6, -22),
                fontsize=8, bbox=dict(boxstyle="round,pad=0.2", fc="white", alpha=0.8))
  ax.set_xlabel("along fine-tune A − initialization")
  ax.set_ylabel("orthogonal, towards fine-tune B")
  ax.set_title("Held-out error on the plane of the initialization\nand two fine-tunes", fontsize=10)
  ax.set_aspect("equal", adjustable="box")
  fig.tight_layout()
  atomic_io.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
  plt.close(fig)


def plot_ingredient_curves(curves: dict, path: str | Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  k = np.arange(1, len(curves["order"]) + 1)
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
  for ax, split in zip(axes, ("held_out", "test")):
    ax.plot(k, 100 * np.array(curves[f"greedy_{split}"]), "-*", color="C4", label="Greedy soup")
    ax.plot(k, 100 * np.array(curves[f"uniform_{split}"]), "-o", color="C0", label="Uniform soup")
    ax.set_title(f"{split.replace('_', '-')} accuracy")
    ax.set_xlabel("ingredients considered (in decreasing held-out accuracy)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("accuracy (%)")
  axes[0].legend()
  fig.tight_layout()
  atomic_io.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
  plt.close(fig)
