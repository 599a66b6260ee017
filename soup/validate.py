"""Checks the whole config before any compute: a user error stops here, in one line.

`check(config, sweep_fn)` raises ConfigError (or another of USER_ERRORS) naming
the fix. soup/main.py prints it as one line and exits with status 2; any other
exception is a bug and keeps its traceback.

Every field's rule is one row of FIELDS (field -> rule, and when the field is
read), config.soups's from the settings the recipes declare (soup/recipes.py);
`check_devices` adds PER_DEVICE's once the number of devices is known.

The config is checked whole: a value no run could use (a plain Rule's refusal) is
refused even in a block this run will not read, as the upstream block of a config
that loads its start; rules that depend on other fields or on the devices apply
only where the field is read. `warn_ignored` says once, before compute, which
fields this run will not read and why.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
import shlex
from pathlib import Path
from typing import Any, Callable, Optional

from soup import layout, models, recipes, sharding, sweep as sweep_lib
from soup.data import registry as datasets
from soup.data.glue_tasks import GLUE_TASKS

GLUE_TASK_NAMES = tuple(GLUE_TASKS)

log = logging.getLogger(__name__)


class ConfigError(ValueError):
  """The config asks for something that cannot run; the message says what to change."""


# --- Field rules: every number of the config, checked before compute ------------------


@dataclasses.dataclass(frozen=True)
class Rule:
  """What a good value is: a test, its words for the message, and a nearby good value."""
  describe: str
  ok: Callable[[Any], bool]
  suggest: Callable[[Any], Any] = lambda value: None


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int, hi: Optional[int] = None, why: str = "") -> Rule:
  """An integer in [lo, hi] (hi None: no upper bound); why: where hi comes from."""
  words = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
  top = math.inf if hi is None else hi
  return Rule(words + (f" ({why})" if why else ""), lambda v: _is_int(v) and lo <= v <= top,
              lambda v: min(max(lo, v), top) if _is_int(v) and lo <= top else None)


def number(interval: str) -> Rule:
  """A finite number in an interval written as in maths: "(0, inf)", "[0, 1]", "(0, 1)"."""
  lo_text, hi_text = (t.strip() for t in interval[1:-1].split(","))
  lo, hi = float(lo_text), float(hi_text)
  lo_open, hi_open = interval[0] == "(", interval[-1] == ")"
  words = (f"a number {'>' if lo_open else '>='} {lo_text}" if math.isinf(hi)
           else f"a number in {interval}")

  def ok(v) -> bool:
    return (_is_real(v) and (v > lo if lo_open else v >= lo)
            and (v < hi if hi_open else v <= hi))

  def suggest(v):
    if not _is_real(v):
      return None
    if v < lo or (v == lo and lo_open):
      return None if lo_open else lo
    return None if hi_open else hi
  return Rule(words, ok, suggest)


def pair(item: Rule) -> Rule:
  """A (lo, hi) range of the sweep: two items, lo <= hi."""
  def ok(v) -> bool:
    return (isinstance(v, (tuple, list)) and len(v) == 2 and all(item.ok(x) for x in v)
            and v[0] <= v[1])
  return Rule(f"a pair (lo, hi) with lo <= hi, each {item.describe}", ok,
              lambda v: (v[1], v[0]) if (isinstance(v, (tuple, list)) and len(v) == 2
                                         and all(item.ok(x) for x in v)) else None)


def items(item: Rule) -> Rule:
  """A non-empty tuple of good items."""
  return Rule(f"a non-empty tuple, each item {item.describe}",
              lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(item.ok(x) for x in v))


def one_of(*choices) -> Rule:
  return Rule(f"one of {choices}", lambda v: v in choices, lambda v: choices[0])


def member_indices(count: int) -> Rule:
  """sweep.only: "" (every member) or comma-separated 1-based indices of the sweep's members."""
  def ok(v) -> bool:
    parts = [p.strip() for p in str(v).split(",") if p.strip()]
    return all(p.isdigit() and 1 <= int(p) <= count for p in parts)
  return Rule(f"'' (every member) or comma-separated member indices in 1..{count} "
              "(config.sweep.num_members)", ok)


