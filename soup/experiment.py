"""One model-soup run, top to bottom: pretrain, probe, sweep, evaluate, soups, report.

`run` reads in the order things happen, cut by banner comments. Each stage is
a plain function whose inputs are its arguments: a stage that needs an earlier
stage's output gets it as an argument from `run`, so the dependencies are on
the page. Every stage skips what the workdir already holds (soup/workdir.py),
so a rerun redoes only what is missing, and any stage can run alone
(--config.stages=evaluate): an input it needs that is not on disk yet is made
by the stage that owns it.

The files a run goes through, in the order it reaches them: README.md, "How a run
flows" (a test keeps that list equal to what a run imports).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from soup import (
  analysis_figures,
  atomic_io,
  checkpoints,
  claims,
  evaluate as evaluate_lib,
  layout,
  recipes,
  report as report_lib,
  results,
  sharding as sharding_lib,
  soups,
  stats,
  train,
  trees,
)
from soup.data import batching
from soup.ingredients import IngredientStore
from soup.layout import STAGES
from soup.linear_probe import DEFAULT_L2_BRACKET, fit_probe
from soup.models import pretrained
from soup.recipes import Name
from soup.resources import Resources
from soup.workdir import Workdir, content_key, eval_settings

log = logging.getLogger(__name__)
PyTree = Any


def run(config, workdir: str | Path, sweep_fn: Callable[[Any], list[dict]],
        stages=STAGES) -> Optional[dict]:
  """Runs the given stages in order; returns the report when it ran."""
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ValueError(f"Unknown stages {unknown}; choose from {STAGES}.")
  recipes.check(config.soups)

  # --- Setup: the workdir, its guard, the frozen sweep, lazy data and model ----
  wd = Workdir(workdir)
  wd.check_config(config)
  res = Resources(config)
  frozen = wd.freeze_sweep(sweep_fn(config))
  members = dict(zip(layout.member_names(len(frozen)), frozen))  # model_1.. -> hyperparameters
  store = IngredientStore(wd, config.soups, res.expected_param_shapes, res.layout)
  all_models = [layout.INITIALIZATION, *members]

  # Each earlier stage's output, made (or read back) only when a later stage needs it.
  def backbone():
    return pretrain(config, wd, res)

  def initialization():
    return probe(config, wd, res, backbone)

  # --- Stage 1: upstream pretraining -> upstream/ingredient ---------------------
  if "pretrain" in stages:
    with _stage("pretrain"):
      backbone()

  # --- Stage 2: linear probe (or zero-shot head) -> model_0 ---------------------
  if "probe" in stages:
    with _stage("probe"):
      initialization()

  # --- Stage 3: the fine-tuning sweep -> model_1..model_N -----------------------
  if "sweep" in stages:
    with _stage("sweep"):
      sweep(config, wd, res, members, initialization)

  # --- Stage 4: logits of every usable model -> eval/<name>.npz -----------------
  if "evaluate" in stages:
    with _stage("evaluate"):
      evaluate(config, wd, res, store, all_models)

  # --- Stage 5: soups and baselines -> soups/<recipe>.json ----------------------
  rows = None
  if "soups" in stages or "report" in stages:  # The report reads the soups' rows.
    with _stage("soups"):
      rows = (model_rows(config, wd, res, store, all_models, members)
              + soup_rows(config, wd, res, store, all_models))

  # --- Stage 6: results.jsonl, report.md, figure.png ----------------------------
  if "report" in stages:
    with _stage("report"):
      labels = ({c: split.labels for c, split in res.splits().items()}
                if res.columns.metric != "accuracy" else None)
      add_intervals(config, res.columns, rows, labels)
      figures = analysis_figures.build(config, wd, res, store, all_models, rows)
      return report(wd, res.columns, rows, figures)
  return None


def record_reads(workdir: str | Path) -> None:
  """reads.process<k>.json: the bytes this process read of each ingredient (a process of a
  sharded run reads only its devices' shards)."""
  atomic_io.atomic_write_text(Path(workdir) / layout.reads_file(jax.process_index()),
                              json.dumps(checkpoints.bytes_read(), indent=1, sort_keys=True))


@contextlib.contextmanager
def _stage(name: str):
  t = time.time()
  log.info("stage %s", name)
  yield
  log.info("stage %s done in %.1fs", name, time.time() - t)


# --- Stage 1: upstream pretraining ----------------------------------------------


def pretrain(config, wd: Workdir, res: Resources) -> PyTree:
  """The shared pretrained backbone: trained upstream here, or imported weights."""
  out = wd.upstream
  if checkpoints.is_ingredient(out / layout.INGREDIENT):
    return checkpoints.load_ingredient(out / layout.INGREDIENT)
  if config.init.source == "pretrained":
    params = pretrained.load_pretrained(config)
    checkpoints.save_ingredient(out / layout.INGREDIENT, params, {"source": config.init.path})
    return params
  cfg, split = config.upstream, res.task.upstream
  objective = cfg.get("objective", "supervised")
  if objective not in ("supervised", "simclr"):
    raise ValueError(f"config.upstream.objective={objective!r}: use 'supervised' or 'simclr'.")
  task, rules = res.task, config.get("sharding_rules", ())
  sample = task.preprocess(jnp.asarray(split.images[:2]))
  steps = cfg.epochs * batching.steps_per_epoch(len(split), cfg.batch_size)
  hyper = train.Hyper(lr=cfg.lr, weight_decay=cfg.weight_decay, aug_strength=cfg.aug_strength,
                      total_steps=steps, warmup_steps=cfg.warmup_steps)
  if objective == "simclr":
    # No label is read: InfoNCE over two views (soup/contrastive.py); the head is dropped.
    # Imported here: only a run that pretrains with SimCLR reads that module.
    from soup import contrastive
    # The task's preprocessing on both views; the fine-tunes' clip; decay on matrices only.
    model = res.model(0)
    features = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    params = contrastive.init_params(model.init(jax.random.key(config.seed), sample)["params"],
                                     config.model.width, cfg.projection_hidden,
                                     cfg.projection_out, config.seed)
    fns = contrastive.make_step(features, task.preprocess, temperature=cfg.temperature,
                                hidden=cfg.projection_hidden, out=cfg.projection_out,
                                grad_clip=config.finetune.grad_clip, weight_decay_mask="matrices",
                                crop_scale=(cfg.crop_min_scale, 1.0), jitter=cfg.jitter)
    info = {"objective": "simclr", "images": len(split), "labels": "none",
            "temperature": cfg.temperature}
  else:
    # The task's augmentation and preprocessing; a fixed clip of 1.0 and decay on matrices
    # only (config.upstream has no field for either).
    num_classes = int(split.labels.max()) + 1
    model = res.model(num_classes)
    params = model.init(jax.random.key(config.seed), sample)["params"]
    fns = train.make_train_step(lambda p, x: model.apply({"params": p}, x), num_classes,
                                augment_fn=task.augment, preprocess_fn=task.preprocess,
                                grad_clip=1.0, weight_decay_mask="matrices")
    info = {"objective": "supervised", "images": len(split),
            "labels": config.data.get("upstream_labels", "fine"), "classes": num_classes}
  outcome = train.train(
      step=train.compile_step(fns, params, res.mesh, rules), params=params, hyper=hyper,
      batch_fn=lambda s: batching.train_batch(split, cfg.batch_size, config.seed, s),
      workdir=out, seed=config.seed, checkpoint_every=config.finetune.checkpoint_every_steps,
      description="upstream")
  backbone = outcome.params
  if objective == "simclr":
    backbone = {k: v for k, v in backbone.items() if k != "projection"}
  if outcome.diverged:
    raise train.TrainingDiverged("Upstream pretraining diverged; lower config.upstream.lr.")
  checkpoints.save_ingredient(out / layout.INGREDIENT, backbone, info)
  return backbone


# --- Stage 2: linear probe -> model_0 -------------------------------------------


def probe(config, wd: Workdir, res: Resources, upstream: Callable[[], PyTree]) -> PyTree:
  """model_0: the upstream backbone with a linear-probe (or zero-shot) head."""
  path = wd.ingredient_dir(layout.INITIALIZATION)
  if checkpoints.is_ingredient(path):
    return soups.restore(path, res.layout)  # Each process reads only its devices' shards.
  cfg = config.probe
  backbone = {k: v for k, v in upstream().items() if k != "head"}
  if cfg.kind == "zeroshot":
    head, info = pretrained.zeroshot_head(config), {}
  elif cfg.kind == "random_head":
    # A fresh classifier drawn ONCE (config.seed) as BertForSequenceClassification draws it:
    # N(0, init_std) kernel, zero bias. Every member starts from model_0, head included,
    # which is what makes their average meaningful.
    shapes = res.expected_param_shapes()["head"]
    rng = np.random.default_rng([config.seed, 2022])
    head = {"kernel": (cfg.init_std * rng.standard_normal(shapes["kernel"].shape)).astype(
        np.float32), "bias": np.zeros(shapes["bias"].shape, np.float32)}
    info = {"init_std": cfg.init_std, "seed": config.seed}
  elif cfg.kind == "linear_probe":
    model, preprocess = res.model(res.num_classes), res.task.preprocess
    feature_fn = jax.jit(
        lambda p, x: model.apply({"params": p}, preprocess(x), return_features=True))
    images, labels = res.task.finetune_examples(cfg.examples or res.task.finetune_size())
    bs = config.eval.batch_size
    feats = np.concatenate([np.asarray(feature_fn(backbone, images[i:i + bs]))
                            for i in range(0, len(images), bs)])
    fit = fit_probe(feats, labels, res.num_classes, l2_grid=cfg.l2_grid,
                    l2_bracket=cfg.get("l2_bracket", DEFAULT_L2_BRACKET),
                    validation_fraction=cfg.validation_fraction,
                    max_iterations=cfg.max_iterations, tolerance=cfg.tolerance, seed=config.seed)
    head, info = fit.head, fit.info(cfg.l2_grid)
  else:
    raise ValueError(f"config.probe.kind must be 'linear_probe', 'zeroshot' or 'random_head', "
                     f"got {cfg.kind!r}.")
  params = {**backbone, "head": head}
  if res.layout.is_sharded:  # Saved as the sweep's members are: shard by shard.
    shardings = trees.unflatten(res.layout.output_shardings(trees.flatten_with_names(params)))
    params = sharding_lib.put(params, shardings)
  checkpoints.save_ingredient(path, params, {"recipe": Name.INITIALIZATION, "probe": info,
                                             "info": f"{cfg.kind} initialization"})
  return params


# --- Stage 3: the fine-tuning sweep ---------------------------------------------


def sweep(config, wd: Workdir, res: Resources, members: dict[str, dict],
          initialization: Callable[[], PyTree]) -> None:
  """Fine-tunes every member not yet saved (or those in config.sweep.only) from model_0."""
  only = {int(i) for i in str(config.sweep.only).split(",") if i.strip()}
  todo = [(i, name) for i, name in enumerate(members) if (not only or i + 1 in only)
          and not checkpoints.is_ingredient(wd.ingredient_dir(name))]
  if not todo:
    return
  init = initialization()
  cfg, task, num_classes = config.finetune, res.task, res.num_classes
  model = res.model(num_classes)
  apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  # Every member: the task's augmentation and preprocessing, the config's clip and decay mask.
  fns = train.make_train_step(apply_fn, num_classes, augment_fn=task.augment,
                              preprocess_fn=task.preprocess, grad_clip=cfg.grad_clip,
                              weight_decay_mask=cfg.weight_decay_mask)
  # One compile for every member, in the state layout of config.sharding_rules (soup/sharding.py).
  step = train.compile_step(fns, init, res.mesh, config.get("sharding_rules", ()))
  for n, (_, name) in enumerate(todo):
    hp = members[name]
    # A sweep may draw the batch size per member (GLUE's); the step compiles once per shape.
    batch_size = hp.get("batch_size", cfg.batch_size)
    total = hp["epochs"] * batching.steps_per_epoch(task.finetune_size(), batch_size)
    warmup = (round(cfg.warmup_fraction * total) if cfg.get("warmup_fraction")
              else min(cfg.warmup_steps, total // 2))
    hyper = train.Hyper(lr=hp["lr"], weight_decay=hp["weight_decay"],
                        label_smoothing=hp["label_smoothing"], mixup=hp["mixup"],
                        aug_strength=hp["aug_strength"], total_steps=total, warmup_steps=warmup)
    log.info("sweep %d/%d: %s %s", n + 1, len(todo), name, hp)
    outcome = train.train(
        step=step, params=init, hyper=hyper, workdir=wd.model_dir(name), seed=hp["seed"],
        batch_fn=lambda s, hp=hp, bs=batch_size: task.finetune_batch(bs, hp["seed"], s, hp),
        checkpoint_every=cfg.checkpoint_every_steps, log_every=cfg.log_every_steps,
        description=f"{name} ({n + 1}/{len(todo)})")
    checkpoints.save_ingredient(wd.ingredient_dir(name), outcome.params,
                                {"recipe": Name.INDIVIDUAL, "hparams": hp,
                                 "diverged": outcome.diverged, "final_loss": outcome.final_loss})


# --- Stage 4: evaluation of every model -----------------------------------------


def model_logits(config, wd: Workdir, res: Resources, store: IngredientStore,
                 name: str) -> dict[str, np.ndarray]:
  """Logits of one ingredient on every split, cached under its content key."""
  key = wd.logits_key(name, config)
  logits = wd.read_logits(name, key)
  if logits is None:
    logits = res.evaluate(store.load(name))
    wd.write_logits(name, key, logits)
  return logits


def eval_groups(res: Resources, items: Sequence) -> list[Sequence]:
  """`items` cut into groups of Resources.eval_group_size: each split is read once a group."""
  size = res.eval_group_size(len(items))
  return [items[i:i + size] for i in range(0, len(items), size)]


def evaluate(config, wd: Workdir, res: Resources, store: IngredientStore,
             names: list[str]) -> None:
  """Logits of every usable model not cached yet, a group of models at a time
  (config.eval.group_size): each split is read (ImageNet: decoded) once per group, not once
  per model. Each model's logits are written when its group is done, under model_logits's
  key, so a stopped stage redoes only the missing models."""
  from tqdm.auto import tqdm
  usable, _ = store.usable(names)
  keys = {name: wd.logits_key(name, config) for name in usable}
  missing = [name for name in usable if not wd.has_logits(name, keys[name])]
  if not missing:
    return
  groups = eval_groups(res, missing)
  for group in tqdm(groups, desc=f"evaluate ({len(groups[0])} models a pass)", unit="group",
                    leave=False):
    for name, logits in zip(group, res.evaluate_many([store.load(n) for n in group])):
      wd.write_logits(name, keys[name], logits)


# --- Stage 5: soups and baselines -----------------------------------------------


def evaluate_in_groups(res: Resources, makers: Sequence[Callable[[], PyTree]]
                       ) -> list[dict[str, np.ndarray]]:
  """Logits of the params each of `makers` builds, on every split: the evaluate stage's
  groups, each group's params built only when it runs."""
  return [logits for group in eval_groups(res, makers)
          for logits in res.evaluate_many([make() for make in group])]


def model_rows(config, wd: Workdir, res: Resources, store: IngredientStore, names: list[str],
               members: dict[str, dict]) -> list[dict]:
  """One row per usable model: the initialization and the individual fine-tunes."""
  usable, _ = store.usable(names)
  return [res.row(n, Name.INITIALIZATION if n == layout.INITIALIZATION else Name.INDIVIDUAL,
                  model_logits(config, wd, res, store, n), [n], 1,
                  **({"hparams": members[n]} if n in members else {}))
          for n in usable]


def soup_rows(config, wd: Workdir, res: Resources, store: IngredientStore,
              names: list[str]) -> list[dict]:
  """Every recipe of config.soups.recipes, in order; rows reused when their inputs match."""
  cfg = config.soups
  names, excluded = store.usable(names)
  if not cfg.include_initialization:
    names = [n for n in names if n != layout.INITIALIZATION]
  held = res.splits()[res.columns.held_out]
  scores = {n: held.score(model_logits(config, wd, res, store, n)[res.columns.held_out])
            for n in names}
  # Several soups are evaluated on every split: streamed splits (ImageNet's) are decoded
  # once and kept, if they fit in the host's share (soup/evaluate.py host_free_bytes).
  kept = res.task.keep_eval_decoded(evaluate_lib.host_free_bytes())
  if kept:
    log.info("soups: the streamed evaluation splits decoded once and kept in memory "
             "(%.2f GiB)", kept / 2**30)
  settings = {k: v for k, v in json.loads(cfg.to_json()).items() if k != "recipes"}
  kitchen = recipes.Kitchen(
      config=cfg, seed=config.seed, workdir=wd, names=names, scores=scores,
      columns=res.columns, splits=tuple(res.splits()), held_out=held, mesh=res.mesh,
      layout=res.layout,
      load=store.load, logits=lambda n: model_logits(config, wd, res, store, n),
      evaluate=res.evaluate, held_out_accuracy=res.held_out_accuracy, apply_fn=res.apply_fn,
      row=res.row, task=res.task, evaluate_many=lambda makers: evaluate_in_groups(res, makers))
  rows = []
  for name in cfg.recipes:
    recipe = recipes.REGISTRY[name]
    # The rows' inputs: the ingredients' bytes, the data, every soup setting, and the
    # soups this recipe reads.
    key = content_key({
        "recipe": name, "settings": settings, "seed": config.seed, "eval": eval_settings(config),
        "ingredients": {n: wd.fingerprint_digest(wd.ingredient_dir(n)) for n in names},
        "needs": {d: wd.fingerprint_digest(wd.soup_dir(d)) for d in recipe.needs(cfg)}})
    cached = wd.read_rows(name, key)
    if cached is not None:
      rows.extend(cached)
      continue
    log.info("soup recipe: %s over %d ingredients", name, len(names))
    t = time.time()
    new = recipe.make(kitchen)
    for r in new:
      r.update(ingredients_considered=names, excluded=excluded, soup_settings=settings,
               seconds=round(time.time() - t, 2))
    wd.write_rows(name, key, new)
    rows.extend(new)
  return rows


# --- Stage 6: results and report ------------------------------------------------


def add_intervals(config, columns: results.Columns, rows: list[dict],
                  labels: Optional[dict[str, np.ndarray]] = None) -> None:
  """Paired bootstrap 95% intervals of every row against the best individual (soup/claims.py);
  `labels` (column -> labels) for a metric other than accuracy."""
  correct = {r["model_name"]: {c: stats.unpack_correct(p) for c, p in r["correct"].items()}
             for r in rows if r.get("correct")}
  resamples = config.get("report", {}).get("bootstrap_resamples", stats.NUM_RESAMPLES)
  claims.add_intervals(rows, correct, columns, seed=config.seed, num_resamples=resamples,
                       labels=labels)


def report(wd: Workdir, columns: results.Columns, rows: list[dict],
           figures: Optional[dict[str, str]] = None) -> dict:
  # Per-example correctness stays in the soups' caches; the intervals it gave are in the rows.
  results.write(wd.root / layout.RESULTS,
                [{k: v for k, v in r.items() if k != "correct"} for r in rows])
  built = report_lib.build_report(results.read(wd.root / layout.RESULTS, recipes.infer_recipe),
                                  columns)
  built["figures"] = dict(figures or {})
  atomic_io.atomic_write_text(wd.root / layout.REPORT, report_lib.render_markdown(built))
  report_lib.plot_figure(rows, columns, wd.root / layout.FIGURE)
  return built
