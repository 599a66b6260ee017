"""Checks the whole config before any compute: a user error stops here, in one line.

`check(config, sweep_fn)` raises ConfigError (or another of USER_ERRORS) naming
the fix. soup/main.py prints it as one line and exits with status 2; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from soup import recipes, sweep as sweep_lib


class ConfigError(ValueError):
  """The config asks for something that cannot run; the message says what to change."""


STAGES = ("pretrain", "probe", "sweep", "evaluate", "soups", "report")


def parse_stages(stages) -> tuple[str, ...]:
  """--config.stages=sweep,evaluate arrives as ("sweep,evaluate",): split every item."""
  items = (stages,) if isinstance(stages, str) else tuple(stages)
  out = tuple(s.strip() for item in items for s in item.split(",") if s.strip())
  unknown = [s for s in out if s not in STAGES]
  if unknown:
    raise ConfigError(f"config.stages: unknown stage(s) {unknown}; choose from "
                      f"{', '.join(STAGES)}.")
  return out


def _path(value: str) -> Path:
  return Path(os.path.expanduser(value))


def check_paths(config, stages: tuple[str, ...], workdir: Path) -> None:
  """The data and weights this run's stages will read exist (nothing is read here).

  A stage reads the weights only if the workdir lacks what they make (the
  upstream ingredient, model_0), and ObjectNet only when evaluating.
  """
  data = config.data
  if data.name == "fashion_mnist":
    from soup.data.fashion_mnist import INSTALL_HINT, default_data_dir
    tfds_dir = _path(data.data_dir or default_data_dir())
    if not (tfds_dir / "fashion_mnist").is_dir():
      raise ConfigError(
          f"TFDS fashion_mnist is not prepared in {tfds_dir}. Run `python -m soup.data.prepare "
          f"--data_dir={tfds_dir}` (or scripts/setup.sh), or set --config.data.data_dir. "
          f"{INSTALL_HINT}")
  elif data.name == "imagenet":
    evaluates = bool({"evaluate", "soups", "report"} & set(stages))
    for key in ("data_dir", "heldout_file", *(("objectnet_dir",) if evaluates else ())):
      value = data.get(key, "")
      if value and not _path(value).exists():
        raise ConfigError(f"config.data.{key}={value!r} does not exist; fix the path "
                          f"(--config.data.{key}=...).")
  else:
    raise ConfigError(f"config.data.name={data.name!r} is unknown; use fashion_mnist or "
                      "imagenet.")
  if config.init.source not in ("upstream", "pretrained"):
    raise ConfigError(f"config.init.source={config.init.source!r}: use 'upstream' or "
                      "'pretrained'.")
  makes_models = bool({"pretrain", "probe", "sweep"} & set(stages))
  needed = []
  if (config.init.source == "pretrained" and makes_models
      and not (workdir / "upstream" / "ingredient" / "ingredient.json").exists()):
    needed.append("path")
  if (config.probe.kind == "zeroshot" and makes_models
      and not (workdir / "models" / "model_0" / "ingredient" / "ingredient.json").exists()):
    needed.append("bpe_path")
  for key in needed:
    value = config.init.get(key, "")
    if not value or not _path(value).exists():
      raise ConfigError(f"config.init.{key}={value!r} does not exist; download the weights "
                        f"there or set --config.init.{key}=...")


def check(config, sweep_fn: Callable[[Any], list[dict]], stages: tuple[str, ...],
          workdir: Path) -> None:
  """Every check that needs no data and no compute."""
  try:
    recipes.check(config.soups)
  except recipes.RecipeConfigError as e:
    raise ConfigError(str(e)) from e
  if config.probe.kind not in ("linear_probe", "zeroshot"):
    raise ConfigError(f"config.probe.kind must be 'linear_probe' or 'zeroshot', got "
                      f"{config.probe.kind!r}.")
  if config.soups.on_bad_ingredient not in ("exclude", "error"):
    raise ConfigError(f"config.soups.on_bad_ingredient must be 'exclude' or 'error', got "
                      f"{config.soups.on_bad_ingredient!r}.")
  if config.soups.greedy_comparison not in (">", ">="):
    raise ConfigError(f"config.soups.greedy_comparison must be '>' or '>=', got "
                      f"{config.soups.greedy_comparison!r}.")
  # Issue 10's protocol switches (soup/soups/greedy.py, soup/train.py, soup/models/vit.py).
  for field, value, allowed in (
      ("soups.greedy_tie_order", config.soups.greedy_tie_order, ("reversed", "listed")),
      ("finetune.weight_decay_mask", config.finetune.weight_decay_mask, ("all", "matrices")),
      ("model.activation", config.model.get("activation", "gelu"), ("gelu", "gelu_tanh"))):
    if value not in allowed:
      raise ConfigError(f"config.{field} must be one of {allowed}, got {value!r}.")
  if config.probe.kind == "linear_probe" and (
      not config.probe.l2_grid or min(config.probe.l2_grid) <= 0):
    raise ConfigError(f"config.probe.l2_grid must hold positive values, got "
                      f"{tuple(config.probe.l2_grid)}.")
  try:
    sweep_lib.check_members(sweep_fn(config), "the config's get_sweep(config)")
  except sweep_lib.SweepError as e:
    raise ConfigError(str(e)) from e
  if stages:
    check_paths(config, stages, Path(workdir))
