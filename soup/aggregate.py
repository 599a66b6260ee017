r"""The experiment under several seeds, and its aggregate report.

    python -m soup.aggregate --config=configs/fashion_mnist.py --root=workdirs/seeds --seeds=3
    python -m soup.aggregate --root=workdirs/seeds --aggregate_only   # tables from finished runs

Seed k runs `soup.main` in ROOT/seed_<k> with --config.sweep.seed=k: another
random search (hyperparameters and data order). With --share_upstream (the
default, the paper's setting: one pretrained model, many fine-tunes) the
upstream model and its linear probe come from seed 0's run and are copied in;
with --noshare_upstream, --config.seed=k also pretrains a new upstream model per
seed (for a config that pretrains in the run, e.g. fashion_mnist.py:upstream_here; a
config that loads a pretrained file is refused). The data splits stay fixed
(config.data.split_seed).

ROOT/aggregate.md and ROOT/aggregate.json hold, for each table row, the mean,
standard deviation and 95% Student-t interval over seeds of its held-out, test
and shift-average accuracy; the precondition (best individual minus the
initialization, and how many seeds hold it on their own paired interval); how
many seeds had the greedy soup beat the best individual on test and on the
shifts; and the paper's claims judged over seeds, the precondition first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from soup import atomic_io, claims as claims_lib, layout, recipes, report, results as R, stats
from soup.recipes import Name

METRICS = ("held_out", "test", "avg_shifts")


def seed_dir(root: Path, seed: int) -> Path:
  return root / layout.seed_dir(seed)


def seed_overrides(seed: int, share_upstream: bool) -> list[str]:
  """Config overrides of seed k: a new sweep, and a new upstream unless it is shared."""
  flags = [f"--config.sweep.seed={seed}"]
  if not share_upstream:
    flags.append(f"--config.seed={seed}")
  return flags


def share_upstream_from(source: Path, target: Path) -> None:
  """Copies the pretrained model and model_0 (same config.seed: identical bytes) into target."""
  for part in (layout.UPSTREAM_INGREDIENT, layout.ingredient(layout.INITIALIZATION)):
    src, dst = source / part, target / part
    if src.is_dir() and not dst.exists():
      dst.parent.mkdir(parents=True, exist_ok=True)
      shutil.copytree(src, dst)


def run_seeds(config: str, root: Path, seeds: Sequence[int], share_upstream: bool,
              extra_flags: Sequence[str] = ()) -> dict[int, float]:
  """Runs soup.main once per seed (skipping finished ones); returns each run's seconds."""
  seconds = {}
  for seed in seeds:
    workdir = seed_dir(root, seed)
    if (workdir / layout.RESULTS).exists() and (workdir / layout.REPORT).exists():
      print(f"seed {seed}: {workdir} is finished; kept.", flush=True)
      continue
    if share_upstream and seed != seeds[0]:
      share_upstream_from(seed_dir(root, seeds[0]), workdir)
    command = [sys.executable, "-m", "soup.main", f"--config={config}", f"--workdir={workdir}",
               *seed_overrides(seed, share_upstream), *extra_flags]
    print("$ " + " ".join(command), flush=True)
    start = time.time()
    subprocess.run(command, check=True)
    seconds[seed] = round(time.time() - start, 1)
    (workdir / layout.WALL_SECONDS).write_text(f"{seconds[seed]}\n")
  return seconds


# --- Aggregation ------------------------------------------------------------


def _table(rows: list[dict]) -> dict[str, dict]:
  """recipe -> the report's chosen row (held_out, test, avg_shifts, ...), for one seed."""
  built = report.build_report(rows)
  return {r["recipe"]: r for r in built["rows"]}


def aggregate(rows_by_seed: dict[int, list[dict]]) -> dict:
  """Mean, std and 95% interval over seeds of every table row, plus the greedy-vs-best counts."""
  if not rows_by_seed:
    raise ValueError("No seeds to aggregate.")
  tables = {seed: _table(rows) for seed, rows in sorted(rows_by_seed.items())}
  recipes = [r for r in next(iter(tables.values()))]
  out_rows = []
  for recipe in recipes:
    present = {seed: t[recipe] for seed, t in tables.items() if recipe in t}
    row = {"recipe": recipe, "seeds": sorted(present)}
    for metric in METRICS:
      values = [present[s][metric] for s in sorted(present) if present[s][metric] is not None]
      row[metric] = stats.mean_interval(values) if values else None
      row[f"{metric}_by_seed"] = values
    out_rows.append(row)
  return {"seeds": sorted(tables), "rows": out_rows,
          "precondition": _precondition(tables, rows_by_seed),
          "greedy_vs_best": _greedy_vs_best(tables),
          "claims": claims_lib.judge_over_seeds(tables, rows_by_seed)}


