"""The run's stages and the workdir's layout: the one place that names them.

Plain names, no I/O and no imports, so the config check (soup/validate.py), the
launcher (scripts/launch_sweep.py) and the configs can read them cheaply.
soup/workdir.py joins them to a workdir's root.

A workdir holds:
  config.json                 the config that made this workdir (see Workdir.check_config)
  sweep.json                  the sweep's hyperparameters, frozen at first use
  upstream/                   pretraining run (train_state/, logs/) and ingredient/
  models/model_<k>/           model_0 = linear probe; model_1.. = sweep members:
                              ingredient/ (params-only Orbax), train_state/,
                              logs/ (metrics.jsonl and TensorBoard events)
  eval/model_<k>.npz          logits on every split
  soups/<recipe>.json         that recipe's results rows
  soups/<recipe>/             the soup's params, for recipes that make one
  results.jsonl, report.md, figure.png, log.txt
  analysis.json, landscape.png, ingredients.png   the report's analysis figures, if enabled
  reads.process<k>.json       the bytes process k read of each ingredient (its shards)
  import.json                 what the last import of released checkpoints did, file by file
  launch_logs/                scripts/launch_sweep.py's logs of each phase, run locally

soup/aggregate.py's root holds one workdir per seed, seed_<k>/ (with wall_seconds.txt, the
run's seconds), and command.txt, aggregate.json, aggregate.md.

Paths below are relative to the workdir and use "/", so they join onto a Path
and serve as bucket prefixes alike.
"""

from __future__ import annotations

# --- Stages, in the order a run takes them ------------------------------------------

STAGES = ("pretrain", "probe", "sweep", "evaluate", "soups", "report")
# Those that write upstream/ and models/ (a sweep member's job runs these).
MODEL_STAGES = ("pretrain", "probe", "sweep")
# Those that read the evaluation splits (the launcher's final phase).
EVAL_STAGES = ("evaluate", "soups", "report")
# model_0 and what it starts from, made once before members run in parallel.
SETUP_STAGES = ("pretrain", "probe")

# --- Files and folders -------------------------------------------------------------

CONFIG = "config.json"
SWEEP = "sweep.json"
RESULTS = "results.jsonl"
REPORT = "report.md"
FIGURE = "figure.png"
LOG = "log.txt"
UPSTREAM = "upstream"
MODELS = "models"
EVAL = "eval"
SOUPS = "soups"
INGREDIENT = "ingredient"  # A model's params-only checkpoint, inside its folder.
# Written last by checkpoints.save_ingredient: its presence means a complete ingredient.
INGREDIENT_FILE = "ingredient.json"
UPSTREAM_INGREDIENT = f"{UPSTREAM}/{INGREDIENT}"
# Inside a training run's folder (upstream/ or models/model_<k>/).
TRAIN_STATE = "train_state"  # The resumable full state (soup/train_state.py).
LOGS = "logs"
METRICS_LOG = "metrics.jsonl"  # In LOGS, one line per logged step.
# The report's analysis figures (soup/analysis_figures.py) and their cache.
ANALYSIS = "analysis.json"
LANDSCAPE_FIGURE = "landscape.png"
INGREDIENTS_FIGURE = "ingredients.png"
IMPORT = "import.json"  # soup/models/official.py's record of an import.
LAUNCH_LOGS = "launch_logs"
# soup/aggregate.py's root of seeds.
SEED_PREFIX = "seed_"
WALL_SECONDS = "wall_seconds.txt"  # In each seed's workdir.
COMMAND = "command.txt"
AGGREGATE = "aggregate.json"
AGGREGATE_REPORT = "aggregate.md"

# --- Model names -------------------------------------------------------------------

MEMBER_PREFIX = "model_"
# The linear probe (or zero-shot head) every member starts from: the paper's model_0.
INITIALIZATION = f"{MEMBER_PREFIX}0"


def member_name(index: int) -> str:
  """Model `index`: 0 is the initialization, 1.. the sweep's members (the paper's names)."""
  return f"{MEMBER_PREFIX}{index}"


def member_names(count: int) -> list[str]:
  """The sweep's `count` members: model_1 .. model_<count>."""
  return [member_name(i + 1) for i in range(count)]


def model_dir(name: str) -> str:
  return f"{MODELS}/{name}"


def ingredient(name: str) -> str:
  """The ingredient folder of model `name` (model_0, model_1, ...)."""
  return f"{MODELS}/{name}/{INGREDIENT}"


def logits_file(name: str) -> str:
  return f"{EVAL}/{name}.npz"


def reads_file(process_index: int) -> str:
  return f"reads.process{process_index}.json"


def seed_dir(seed: int) -> str:
  """Seed `seed`'s workdir under soup/aggregate.py's root."""
  return f"{SEED_PREFIX}{seed}"


def soup_dir(recipe: str) -> str:
  return f"{SOUPS}/{recipe}"


def soup_rows(recipe: str) -> str:
  return f"{SOUPS}/{recipe}.json"