def multiple_of(devices: int) -> Rule:
  return Rule(f"a multiple of the {devices} devices (each batch is split over the mesh's data "
              "axis)", lambda v: _is_int(v) and v > 0 and v % devices == 0,
              lambda v: max(devices, -(-v // devices) * devices) if _is_int(v) else None)


POSITIVE_INT, COUNT, SEED = integer(1), integer(0), integer(0)
POSITIVE, NON_NEGATIVE = number("(0, inf)"), number("[0, inf)")
UNIT = number("[0, 1]")          # Strengths and probabilities.
FRACTION = number("(0, 1)")      # A part set aside: neither nothing nor everything.
BOOL = Rule("True or False", lambda v: isinstance(v, bool))
FASHION_MNIST_TRAIN = 60_000     # TFDS fashion_mnist's train split, cut by config.data.


@dataclasses.dataclass(frozen=True)
class When:
  """When a field is read: a condition on the config, and why the field is unread otherwise."""
  holds: Callable[[Any], bool]
  unless: str | Callable[[Any], str]  # Why not (of the config): the ignored fields' warning.

  def why_not(self, config) -> str:
    return self.unless(config) if callable(self.unless) else self.unless

  def __call__(self, config) -> bool:
    return self.holds(config)


def _data_is(name: str) -> When:
  """The condition "config.data.name is `name`", a name of soup/data/registry.py."""
  datasets.get(name)  # A renamed entry fails here, not by silently skipping its rows.
  return When(lambda c: c.data.name == name, f"config.data.name is not {name!r}")


def _model_is(name: str) -> When:
  """The condition "config.model.name is `name`", a name of soup/models/__init__.py."""
  models.get(name)
  return When(lambda c: c.model.name == name, f"config.model.name is not {name!r}")


# When a field is read (a field the config lacks is skipped in any case).
ALWAYS = When(lambda c: True, "")
FASHION = _data_is("fashion_mnist")
UPSTREAM = When(lambda c: c.init.source == "upstream",  # Else config.upstream is unread.
                "config.init.source is not 'upstream': the start is loaded, not pretrained here")
SIMCLR = When(lambda c: UPSTREAM(c) and c.upstream.get("objective") == "simclr",
              lambda c: UPSTREAM.unless if not UPSTREAM(c)
              else "config.upstream.objective is not 'simclr'")
LINEAR_PROBE = When(lambda c: c.probe.kind == "linear_probe",
                    "config.probe.kind is not 'linear_probe'")
VIT = _model_is("vit")
BERT = _model_is("bert")
GLUE = _data_is("glue")
RELEASED = lambda c: "released" in c  # The paper's released models, imported (no training).


def _upstream_size(c) -> int:
  return c.data.upstream_examples + (c.data.finetune_examples
                                     if c.data.get("upstream_includes_finetune") else 0)


# field -> rule (a Rule, or a function of the config giving one), and when it is read. Rows
# run in order, so a rule that reads other fields comes after their own rows.
FIELDS: tuple[tuple, ...] = (
    ("data.name", one_of(*datasets.DATASETS)),
    ("model.name", one_of(*models.MODELS)),
    ("seed", SEED),
    ("data.split_seed", SEED),
    ("data.image_size", POSITIVE_INT),
    ("data.image_channels", POSITIVE_INT),
    ("data.held_out_examples", POSITIVE_INT),
    # GLUE: 0 is the rest of train; elsewhere a count of images.
    ("data.finetune_examples", lambda c: COUNT if GLUE(c) else POSITIVE_INT),
    ("data.task", one_of(*GLUE_TASK_NAMES), GLUE),
    ("data.max_length", integer(2), GLUE),
    ("data.length_buckets", items(POSITIVE_INT), GLUE),
    ("data.upstream_examples", POSITIVE_INT),
    ("data.test_examples", POSITIVE_INT),
    ("data.shift_examples", POSITIVE_INT),
    ("data.upstream_labels", one_of("fine", "coarse", "tops_merged"), FASHION),
    ("data.upstream_transform", one_of("none", "resample"), FASHION),
    # The 60,000 training images are cut into held-out | fine-tuning | upstream, in order.
    ("data.held_out_examples", integer(1, FASHION_MNIST_TRAIN, "Fashion-MNIST's training images"),
     FASHION),
    ("data.finetune_examples", lambda c: integer(
        1, FASHION_MNIST_TRAIN - c.data.held_out_examples,
        "Fashion-MNIST's 60,000 training images less data.held_out_examples"), FASHION),
    ("data.upstream_examples", lambda c: integer(
        1, FASHION_MNIST_TRAIN - c.data.held_out_examples - c.data.finetune_examples,
        "Fashion-MNIST's 60,000 training images less data.held_out_examples and "
        "finetune_examples"), FASHION),
    ("data.heldout_per_class", POSITIVE_INT),
    ("data.num_workers", integer(-1)),
    ("model.activation", one_of("gelu", "gelu_tanh")),
    ("model.patch_size", POSITIVE_INT, VIT),
    ("model.width", POSITIVE_INT, VIT),
    ("model.depth", POSITIVE_INT, VIT),
    ("model.num_heads", POSITIVE_INT, VIT),
    ("model.mlp_dim", POSITIVE_INT, VIT),
    ("model.stem_channels", COUNT, VIT),
    ("model.num_heads", lambda c: Rule(f"a divisor of model.width={c.model.width}",
                                       lambda v: c.model.width % v == 0), VIT),
    ("model.pooling", one_of("cls_pooler", "mean"), BERT),
    ("upstream.objective", one_of("supervised", "simclr"), UPSTREAM),
    ("upstream.epochs", POSITIVE_INT, UPSTREAM),
    ("upstream.batch_size", POSITIVE_INT, UPSTREAM),
    ("upstream.batch_size", lambda c: integer(1, _upstream_size(c), "the upstream's images"),
     When(lambda c: UPSTREAM(c) and FASHION(c), UPSTREAM.unless)),
    ("upstream.lr", POSITIVE, UPSTREAM),
    ("upstream.weight_decay", UNIT, UPSTREAM),
    ("upstream.warmup_steps", COUNT, UPSTREAM),
    ("upstream.aug_strength", UNIT, UPSTREAM),
    ("upstream.temperature", POSITIVE, SIMCLR),
    ("upstream.projection_hidden", POSITIVE_INT, SIMCLR),
    ("upstream.projection_out", POSITIVE_INT, SIMCLR),
    ("upstream.crop_min_scale", number("(0, 1]"), SIMCLR),
    ("upstream.jitter", UNIT, SIMCLR),
    ("probe.kind", one_of("linear_probe", "zeroshot", "random_head")),
    ("probe.init_std", POSITIVE, lambda c: c.probe.kind == "random_head"),
    ("probe.examples", COUNT, LINEAR_PROBE),  # 0: the whole fine-tuning split.
    ("probe.l2_grid", items(POSITIVE), LINEAR_PROBE),
    ("probe.l2_bracket", COUNT, LINEAR_PROBE),
    ("probe.validation_fraction", FRACTION, LINEAR_PROBE),
    ("probe.max_iterations", POSITIVE_INT, LINEAR_PROBE),
    ("probe.tolerance", POSITIVE, LINEAR_PROBE),
    ("finetune.batch_size", POSITIVE_INT),
    ("finetune.batch_size", lambda c: integer(1, c.data.finetune_examples,
                                              "data.finetune_examples"), FASHION),
    ("finetune.warmup_steps", COUNT),
    ("finetune.warmup_fraction", number("[0, 1)")),  # Of each member's steps; 0: warmup_steps.
    ("finetune.grad_clip", POSITIVE),
    ("finetune.checkpoint_every_steps", POSITIVE_INT),
    ("finetune.log_every_steps", POSITIVE_INT),
    ("finetune.weight_decay_mask", one_of("all", "matrices")),
    # A released sweep may hold model_0 only (scripts/import_official.py); a trained one not.
    ("sweep.num_members", lambda c: integer(0 if RELEASED(c) else 1)),
    ("sweep.seed", SEED),
    ("sweep.only", lambda c: member_indices(c.sweep.num_members)),
    ("sweep.lr", pair(POSITIVE)),                     # Log-uniform: lo > 0.
    # GLUE's sweep: one value for every member; elsewhere log-uniform (lo > 0).
    ("sweep.weight_decay", lambda c: UNIT if GLUE(c) else pair(number("(0, 1]"))),
    ("sweep.lr_choices", items(POSITIVE)),
    ("sweep.batch_size_choices", items(POSITIVE_INT)),
    ("sweep.epoch_choices", items(POSITIVE_INT)),
    ("sweep.epochs", pair(POSITIVE_INT)),
    ("sweep.label_smoothing", pair(UNIT)),
    ("sweep.mixup", pair(NON_NEGATIVE)),              # Beta(alpha, alpha)'s alpha: may pass 1.
    ("sweep.aug_strength", pair(UNIT)),
    ("sweep.p_zero_smoothing", UNIT),
    ("sweep.p_zero_mixup", UNIT),
    ("sweep.p_no_aug", UNIT),
    ("sweep.randaug_m", pair(COUNT)),
    ("sweep.randaug_n_probs", items(NON_NEGATIVE)),
    ("sweep.randaug_n_probs", Rule("probabilities with a positive sum", lambda v: sum(v) > 0)),
    ("eval.batch_size", POSITIVE_INT),
    ("eval.group_size", COUNT),  # 0: as many models as the devices hold.
    # config.soups: checked after these, from the recipes' declarations (soups_fields).
    ("report.bootstrap_resamples", POSITIVE_INT),
    ("report.analysis", BOOL),
    ("report.landscape_grid", integer(2)),
    ("report.landscape_examples", COUNT),  # 0: the whole held-out split.
)



def setting_rule(setting: recipes.Setting) -> Rule:
  """A recipe setting's rule, read from its declaration (soup/recipes.py)."""
  if setting.allowed():
    return one_of(*setting.allowed())
  if setting.type is bool:
    return BOOL
  if setting.type is int:
    if not setting.interval:
      return Rule("an integer", _is_int)
    lo, hi = (t.strip() for t in setting.interval[1:-1].split(","))
    return integer(int(lo) + (setting.interval[0] == "("),
                   None if hi == "inf" else int(hi) - (setting.interval[-1] == ")"))
  if setting.type in (float, tuple):  # A tuple: of numbers, each in the interval.
    item = number(setting.interval) if setting.interval else Rule("a finite number", _is_real)
    return items(item) if setting.type is tuple else item
  return Rule(f"a {setting.type.__name__}", lambda v: isinstance(v, setting.type))


def _read_by_recipes(setting: recipes.Setting) -> When:
  """A setting is read if it is shared or a recipe of config.soups.recipes declares it."""
  def holds(c) -> bool:
    run = [recipes.REGISTRY[r] for r in c.soups.recipes if r in recipes.REGISTRY]
    return setting in recipes.SHARED or any(setting in r.settings for r in run)
  return When(holds, "no recipe of config.soups.recipes reads it")


def soups_fields() -> list[tuple]:
  """FIELDS' rows for config.soups: every setting the recipe registry declares."""
  return [(f"soups.{s.path}", setting_rule(s), _read_by_recipes(s)) for s in recipes.settings()]


# Batches split over the mesh's data axis (soup/mesh.py: one axis over every device).
PER_DEVICE: tuple[tuple, ...] = (
    ("upstream.batch_size", UPSTREAM),
    ("finetune.batch_size", ALWAYS),
    ("eval.batch_size", ALWAYS),
)

_MISSING = object()


def _get(config, path: str):
  node = config
  for key in path.split("."):
    if not hasattr(node, "keys") or key not in node:
      return _MISSING
    node = node[key]
  return node


def _applies(config, when) -> bool:
  """Whether a row's condition holds; one reading a field this config lacks does not."""
  try:
    return bool(when(config))
  except (AttributeError, KeyError, TypeError):
    return False


def _refuse(path: str, rule: Rule, value, unread: str = "") -> None:
  suggestion = rule.suggest(value)
  fix = (f"e.g. --config.{path}={shlex.quote(str(suggestion))}" if suggestion is not None
         else f"set --config.{path} to such a value")
  where = (f" (this run does not read it, as {unread}, but no run could use this value)"
           if unread else "")
  raise ConfigError(f"config.{path} must be {rule.describe}, got {value!r}{where}; {fix}.")


def check_fields(config, num_devices: Optional[int] = None) -> dict[str, str]:
  """Every row of FIELDS and soups_fields (and, given the number of devices, of PER_DEVICE)
  the config has. Returns the fields this run will not read: {path: why}.

  A plain Rule is checked wherever the field sits; a rule made from the config (or the
  devices') only where the field is read.
  """
  rows = [*FIELDS, *soups_fields()]
  if num_devices is not None:  # Contextual: a batch unread here may suit other devices.
    rows += [(path, lambda c, rule=multiple_of(num_devices): rule, when)
             for path, when in PER_DEVICE]
  read, unread = set(), {}
  for path, rule, *when in rows:
    value = _get(config, path)
    if value is _MISSING:
      continue
    condition = when[0] if when else ALWAYS
    if _applies(config, condition):
      read.add(path)
      why = ""
    else:
      why = (condition.why_not(config) if isinstance(condition, When) else ""
             ) or "its condition does not hold"
      unread.setdefault(path, why)
    if not isinstance(rule, Rule):
      if why:
        continue
      try:
        rule = rule(config)
      except (AttributeError, KeyError, TypeError):
        continue  # It reads a field this config lacks.
    if not rule.ok(value):
      _refuse(path, rule, value, why)
  return {path: why for path, why in unread.items() if path not in read}


def warn_ignored(config) -> None:
  """One warning naming the fields this run will not read, grouped by why (soup/main.py
  calls it once, after every check and before compute)."""
  by_reason: dict[str, dict[str, list[str]]] = {}  # why -> block -> its fields.
  for path, why in check_fields(config).items():
    block, _, field = path.rpartition(".")
    by_reason.setdefault(why, {}).setdefault(block, []).append(field)

  def fields(block: str, names: list[str]) -> str:
    prefix = f"config.{block}." if block else "config."
    return prefix + (names[0] if len(names) == 1 else "{" + ", ".join(names) + "}")

  if by_reason:
    log.warning("ignored by this run (set, but not read): %s.", "; ".join(
        ", ".join(fields(b, names) for b, names in blocks.items()) + f" ({why})"
        for why, blocks in by_reason.items()))


def check_devices(config, num_devices: int) -> None:
  """The batches split over the mesh (soup/main.py calls this once the devices are known)."""
  check_fields(config, num_devices)
  choices = _get(config, "sweep.batch_size_choices")
  if choices is not _MISSING:
    rule = items(multiple_of(num_devices))
    if not rule.ok(choices):
      raise ConfigError(f"config.sweep.batch_size_choices={tuple(choices)!r}: each must be "
                        f"{multiple_of(num_devices).describe}.")


STAGES = layout.STAGES  # Kept here too: soup/experiment.py imports it from this module.


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
  upstream ingredient, model_0); what a dataset needs is its registry entry's
  `missing` (soup/data/registry.py).
  """
  try:
    missing = datasets.get(config.data.name).missing(config.data, stages)
  except datasets.UnknownDatasetError as e:
    raise ConfigError(str(e)) from e
  if missing:
    raise ConfigError(missing)
  if config.init.source not in ("upstream", "pretrained"):
    raise ConfigError(f"config.init.source={config.init.source!r}: use 'upstream' or "
                      "'pretrained'.")
  makes_models = bool(set(layout.MODEL_STAGES) & set(stages))
  has = lambda folder: (workdir / folder / layout.INGREDIENT_FILE).exists()
  needed = []
  if (config.init.source == "pretrained" and makes_models
      and not has(layout.UPSTREAM_INGREDIENT)):
    needed.append("path")
  initialization = layout.ingredient(layout.INITIALIZATION)
  if config.probe.kind == "zeroshot" and makes_models and not has(initialization):
    needed.append("bpe_path")
  for key in needed:
    value = config.init.get(key, "")
    if not value or not _path(value).exists():
      raise ConfigError(f"config.init.{key}={value!r} does not exist; download the weights "
                        f"there or set --config.init.{key}=...")
  if config.model.name == "bert":
    check_bert(config)


def check_bert(config) -> None:
  """A BERT config's checkpoint folder, its length limit and its tokenizer agree (reads only
  config.json and tokenizer.json's vocabulary, never the weights)."""
  from soup.models import bert
  folder = config.model.get("checkpoint", "")
  how = ("scripts/get_minilm.sh puts all-MiniLM-L6-v2 in ~/checkpoints; any Hugging Face BERT "
         "folder works, set --config.model.checkpoint=DIR")
  try:
    for name in ("config.json", "model.safetensors"):
      bert._file(folder, name)
    model = bert.read_config(folder)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"config.model.checkpoint: {e} ({how}).") from e
  if config.data.name == "glue":
    if config.data.max_length > model.max_position_embeddings:
      raise ConfigError(f"config.data.max_length={config.data.max_length} exceeds the "
                        f"{model.max_position_embeddings} position embeddings of {folder}; e.g. "
                        f"--config.data.max_length={model.max_position_embeddings}.")
    from tokenizers import Tokenizer
    try:
      vocab = Tokenizer.from_file(str(_path(config.data.tokenizer))).get_vocab_size()
      bert.check_tokenizer(vocab, model)
    except ValueError as e:
      raise ConfigError(f"config.data.tokenizer: {e}") from e
    except Exception as e:  # tokenizers raises its own exception type for a malformed file.
      raise ConfigError(f"config.data.tokenizer={config.data.tokenizer!r} is not a "
                        f"tokenizer.json ({e}).") from e


def check(config, sweep_fn: Callable[[Any], list[dict]], stages: tuple[str, ...],
          workdir: Path, num_devices: Optional[int] = None) -> None:
  """Every check that needs no data and no compute (the batches' split over the devices too,
  given num_devices; soup/main.py checks that with check_devices once jax knows them)."""
  check_fields(config, num_devices)  # First: get_sweep below reads the sweep's ranges.
  try:
    recipes.check(config.soups)
  except recipes.RecipeConfigError as e:
    raise ConfigError(str(e)) from e
  try:
    sharding.check_rules(config.get("sharding_rules", ()))
  except sharding.ShardingRuleError as e:
    raise ConfigError(str(e)) from e
  try:
    members = sweep_fn(config)
    sweep_lib.check_members(members, "the config's get_sweep(config)")
  except sweep_lib.SweepError as e:
    raise ConfigError(str(e)) from e
  if config.data.name == "glue":  # Token ids can be neither mixed nor augmented.
    for i, member in enumerate(members):
      if member.get("mixup", 0) or member.get("aug_strength", 0):
        raise ConfigError(f"get_sweep(config): member {i + 1} asks for mixup="
                          f"{member.get('mixup')} or aug_strength={member.get('aug_strength')} "
                          "on a text task; both must be 0.")
  if stages:
    check_paths(config, stages, Path(workdir))
