r"""A finished workdir against the paper's released results, model by model and soup by soup.

  python -m soup.compare_official --workdir=W [--released=tests/data/paper] [--tolerance=0.1]

Reads W/results.jsonl (written by the report stage) and the released
individual_model_results.jsonl, uniform_soup_results.jsonl, greedy_soup_results.jsonl and
ensemble_results.jsonl. For every row both have (model_0..model_71, uniform_soup, greedy_soup,
ensemble, and best_individual: the released model with the best ImageNet2p, model_43) and every
split both have a number for, it prints our accuracy, theirs and the difference in points, and
flags a difference over the tolerance (0.1 point). It also flags soups whose ingredient counts
differ from the release's (uniform: all 72 models; greedy: 5, the paper's count) and warns when
the held-out list is not the official one (the greedy soup and best_individual are chosen on it).
Exit status: 0 nothing flagged, 1 something flagged, 2 a missing or unreadable file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from soup import layout, recipes, results
from soup.recipes import Name

PAPER_DIR = Path(__file__).resolve().parents[1] / "tests" / "data" / "paper"
RELEASED_FILES = ("individual_model_results.jsonl", "uniform_soup_results.jsonl",
                  "greedy_soup_results.jsonl", "ensemble_results.jsonl")
TOLERANCE_POINTS = 0.1
COLUMNS = (*results.IMAGENET.all, "avg_shifts")
# The paper's greedy soup took 5 of the 72 models (its section 3); the files do not list them.
RELEASED_GREEDY_INGREDIENTS = 5


@dataclasses.dataclass
class Difference:
  row: str
  column: str
  ours: float
  released: float

  @property
  def points(self) -> float:
    return 100 * (self.ours - self.released)


@dataclasses.dataclass
class Comparison:
  differences: list[Difference]
  ingredient_flags: list[str]      # Soups made of other ingredients than the release's.
  warnings: list[str]
  missing: list[str]               # Released rows the workdir lacks.
  tolerance: float = TOLERANCE_POINTS

  @property
  def flagged(self) -> list[Difference]:
    # Rounded: an accuracy stored as a fraction carries float noise at the 1e-14 point level.
    return [d for d in self.differences if round(abs(d.points), 9) > self.tolerance]

  @property
  def ok(self) -> bool:
    return not self.flagged and not self.ingredient_flags

  def markdown(self) -> str:
    rows = list(dict.fromkeys(d.row for d in self.differences))
    columns = [c for c in COLUMNS if any(d.column == c for d in self.differences)]
    cell = {(d.row, d.column): d for d in self.differences}
    flagged = {(d.row, d.column) for d in self.flagged}
    lines = [f"Ours against the released results: accuracy % (ours - released, points); "
             f"'!' marks a difference over {self.tolerance:g} point.", "",
             "| row | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for r in rows:
      cells = []
      for c in columns:
        d = cell.get((r, c))
        cells.append("" if d is None else f"{100 * d.ours:.2f} ({d.points:+.2f})"
                     + (" !" if (r, c) in flagged else ""))
      lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"{len(self.differences) - len(self.flagged)} of {len(self.differences)} "
                 f"comparisons within {self.tolerance:g} point; {len(self.flagged)} flagged"
                 + (": " + _listed([f"{d.row} {d.column} {d.points:+.2f}" for d in self.flagged])
                    if self.flagged else "."))
    lines += [f"FLAG: {f}" for f in self.ingredient_flags]
    lines += [f"WARNING: {w}" for w in self.warnings]
    if self.missing:
      lines.append(f"not in the workdir ({len(self.missing)}): {_listed(self.missing)}")
    return "\n".join(lines)


def _listed(items: Sequence[str], limit: int = 12) -> str:
  return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit
                                     else "")


def _model_number(name: str) -> int:
  """k of model_<k>: the release's members in numeric order (model_2 before model_10)."""
  return int(name[len(layout.MEMBER_PREFIX):])


