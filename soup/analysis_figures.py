"""The report's analysis figures, cached: the error landscape and the soups-by-ingredients
curves (computed by soup/analysis.py), recomputed only when their inputs change.

analysis.json holds the figures' data under a key of the ingredients' fingerprints and
the settings; a rerun with the same key and the figures on disk reads it back.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from soup import analysis, atomic_io, metrics, recipes
from soup.ingredients import IngredientStore
from soup.layout import ANALYSIS, INGREDIENTS_FIGURE, INITIALIZATION, LANDSCAPE_FIGURE
from soup.resources import Resources
from soup.workdir import Workdir, content_key, eval_settings

log = logging.getLogger(__name__)

_FIGURES = {"Error landscape (held-out error on the plane of the initialization and two "
            "fine-tunes)": LANDSCAPE_FIGURE,
            "Greedy and uniform soups as ingredients are added": INGREDIENTS_FIGURE}


def build(config, wd: Workdir, res: Resources, store: IngredientStore,
          names: list[str], rows: list[dict]) -> dict[str, str]:
  """The error landscape and the soups-by-ingredients curves (soup/analysis.py), if enabled.

  Cached in analysis.json under the ingredients' fingerprints and the settings.
  Returns {figure title: file name} for the report's links.
  """
  cfg = config.get("report", {})
  if not cfg.get("analysis", False):
    return {}
  usable, _ = store.usable(names)
  if not config.soups.include_initialization:
    usable = [n for n in usable if n != INITIALIZATION]
  members = [n for n in usable if n != INITIALIZATION]
  figures = dict(_FIGURES)
  if len(members) < 2 or INITIALIZATION not in store.usable(names)[0]:
    log.warning("analysis figures need model_0 and two fine-tunes; skipped.")
    return {}
  settings = {k: cfg.get(k) for k in ("landscape_grid", "landscape_examples")}
  key = content_key({"settings": settings, "greedy": _greedy_settings(config),
                     "eval": eval_settings(config),
                     "ingredients": {n: wd.fingerprint_digest(wd.ingredient_dir(n))
                                     for n in usable}})
  cached = _cached(wd, key, figures)
  if cached is not None:
    return cached
  scores = {r["model_name"]: r[res.columns.held_out] for r in rows if r["model_name"] in usable}
  return _compute(config, wd, res, store, usable, members, scores, settings, key, figures, rows)


def _greedy_settings(config) -> dict:
  """The greedy soup's comparison and tie order (their recipe defaults when it is not run)."""
  return {"comparison": config.soups.get("greedy_comparison", ">"),
          "tie_order": config.soups.get("greedy_tie_order", "reversed")}


def _cached(wd: Workdir, key: str, figures: dict[str, str]):
  """The figures of analysis.json when its key matches and every figure is on disk."""
  path = wd.root / ANALYSIS
  if path.exists():
    cached = json.loads(path.read_text())
    written = cached.get("figures", figures)
    if cached.get("key") == key and all((wd.root / f).exists() for f in written.values()):
      return written
  return None


def _accuracy(res: Resources, split, batch_size: int, limit: int = 0):
  """params -> accuracy on `split` (its first `limit` examples when limit > 0)."""
  labels = split.labels[:limit] if limit else split.labels

  def fn(params):
    batches = split.iterate(batch_size)
    if limit:
      batches = (split.images[i:min(i + batch_size, limit)]
                 for i in range(0, limit, batch_size))
    logits = res.evaluator.logits_of_batches(params, batches)
    return metrics.accuracy(split.scored_logits(logits), labels)
  return fn


def _compute(config, wd: Workdir, res: Resources, store: IngredientStore, usable: list[str],
             members: list[str], scores: dict[str, Any], settings: dict, key: str,
             figures: dict[str, str], rows: list[dict]) -> dict[str, str]:
  splits = res.splits()
  held_split, test_split = splits[res.columns.held_out], splits[res.columns.test]
  bs = config.eval.batch_size
  t = time.time()
  # The two best fine-tunes that span a plane with model_0 (a duplicate does not).
  init = store.load(INITIALIZATION)
  pair = analysis.first_plane(init, sorted(members, key=lambda n: -scores[n]), store.load)
  limit = min(settings["landscape_examples"] or len(held_split), len(held_split))
  if held_split.images is None:
    limit = 0  # Streamed splits: the whole held-out split.
  landscape = None
  if pair is None:
    log.warning("analysis: no two fine-tunes span a plane with model_0 (identical or "
                "collinear weights); the error landscape is skipped.")
    figures = {k: v for k, v in figures.items() if v != LANDSCAPE_FIGURE}
  else:
    a, b = pair
    landscape = analysis.error_landscape(
        init, store.load(a), store.load(b), _accuracy(res, held_split, bs, limit),
        grid=settings["landscape_grid"], names=(f"{INITIALIZATION} (init)", a, b))
    analysis.plot_landscape(landscape, wd.root / LANDSCAPE_FIGURE)
  # The greedy soup's row already scored each candidate on held-out (the same soups), and
  # the rows score each model alone on test.
  greedy_row = next((r for r in rows if r.get("greedy_history")
                     and r.get("recipe") in recipes.of_kind(recipes.Kind.SOUP)
                     and r.get("ingredients_considered") == usable), None)
  test_scores = {r["model_name"]: r[res.columns.test] for r in rows
                 if r["model_name"] in usable}
  curves = analysis.ingredient_curves(
      usable, scores, {n: wd.ingredient_dir(n) for n in usable}, res.held_out_accuracy,
      _accuracy(res, test_split, bs), **_greedy_settings(config), layout=res.layout,
      greedy_history=greedy_row["greedy_history"] if greedy_row else None,
      test_scores=test_scores)
  analysis.plot_ingredient_curves(curves, wd.root / INGREDIENTS_FIGURE)
  atomic_io.atomic_write_text(wd.root / ANALYSIS,
                              json.dumps({"key": key, "figures": figures,
                                          "landscape": landscape,
                                          "landscape_examples": limit, "curves": curves,
                                          "seconds": round(time.time() - t, 1)}))
  log.info("analysis figures in %.1fs", time.time() - t)
  return figures
