"""The model-soup experiment in stages: pretrain, probe, sweep, evaluate, soups, report.

Every stage writes its outputs under the workdir atomically and skips what is
already there, so a rerun (after a crash, a kill or an added recipe) redoes
only what is missing. Layout:
  config.json                 the config that made this workdir
  upstream/                   pretraining run (train_state/, logs/) and ingredient/
  models/model_<k>/           model_0 = linear probe; model_1.. = sweep members:
                              ingredient/ (params-only Orbax), train_state/, logs/
  eval/model_<k>.npz          logits on every split; eval/model_<k>.json accuracies
  soups/<name>.json           one results row per soup or baseline
  results.jsonl, report.md, figure.png
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from soup import checkpoints, evaluate, mesh as mesh_lib, results, train
from soup.linear_probe import fit_linear_probe
from soup import soups as soup_lib
from soup.data import pipeline

log = logging.getLogger(__name__)

PyTree = Any
STAGES = ("pretrain", "probe", "sweep", "evaluate", "soups", "report")
# Keys a rerun may change without invalidating what the workdir holds.
MUTABLE_KEYS = ("stages", "sweep.only", "sweep.num_members", "soups", "data.data_dir",
                "data.idx_dir", "eval.batch_size", "data.objectnet_dir", "data.num_workers",
                "data.cache_dir", "data.heldout_in_memory", "init.bpe_path")


class WorkdirMismatchError(ValueError):
  pass


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def check_workdir(config, workdir: Path) -> None:
  """Records the config; refuses a workdir made by a different experiment."""
  path = workdir / "config.json"
  current = json.loads(config.to_json())
  if path.exists():
    saved = _flatten(json.loads(path.read_text()))
    now = _flatten(current)
    differ = sorted(k for k in saved.keys() | now.keys()
                    if saved.get(k) != now.get(k)
                    and not any(k == m or k.startswith(m + ".") for m in MUTABLE_KEYS))
    if differ:
      details = "; ".join(f"{k}: {saved.get(k)!r} in the workdir, {now.get(k)!r} now" for k in differ[:6])
      raise WorkdirMismatchError(
          f"{workdir} was made by a different config ({details}). Its results would mix two "
          "experiments: use a new --workdir, or drop those overrides. Nothing was changed.")
  results.atomic_write_text(path, json.dumps(current, indent=1, sort_keys=True))


class Experiment:
  """Holds the data, model and mesh; each stage is a method."""

  def __init__(self, config, workdir: str | Path, sweep_fn: Callable[[Any], list[dict]]):
    self.config = config
    self.workdir = Path(workdir).absolute()
    self.sweep_fn = sweep_fn
    self.workdir.mkdir(parents=True, exist_ok=True)
    check_workdir(config, self.workdir)
    self.mesh = mesh_lib.make_mesh()
    self._task = None
    self._evaluator = None
    self._verified: set[str] = set()  # Ingredients whose data passed load_model.

  # --- Data and model ---------------------------------------------------

  @property
  def task(self):
    """The dataset behind the experiment (see soup/data/task.py), built on first use."""
    if self._task is None:
      t = time.time()
      self._task = make_task(self.config.data)
      log.info("data ready in %.1fs", time.time() - t)
    return self._task

  @property
  def columns(self) -> results.Columns:
    return task_columns(self.config.data)

  @property
  def num_classes(self) -> int:
    return self.task.num_classes

  def eval_splits(self):
    """Column name -> EvalSplit, in the results' column order."""
    return self.task.eval_splits()

  def model(self, num_classes: int):
    from soup import models
    return models.build(self.config.model, num_classes)

  def apply_fn(self, num_classes: Optional[int] = None) -> Callable:
    model = self.model(num_classes or self.num_classes)
    preprocess = self.task.preprocess
    return lambda params, images: model.apply({"params": params}, preprocess(images))

  def held_out_accuracy(self, params: PyTree) -> float:
    split = self.eval_splits()[self.columns.held_out]
    return split.accuracy(self.evaluator.logits_of_batches(params, split.iterate(self.config.eval.batch_size)))

  @property
  def evaluator(self) -> evaluate.Evaluator:
    if self._evaluator is None:
      self._evaluator = evaluate.Evaluator(self.apply_fn(), self.mesh, self.config.eval.batch_size)
    return self._evaluator

  def ingredient_dir(self, name: str) -> Path:
    return self.workdir / "models" / name / "ingredient"

  # --- Stage 1: upstream pretraining ------------------------------------

  def pretrain(self) -> PyTree:
    """The shared pretrained backbone: trained upstream here, or imported weights."""
    out = self.workdir / "upstream"
    if checkpoints.is_ingredient(out / "ingredient"):
      return checkpoints.load_ingredient(out / "ingredient")
    if self.config.init.source == "pretrained":
      from soup.models import pretrained
      params = pretrained.load_pretrained(self.config)
      checkpoints.save_ingredient(out / "ingredient", params, {"source": self.config.init.path})
      return params
    cfg, split = self.config.upstream, self.task.upstream
    num_classes = int(split.labels.max()) + 1
    model = self.model(num_classes)
    params = model.init(jax.random.key(self.config.seed),
                        self.task.preprocess(jnp.asarray(split.images[:2])))["params"]
    steps = cfg.epochs * pipeline.steps_per_epoch(len(split), cfg.batch_size)
    hyper = train.Hyper(lr=cfg.lr, weight_decay=cfg.weight_decay, aug_strength=cfg.aug_strength,
                        total_steps=steps, warmup_steps=cfg.warmup_steps)
    outcome = train.train(
        apply_fn=lambda p, x: model.apply({"params": p}, x), params=params, hyper=hyper,
        num_classes=num_classes, mesh=self.mesh, workdir=out, seed=self.config.seed,
        batch_fn=lambda s: pipeline.train_batch(split, cfg.batch_size, self.config.seed, s),
        augment_fn=self.task.augment, preprocess_fn=self.task.preprocess,
        checkpoint_every=self.config.finetune.checkpoint_every_steps, description="upstream")
    if outcome.diverged:
      raise train.TrainingDiverged("Upstream pretraining diverged; lower config.upstream.lr.")
    checkpoints.save_ingredient(out / "ingredient", outcome.params, {"task": "coarse-4"})
    return outcome.params

  # --- Stage 2: linear probe -> model_0 ---------------------------------

  def probe(self) -> PyTree:
    path = self.ingredient_dir("model_0")
    if checkpoints.is_ingredient(path):
      return checkpoints.load_ingredient(path)
    upstream = self.pretrain()
    cfg = self.config.probe
    backbone = {k: v for k, v in upstream.items() if k != "head"}
    if cfg.kind == "zeroshot":
      from soup.models import pretrained
      head = pretrained.zeroshot_head(self.config)
    elif cfg.kind == "linear_probe":
      model, preprocess = self.model(self.num_classes), self.task.preprocess
      feature_fn = jax.jit(lambda p, x: model.apply({"params": p}, preprocess(x), return_features=True))
      images, labels = self.task.finetune_examples(cfg.examples or self.task.finetune_size())
      bs = self.config.eval.batch_size
      feats = np.concatenate([np.asarray(feature_fn(backbone, images[i:i + bs]))
                              for i in range(0, len(images), bs)])
      head = fit_linear_probe(feats, labels, self.num_classes, cfg.epochs, cfg.batch_size, cfg.lr,
                              cfg.weight_decay, self.config.seed)
    else:
      raise ValueError(f"config.probe.kind must be 'linear_probe' or 'zeroshot', got {cfg.kind!r}.")
    params = {**backbone, "head": head}
    checkpoints.save_ingredient(path, params, {"recipe": "initialization", "info": f"{cfg.kind} initialization"})
    return params

  # --- Stage 3: the fine-tuning sweep -----------------------------------

  def sweep_members(self) -> list[dict]:
    """The sweep's hyperparameters, frozen in the workdir at first use."""
    path = self.workdir / "sweep.json"
    members = self.sweep_fn(self.config)
    if path.exists():
      saved = json.loads(path.read_text())
      n = min(len(saved), len(members))
      if saved[:n] != members[:n]:
        raise WorkdirMismatchError(
            f"The sweep in {path} differs from the config's sweep function; use a new workdir.")
      if len(members) <= len(saved):
        return saved[: len(members)]
    results.atomic_write_text(path, json.dumps(members, indent=1))
    return members

  def member_names(self) -> list[str]:
    return [f"model_{i + 1}" for i in range(len(self.sweep_members()))]

  def sweep(self) -> None:
    members = self.sweep_members()
    only = {int(i) for i in str(self.config.sweep.only).split(",") if i.strip()}
    todo = [i for i in range(len(members)) if (not only or i + 1 in only)
            and not checkpoints.is_ingredient(self.ingredient_dir(f"model_{i + 1}"))]
    if not todo:
      return
    init = self.probe()
    cfg, task = self.config.finetune, self.task
    model = self.model(self.num_classes)
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    init_state, step_fn = train.make_train_step(apply_fn, self.num_classes, task.augment,
                                                task.preprocess, cfg.grad_clip)
    step_jit = jax.jit(step_fn, donate_argnums=0)  # One compile for every member.
    per_epoch = pipeline.steps_per_epoch(task.finetune_size(), cfg.batch_size)
    for n, i in enumerate(todo):
      hp, name = members[i], f"model_{i + 1}"
      hyper = train.Hyper(lr=hp["lr"], weight_decay=hp["weight_decay"],
                          label_smoothing=hp["label_smoothing"], mixup=hp["mixup"],
                          aug_strength=hp["aug_strength"], total_steps=hp["epochs"] * per_epoch,
                          warmup_steps=min(cfg.warmup_steps, hp["epochs"] * per_epoch // 2))
      log.info("sweep %d/%d: %s %s", n + 1, len(todo), name, hp)
      outcome = train.train(
          apply_fn=apply_fn, params=init, hyper=hyper, num_classes=self.num_classes, mesh=self.mesh,
          workdir=self.workdir / "models" / name, seed=hp["seed"], compiled_step=step_jit,
          batch_fn=lambda s, hp=hp: task.finetune_batch(cfg.batch_size, hp["seed"], s, hp),
          checkpoint_every=cfg.checkpoint_every_steps, log_every=cfg.log_every_steps,
          grad_clip=cfg.grad_clip, description=f"{name} ({n + 1}/{len(todo)})")
      checkpoints.save_ingredient(self.ingredient_dir(name), outcome.params,
                                  {"recipe": "individual", "hparams": hp,
                                   "diverged": outcome.diverged, "final_loss": outcome.final_loss})

  # --- Stage 4: evaluation of every model -------------------------------

  def all_model_names(self) -> list[str]:
    return ["model_0", *self.member_names()]

  def usable_ingredients(self) -> tuple[list[str], dict[str, str]]:
    """Models fit for soups, and the excluded ones with the reason.

    A missing, corrupted, non-finite (diverged) or mismatched ingredient is an
    error or a logged exclusion, per config.soups.on_bad_ingredient.
    """
    names, excluded = [], {}
    reference = self.expected_param_shapes()
    for name in self.all_model_names():
      path = self.ingredient_dir(name)
      try:
        meta = checkpoints.ingredient_metadata(path)["metadata"]
        if meta.get("diverged"):
          raise FloatingPointError(f"{name} diverged (loss {meta.get('final_loss')}).")
        shapes = checkpoints.ingredient_shapes(path)
        try:
          soup_lib.check_compatible(reference, shapes, "the config's model", name)
        except soup_lib.IngredientMismatchError as e:
          if name == "model_0":  # Every member would fail: the model code or config changed.
            raise soup_lib.IngredientMismatchError(
                f"{e} The workdir's models do not fit the current model definition; use a new "
                "workdir (or the code version that made this one).") from e
          raise
        if name not in self._verified:  # Bytes and finiteness too, once per process:
          self.load_model(name)         # a corrupted file is excluded here, not a crash later.
          self._verified.add(name)
      except (checkpoints.CheckpointError, FloatingPointError, soup_lib.IngredientMismatchError) as e:
        if self.config.soups.on_bad_ingredient == "error":
          raise
        log.warning("excluding %s from soups and baselines: %s", name, e)
        excluded[name] = str(e)
        continue
      names.append(name)
    return names, excluded

  def expected_param_shapes(self) -> PyTree:
    """Param shapes and dtypes the config's model has (no computation)."""
    sample = next(iter(self.eval_splits()[self.columns.held_out].iterate(1)))
    model = self.model(self.num_classes)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), self.task.preprocess(x)),
                          jnp.asarray(sample))["params"]

  def load_model(self, name: str) -> PyTree:
    params = checkpoints.load_ingredient(self.ingredient_dir(name), self.config.soups.verify_checksums)
    soup_lib.average.check_finite(params, name)
    return params

  def evaluate_params(self, params: PyTree) -> dict[str, np.ndarray]:
    bs = self.config.eval.batch_size
    return {col: self.evaluator.logits_of_batches(params, split.iterate(bs))
            for col, split in self.eval_splits().items()}

  def accuracies(self, logits: dict[str, np.ndarray]) -> dict[str, float]:
    splits = self.eval_splits()
    acc = {col: splits[col].accuracy(logits[col]) for col in splits}
    acc["avg_shifts"] = float(np.mean([acc[c] for c in self.columns.shifts]))
    return acc

  def model_logits(self, name: str) -> dict[str, np.ndarray]:
    path = self.workdir / "eval" / f"{name}.npz"
    if not path.exists():
      logits = self.evaluate_params(self.load_model(name))
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_suffix(".tmp.npz")
      np.savez(tmp, **logits)
      tmp.replace(path)
    with np.load(path) as z:
      return {k: z[k] for k in z.files}

  def evaluate(self) -> None:
    from tqdm.auto import tqdm
    names, _ = self.usable_ingredients()
    for name in tqdm(names, desc="evaluate", unit="model", leave=False):
      self.model_logits(name)

  # --- Stage 5: soups and baselines -------------------------------------

  def row(self, name: str, recipe: str, logits: dict, ingredients: list[str], cost: int,
          **extra) -> dict:
    return {"model_name": name, "recipe": recipe, **self.accuracies(logits),
            "ingredients": ingredients, "inference_cost": cost, **extra}

  def individual_rows(self) -> list[dict]:
    names, _ = self.usable_ingredients()
    members = dict(zip(self.member_names(), self.sweep_members()))
    return [self.row(n, "initialization" if n == "model_0" else "individual",
                     self.model_logits(n), [n], 1, **({"hparams": members[n]} if n in members else {}))
            for n in names]

  def soups(self) -> list[dict]:
    cfg = self.config.soups
    names, excluded = self.usable_ingredients()
    if not cfg.include_initialization:
      names = [n for n in names if n != "model_0"]
    held = self.eval_splits()[self.columns.held_out]
    scores = {n: held.accuracy(self.model_logits(n)[self.columns.held_out]) for n in names}
    # A cached row is reused only if made from the same ingredients and soup settings.
    settings = {k: v for k, v in json.loads(cfg.to_json()).items() if k != "recipes"}
    rows = []
    for recipe in cfg.recipes:
      path = self.workdir / "soups" / f"{recipe}.json"
      if path.exists():
        cached = json.loads(path.read_text())
        if cached and all(r.get("ingredients_considered") == names and r.get("soup_settings") == settings
                          for r in cached):
          rows.extend(cached)
          continue
      log.info("soup recipe: %s over %d ingredients", recipe, len(names))
      t = time.time()
      new = getattr(self, f"_recipe_{recipe}")(names, scores)
      for r in new:
        r.update(ingredients_considered=names, excluded=excluded, soup_settings=settings,
                 seconds=round(time.time() - t, 2))
      path.parent.mkdir(parents=True, exist_ok=True)
      results.atomic_write_text(path, json.dumps(new))
      rows.extend(new)
    return rows

  def _paths(self, names):
    return [self.ingredient_dir(n) for n in names]

  def _soup_row(self, name, recipe, params, ingredients, **extra):
    return self.row(name, recipe, self.evaluate_params(params), ingredients, 1, **extra)

  def _recipe_best_individual(self, names, scores):
    members = [n for n in names if n != "model_0"] or names
    best = max(members, key=lambda n: scores[n])
    return [self.row("best_individual", "best_individual", self.model_logits(best), [best], 1,
                     selected=best)]

  def _recipe_uniform_soup(self, names, scores):
    # Each device of the mesh reduces its own slice of every parameter.
    params = soup_lib.sharded_average(self._paths(names), self.mesh,
                                      verify=self.config.soups.verify_checksums)
    checkpoints.save_ingredient(self.workdir / "soups" / "uniform_soup", params, {"ingredients": names})
    return [self._soup_row("uniform_soup", "uniform_soup", params, names)]

  def _recipe_greedy_soup(self, names, scores):
    result = soup_lib.greedy_soup(
        {n: self.ingredient_dir(n) for n in names}, scores, self.held_out_accuracy,
        comparison=self.config.soups.greedy_comparison,
        verify=self.config.soups.verify_checksums)
    checkpoints.save_ingredient(self.workdir / "soups" / "greedy_soup", result.result,
                                {"ingredients": result.ingredients})
    return [self._soup_row("greedy_soup", "greedy_soup", result.result, result.ingredients,
                           greedy_history=result.history)]

  def _learned(self, names, by_layer):
    cfg = self.config.soups.learned
    held = self.eval_splits()[self.columns.held_out]
    images = held.images if held.images is not None else np.concatenate(list(held.iterate(1024)))
    ingredients = [self.load_model(n) for n in names]
    apply_fn = self.apply_fn()
    if held.logits_map is not None:  # Train on the scored label space.
      raw_apply, mapping = apply_fn, held.logits_map
      apply_fn = lambda p, x: mapping(raw_apply(p, x))
    result = soup_lib.learned_soup(ingredients, apply_fn, images, held.labels,
                                by_layer=by_layer, epochs=cfg.epochs, learning_rate=cfg.lr,
                                batch_size=cfg.batch_size, seed=self.config.seed, mesh=self.mesh)
    weights = (dict(zip(names, result.weights)) if not by_layer else
               {layer: dict(zip(names, w)) for layer, w in result.weights.items()})
    name = "learned_soup_by_layer" if by_layer else "learned_soup"
    return [self._soup_row(name, name, result.params, names, weights=weights,
                           temperature=result.temperature)]

  def _recipe_learned_soup(self, names, scores):
    return self._learned(names, by_layer=False)

  def _recipe_learned_soup_by_layer(self, names, scores):
    return self._learned(names, by_layer=True)

  def _recipe_ensemble(self, names, scores):
    logits = {col: soup_lib.logit_ensemble([self.model_logits(n)[col] for n in names])
              for col in self.eval_splits()}
    return [self.row("ensemble", "ensemble", logits, names, len(names))]

  def _recipe_greedy_ensemble(self, names, scores):
    held = self.eval_splits()[self.columns.held_out]
    result = soup_lib.greedy_ensemble(
        {n: held.scored_logits(self.model_logits(n)[self.columns.held_out]) for n in names},
        held.labels, scores, self.config.soups.greedy_comparison)
    logits = {col: soup_lib.logit_ensemble([self.model_logits(n)[col] for n in result.ingredients])
              for col in self.eval_splits()}
    return [self.row("greedy_ensemble", "greedy_ensemble", logits, result.ingredients,
                     len(result.ingredients), greedy_history=result.history)]

  def _recipe_wise_ft(self, names, scores):
    cfg = self.config.soups.wise_ft
    init = self.load_model("model_0")
    if cfg.endpoint == "best_individual":
      members = [n for n in names if n != "model_0"]
      endpoint_names = [max(members, key=lambda n: scores[n])]
      endpoint = self.load_model(endpoint_names[0])
    elif cfg.endpoint in ("uniform_soup", "greedy_soup"):
      path = self.workdir / "soups" / cfg.endpoint
      if not checkpoints.is_ingredient(path):
        raise ValueError(f"wise_ft endpoint {cfg.endpoint} needs that recipe first in config.soups.recipes.")
      endpoint = checkpoints.load_ingredient(path)
      endpoint_names = checkpoints.ingredient_metadata(path)["metadata"]["ingredients"]
    else:
      raise ValueError(f"config.soups.wise_ft.endpoint must be best_individual, uniform_soup or "
                       f"greedy_soup, got {cfg.endpoint!r}.")
    return [self._soup_row(f"wise_ft_alpha_{a:g}", "wise_ft", soup_lib.wise_ft(init, endpoint, a),
                           sorted({"model_0", *endpoint_names}), alpha=float(a),
                           endpoint=cfg.endpoint)
            for a in cfg.alphas]

  def _recipe_model_stock(self, names, scores):
    members = [n for n in names if n != "model_0"]
    params, ratios = soup_lib.model_stock(self.load_model("model_0"), [self.load_model(n) for n in members])
    return [self._soup_row("model_stock", "model_stock", params, ["model_0", *members],
                           ratios={k: round(v, 4) for k, v in ratios.items()})]

  # --- Stage 6: results and report --------------------------------------

  def report(self) -> dict:
    from soup import report
    rows = self.individual_rows() + self.soups()
    results.write(self.workdir / "results.jsonl", rows)
    built = report.build_report(results.read(self.workdir / "results.jsonl"), self.columns)
    results.atomic_write_text(self.workdir / "report.md", report.render_markdown(built))
    report.plot_figure(rows, self.columns, self.workdir / "figure.png")
    return built

  def run(self, stages=STAGES) -> Optional[dict]:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
      raise ValueError(f"Unknown stages {unknown}; choose from {STAGES}.")
    built = None
    for stage in STAGES:
      if stage in stages:
        t = time.time()
        log.info("stage %s", stage)
        out = getattr(self, stage)()
        log.info("stage %s done in %.1fs", stage, time.time() - t)
        if stage == "report":
          built = out
    return built


# --- Tasks --------------------------------------------------------------


def make_task(data_config):
  if data_config.name == "fashion_mnist":
    from soup.data.fashion_mnist import FashionMNISTTask
    return FashionMNISTTask(data_config)
  if data_config.name == "imagenet":
    from soup.data.imagenet import ImageNetTask
    return ImageNetTask(data_config)
  raise ValueError(f"Unknown config.data.name {data_config.name!r}: use fashion_mnist or imagenet.")


def task_columns(data_config) -> results.Columns:
  return {"fashion_mnist": results.FASHION_MNIST, "imagenet": results.IMAGENET}[data_config.name]
