r"""Runs a model-soup experiment: `python -m soup.main --config=CONFIG.py[:ARG] --workdir=DIR`.

--config.key=value overrides any config field; a misspelled key is an error.
--config.stages=sweep,evaluate runs those stages only (each resumable).

The whole config is checked before anything is computed (soup/validate.py): a
user error (a bad config value, a missing dataset or checkpoint, a workdir of
another config) prints one line naming the fix and exits with status 2. Any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os

# Two host "devices" on a 2-core CPU: the default runs (and its committed results) use this
# mesh, so a rerun reproduces them; a user's XLA_FLAGS wins.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import logging as std_logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import configs  # noqa: E402
from soup import layout, memory  # noqa: E402  (names and the allocator only: no jax)

log = std_logging.getLogger("soup.main")
USAGE_ERROR = 2  # Exit status of a user error (as argparse's).

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/fashion_mnist.py[:smoke].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where every output of the experiment goes.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host TPU VMs, multi-node "
    "GPU): every host runs the same command; the mesh then spans all hosts' devices.")
flags.mark_flags_as_required(["config", "workdir"])


def user_errors() -> tuple[type[BaseException], ...]:
  """Exceptions whose message tells the user what to change: one line, exit 2."""
  from soup import checkpoints, evaluate, recipes, soups, train, validate, workdir
  from soup.data import DatasetMissingError
  from soup.models import pretrained
  return (validate.ConfigError, recipes.RecipeConfigError, workdir.WorkdirMismatchError,
          DatasetMissingError, pretrained.WeightsMissingError, checkpoints.CheckpointError,
          soups.IngredientMismatchError, train.TrainingDiverged, evaluate.GroupTooLargeError)


def fail(message: str) -> None:
  """Prints a user error as one line and exits with USAGE_ERROR."""
  print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
  sys.exit(USAGE_ERROR)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a config error as one line (absl prints a bare FATAL)."""
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
  config_file = config_arg.split(":")[0]
  if config_file and not Path(config_file).is_file():
    fail(f"--config={config_arg}: no such file; pass a config such as "
         "configs/fashion_mnist.py[:smoke].")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # A get_config() error arrives as a traceback: its last line is the message.
    fail(lines[-1] if "Traceback" in str(e) else " ".join(lines))
  except (AttributeError, KeyError) as e:  # A --config.<key> override the config lacks.
    message = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\\'", "")
    fail(f"bad --config override: the config has no field {message.replace(chr(39), '')}")


def main(argv):
  del argv
  from soup import validate  # jax, but no model, data or checkpoint code: refuses in seconds.

  memory.keep_freed_blocks()  # Before any thread starts: each step reuses freed heap blocks.

  start = time.time()
  config_path = flags.FLAGS["config"].config_filename.split(":")[0]
  try:
    config = _CONFIG.value
    module = configs.module_of(config_path)
    if not hasattr(module, "get_sweep"):
      raise validate.ConfigError(f"{config_path} has no get_sweep(config) function defining the "
                                 "sweep; add one (see configs/fashion_mnist.py).")
    stages = validate.parse_stages(config.stages)
    validate.check(config, module.get_sweep, stages, Path(_WORKDIR.value))
  except validate.ConfigError as e:
    fail(e)

  import jax
  if _DISTRIBUTED.value:
    from soup import distributed  # TPU/SLURM detected; multi-node GPU from JAX_* variables.
    distributed.initialize()
  # Orbax's and jax's absl INFO chatter (a backend's start among it) is muted.
  logging.set_verbosity(logging.WARNING)
  try:  # The batches split over the mesh's data axis: every device (soup/mesh.py).
    validate.check_devices(config, jax.device_count())
  except validate.ConfigError as e:
    fail(e)
  from soup import experiment  # After XLA_FLAGS is set.

  workdir = Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  from soup.workdir import Workdir
  try:  # A workdir of another config is refused before anything, its log included, is written.
    Workdir(workdir).check_config(config)
  except user_errors() as e:
    fail(e)
  handler = std_logging.FileHandler(workdir / layout.LOG)
  handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  std_logging.getLogger().addHandler(handler)
  # Our modules log through the root logger at INFO.
  std_logging.getLogger("soup").setLevel(std_logging.INFO)
  validate.warn_ignored(config)  # Once, before compute: into the log file too.
  cache = os.environ.get("SOUP_COMPILATION_CACHE", str(Path.home() / ".cache" / "soup_jax"))
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  try:
    built = experiment.run(config, workdir, module.get_sweep, stages)
  except user_errors() as e:
    fail(e)
  experiment.record_reads(workdir)
  if built is not None:
    from soup import report
    print(report.markdown_table(built))
    print(f"\nreport: {workdir / layout.REPORT}\nfigure: {workdir / layout.FIGURE}\n"
          f"results: {workdir / layout.RESULTS}\nwall time: {time.time() - start:.0f}s")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