def released_rows(paper_dir: str | Path = PAPER_DIR) -> dict[str, dict]:
  """The released rows by name, plus best_individual: the model with the best ImageNet2p."""
  rows = {}
  for name in RELEASED_FILES:
    for row in results.read(Path(paper_dir) / name, recipes.infer_recipe):
      rows[row["model_name"]] = row
  models = [r for n, r in rows.items() if n.startswith(layout.MEMBER_PREFIX)]
  best = max(models, key=lambda r: r[results.IMAGENET.held_out])
  rows[Name.BEST_INDIVIDUAL] = {**best, "model_name": Name.BEST_INDIVIDUAL,
                             "selected": best["model_name"]}
  return rows


def read_ours(path: Path) -> list[dict]:
  """results.jsonl rows; any subset of the splits may be there."""
  rows = []
  for number, line in enumerate(path.read_text().splitlines(), start=1):
    if line.strip():
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise results.ResultsError(f"{path}:{number}: not a JSON line ({e.msg}).") from e
      if not isinstance(row, dict) or not isinstance(row.get("model_name"), str):
        raise results.ResultsError(f"{path}:{number}: a row needs a \"model_name\" string.")
      rows.append(row)
  return rows


def _number(value) -> Optional[float]:
  return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def compare(ours: Sequence[dict], released: dict[str, dict],
            tolerance: float = TOLERANCE_POINTS) -> Comparison:
  mine = {r["model_name"]: r for r in ours}
  differences, flags, warnings = [], [], []
  for name, theirs in released.items():
    row = mine.get(name)
    if row is None:
      continue
    for column in COLUMNS:
      a, b = _number(row.get(column)), _number(theirs.get(column))
      if a is not None and b is not None:
        differences.append(Difference(name, column, a, b))
  models = sorted((n for n in released if n.startswith(layout.MEMBER_PREFIX)), key=_model_number)
  uniform = mine.get(Name.UNIFORM_SOUP)
  if uniform is not None and len(uniform.get("ingredients", [])) != len(models):
    absent = sorted(set(models) - set(uniform.get("ingredients", [])), key=_model_number)
    flags.append(f"uniform_soup has {len(uniform.get('ingredients', []))} ingredients, the "
                 f"release's all {len(models)}" + (f" (without {_listed(absent)})" if absent
                                                   else ""))
  greedy = mine.get(Name.GREEDY_SOUP)
  if greedy is not None and len(greedy.get("ingredients", [])) != RELEASED_GREEDY_INGREDIENTS:
    flags.append(f"greedy_soup took {len(greedy.get('ingredients', []))} ingredients "
                 f"({', '.join(greedy.get('ingredients', []))}); the paper's took "
                 f"{RELEASED_GREEDY_INGREDIENTS}")
  best = mine.get(Name.BEST_INDIVIDUAL)
  if best is not None and best.get("selected") not in (None, released[Name.BEST_INDIVIDUAL]
                                                        ["selected"]):
    flags.append(f"best_individual selected {best['selected']}; the release's best on "
                 f"ImageNet2p is {released[Name.BEST_INDIVIDUAL]['selected']}")
  lists = sorted({str(r["heldout_list"]) for r in ours if "heldout_list" in r})
  if lists and lists != ["official"]:
    warnings.append(f"the held-out list is {'/'.join(lists)}, not the official one: ImageNet2p "
                    "differs, and so may the greedy soup and best_individual. Make it with "
                    "scripts/make_imagenet_heldout.py --official_mask=imagenet_98_idxs.npy.")
  missing = [n for n in released if n not in mine]
  return Comparison(differences, flags, warnings, missing, tolerance)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="A finished workdir (has results.jsonl).")
  parser.add_argument("--released", default=str(PAPER_DIR),
                      help="Folder of the released *_results.jsonl files.")
  parser.add_argument("--tolerance", type=float, default=TOLERANCE_POINTS,
                      help="Flag differences over this many points.")
  args = parser.parse_args(argv)
  path = Path(args.workdir) / layout.RESULTS
  try:
    if not path.is_file():
      raise FileNotFoundError(f"{path} does not exist: run the report stage first "
                              "(python -m soup.main ... --config.stages=evaluate,soups,report).")
    comparison = compare(read_ours(path), released_rows(args.released), args.tolerance)
  except (OSError, results.ResultsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(comparison.markdown())
  return 0 if comparison.ok else 1


if __name__ == "__main__":
  sys.exit(main())