def _greedy_vs_best(tables: dict[int, dict]) -> dict:
  out = {}
  for metric in ("test", "avg_shifts"):
    diffs = [t[Name.GREEDY_SOUP][metric] - t[Name.BEST_INDIVIDUAL][metric]
             for t in tables.values() if Name.GREEDY_SOUP in t and Name.BEST_INDIVIDUAL in t]
    out[metric] = {"wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
                   "seeds": len(diffs),
                   "diff": stats.mean_interval(diffs) if diffs else None}
  return out


def _precondition(tables: dict[int, dict], rows_by_seed: dict[int, list[dict]]) -> dict:
  """Best individual minus the initialization over seeds: the paper's setting, or not."""
  out = {}
  for metric in ("test", "avg_shifts"):
    diffs = [t[Name.BEST_INDIVIDUAL][metric] - t[Name.INITIALIZATION][metric]
             for t in tables.values() if Name.BEST_INDIVIDUAL in t and Name.INITIALIZATION in t
             and t[Name.BEST_INDIVIDUAL][metric] is not None
             and t[Name.INITIALIZATION][metric] is not None]
    out[metric] = {"wins": sum(d > 0 for d in diffs), "seeds": len(diffs),
                   "diff": stats.mean_interval(diffs) if diffs else None}
  verdicts = {seed: claims_lib.precondition(rows)["verdict"] for seed, rows in rows_by_seed.items()}
  out["held"] = sum(v == claims_lib.HELD for v in verdicts.values())
  out["held_seeds"] = len(verdicts)
  out["init_beats_every_fine_tune"] = sorted(
      seed for seed, rows in rows_by_seed.items()
      if claims_lib.init_beats_every_fine_tune(rows) is not None)
  return out


def _pct(x) -> str:
  return "—" if x is None or x != x else f"{100 * x:.2f}"


def _cell(summary: dict | None) -> str:
  if summary is None:
    return "—"
  if summary["n"] == 1:
    return _pct(summary["mean"])
  return (f"{_pct(summary['mean'])} ± {_pct(summary['std'])} "
          f"[{_pct(summary['low'])}, {_pct(summary['high'])}]")


def render_markdown(agg: dict, command: str = "", seconds: dict | None = None) -> str:
  n = len(agg["seeds"])
  lines = [f"# Model soups over {n} seeds", ""]
  if command:
    lines += [f"Command: `{command}`", ""]
  if seconds:
    total = sum(seconds.values())
    lines += ["Wall time per seed (s): " + ", ".join(f"seed {s}: {v:.0f}" for s, v in
                                                     sorted(seconds.items()))
              + f"; total {total:.0f} s.", ""]
  lines += [f"Accuracy (%): mean ± standard deviation over seeds [95% Student-t interval of the "
            f"mean]; seeds {', '.join(map(str, agg['seeds']))}.", "",
            "| Method | held-out | test | avg. shifts |", "| --- | ---: | ---: | ---: |"]
  for row in agg["rows"]:
    label = recipes.REGISTRY[row["recipe"]].label if row["recipe"] in recipes.REGISTRY \
        else row["recipe"]
    lines.append(f"| {label} | " + " | ".join(_cell(row[m]) for m in METRICS) + " |")
  pre = agg.get("precondition")
  if pre and pre["test"]["seeds"]:
    lines += ["", "Best individual minus initialization (points; the precondition, fine-tuning "
              "improves on the initialization): "
              + "; ".join(f"{m.replace('avg_shifts', 'shift average')}: {_cell(pre[m]['diff'])}, "
                          f"best individual ahead in {pre[m]['wins']} of {pre[m]['seeds']} seeds"
                          for m in ("test", "avg_shifts"))
              + f"; held on its seed's paired test interval in {pre['held']} of "
                f"{pre['held_seeds']} seeds; the initialization beats every fine-tune on "
                f"held-out in {len(pre['init_beats_every_fine_tune'])} of {n} seeds."]
  g = agg["greedy_vs_best"]
  lines += ["", "Greedy soup minus best individual (points): "
            + "; ".join(f"{m.replace('avg_shifts', 'shift average')}: {_cell(g[m]['diff'])}, "
                        f"greedy ahead in {g[m]['wins']} of {g[m]['seeds']} seeds"
                        + (f" ({g[m]['ties']} ties)" if g[m]["ties"] else "")
                        for m in ("test", "avg_shifts")) + ".", ""]
  lines += claims_lib.render(agg["claims"], heading="## The paper's claims, over seeds")
  return "\n".join(lines) + "\n"


