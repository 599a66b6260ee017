r"""Runs a model-soup experiment: `python -m soup.main --config=CONFIG.py[:ARG] --workdir=DIR`.

--config.key=value overrides any config field; a misspelled key is an error.
--config.stages=sweep,evaluate runs those stages only (each resumable).
"""

from __future__ import annotations

import os

# Two host "devices" on a 2-core CPU split each batch and train the tiny ViT
# 13-26% faster (docs/benchmarks.md); a user's XLA_FLAGS wins.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import importlib.util  # noqa: E402
import logging as std_logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

log = std_logging.getLogger("soup.main")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/fashion_mnist.py[:smoke].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where every output of the experiment goes.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host TPU VMs, multi-node "
    "GPU): every host runs the same command; the mesh then spans all hosts' devices.")
flags.mark_flags_as_required(["config", "workdir"])


def load_config_module(path: str):
  """The config file as a module, for its sweep function (`get_sweep`)."""
  spec = importlib.util.spec_from_file_location("soup_config_module", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main(argv):
  del argv
  import jax
  if _DISTRIBUTED.value:
    from soup import distributed  # TPU/SLURM detected; multi-node GPU from JAX_* variables.
    distributed.initialize()
  from soup.experiment import Experiment  # After XLA_FLAGS is set.

  config = _CONFIG.value
  workdir = Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  handler = std_logging.FileHandler(workdir / "log.txt")
  handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  std_logging.getLogger().addHandler(handler)
  # Our modules log through the root logger at INFO; Orbax's absl INFO chatter is muted.
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger("soup").setLevel(std_logging.INFO)
  cache = os.environ.get("SOUP_COMPILATION_CACHE", str(Path.home() / ".cache" / "soup_jax"))
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  config_path = flags.FLAGS["config"].config_filename.split(":")[0]
  module = load_config_module(config_path)
  if not hasattr(module, "get_sweep"):
    raise SystemExit(f"{config_path} has no get_sweep(config) function defining the sweep.")
  start = time.time()
  # --config.stages=sweep,evaluate arrives as ("sweep,evaluate",): split every item.
  items = (config.stages,) if isinstance(config.stages, str) else tuple(config.stages)
  stages = tuple(s.strip() for item in items for s in item.split(",") if s.strip())
  built = Experiment(config, workdir, module.get_sweep).run(stages)
  if built is not None:
    from soup import report
    print(report.markdown_table(built))
    print(f"\nreport: {workdir / 'report.md'}\nfigure: {workdir / 'figure.png'}\n"
          f"results: {workdir / 'results.jsonl'}\nwall time: {time.time() - start:.0f}s")


if __name__ == "__main__":
  app.run(main)