def load_runs(root: Path) -> tuple[dict[int, list[dict]], dict[int, float]]:
  rows, seconds = {}, {}
  for path in sorted(root.glob(f"{layout.SEED_PREFIX}*/{layout.RESULTS}")):
    seed = int(path.parent.name.removeprefix(layout.SEED_PREFIX))
    rows[seed] = R.read(path, recipes.infer_recipe)
    wall = path.parent / layout.WALL_SECONDS
    if wall.exists():
      seconds[seed] = float(wall.read_text())
  if not rows:
    raise SystemExit(f"error: no {root}/{layout.SEED_PREFIX}*/{layout.RESULTS}; run the seeds "
                     "first (drop --aggregate_only).")
  return rows, seconds


def _loads_pretrained(config: str) -> bool:
  """Whether config ("FILE[:ARG]") starts from a pretrained file rather than pretraining here."""
  import configs
  path, _, arg = config.partition(":")
  module = configs.module_of(path)
  cfg = module.get_config(arg) if arg else module.get_config()
  return cfg.init.source == "pretrained"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/fashion_mnist.py")
  parser.add_argument("--root", required=True, help="Holds one seed_<k>/ workdir per seed.")
  parser.add_argument("--seeds", type=int, default=3, help="Seeds 0..N-1.")
  parser.add_argument("--share_upstream", action=argparse.BooleanOptionalAction, default=True,
                      help="One upstream model for every seed (the paper's setting).")
  # absl's spelling, as the README and scripts/seeds.sh write it (argparse's is --no-share_...).
  parser.add_argument("--noshare_upstream", dest="share_upstream", action="store_false",
                      help="A new upstream model per seed (needs a config that pretrains).")
  parser.add_argument("--aggregate_only", action="store_true")
  args, extra = parser.parse_known_args(argv)
  if any(not f.startswith("--config.") for f in extra):
    parser.error(f"unknown flags {extra}; only --config.<key>=<value> overrides pass through.")
  if not args.share_upstream and _loads_pretrained(args.config):
    parser.error(f"--noshare_upstream pretrains one upstream per seed, but {args.config} loads "
                 "a pretrained file (config.init.source='pretrained'), the same for every seed; "
                 "add the config argument that pretrains in the run, e.g. "
                 "--config=configs/fashion_mnist.py:upstream_here.")
  root = Path(args.root)
  os.makedirs(root, exist_ok=True)
  command = " ".join(["python -m soup.aggregate", f"--config={args.config}", f"--root={root}",
                      f"--seeds={args.seeds}",
                      "--share_upstream" if args.share_upstream else "--noshare_upstream", *extra])
  if not args.aggregate_only:
    atomic_io.atomic_write_text(root / layout.COMMAND, command + "\n")
    run_seeds(args.config, root, list(range(args.seeds)), args.share_upstream, extra)
  elif (root / layout.COMMAND).exists():  # The command that made the runs.
    command = (root / layout.COMMAND).read_text().strip()
  else:
    command = ""
  rows, seconds = load_runs(root)
  agg = aggregate(rows)
  agg.update(command=command, seconds=seconds)
  atomic_io.atomic_write_text(root / layout.AGGREGATE, json.dumps(agg, indent=1))
  text = render_markdown(agg, command, seconds)
  atomic_io.atomic_write_text(root / layout.AGGREGATE_REPORT, text)
  print(text)
  print(f"aggregate: {root / layout.AGGREGATE_REPORT}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
