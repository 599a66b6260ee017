"""The trainer: one readable loop for upstream pretraining and every fine-tune.

One path from the pieces to a run, each piece named at the call site:

  fns = make_train_step(apply_fn, num_classes, augment_fn=task.augment,
                        preprocess_fn=task.preprocess, grad_clip=..., weight_decay_mask=...)
  step = compile_step(fns, params, mesh, sharding_rules)   # the jitted step and its layout
  outcome = train(step=step, params=params, hyper=..., batch_fn=..., workdir=..., seed=...)

`train` takes only the compiled step, never the pieces: nothing has a dataset's
default, and nothing passed to it can be ignored (it refuses params of other
shapes than the step was compiled for). SimCLR (soup/contrastive.py) builds its
own `StepFns` with the same state and optimizer and goes through the same
`compile_step` and `train`. The sweep compiles once and hands the same step to
every member.

Per-run hyperparameters (lr, weight decay, label smoothing, mixup, augmentation
strength, schedule lengths) are traced arguments of the jitted step, so one
compilation serves the whole sweep. The train state is laid out on the mesh by
`sharding_rules` (soup/sharding.py: replicated by default, FSDP for giant models),
the batch split over its data axis, and the state donated to the step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from soup import mesh as mesh_lib, sharding, train_state
from soup.layout import LOGS, METRICS_LOG, TRAIN_STATE
from soup.metrics import MetricWriter

log = logging.getLogger(__name__)

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Hyper:
  """One run's hyperparameters; durations are resolved to steps by the caller."""

  lr: float
  weight_decay: float
  label_smoothing: float = 0.0
  mixup: float = 0.0
  aug_strength: float = 0.0
  total_steps: int = 1
  warmup_steps: int = 0

  def as_arrays(self) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v, jnp.float32) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class Outcome:
  params: PyTree
  diverged: bool
  steps: int
  final_loss: float


class TrainingDiverged(FloatingPointError):
  pass


# --- Schedule and loss ----------------------------------------------------


def learning_rate(step, hp):
  """Linear warmup, then cosine decay to 0 (the paper's schedule)."""
  step = step.astype(jnp.float32)
  warm = hp["lr"] * (step + 1) / jnp.maximum(hp["warmup_steps"], 1.0)
  progress = (step - hp["warmup_steps"]) / jnp.maximum(hp["total_steps"] - hp["warmup_steps"], 1.0)
  cosine = hp["lr"] * 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip(progress, 0.0, 1.0)))
  return jnp.where(step < hp["warmup_steps"], warm, cosine)


def _all_finite(tree: PyTree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


WEIGHT_DECAY_MASKS = ("all", "matrices")


def decay_mask(params: PyTree, kind: str = "matrices") -> PyTree:
  """Which tensors weight decay touches (1.0) or skips (0.0).

  "all": every parameter, LayerNorm scales, biases, the class embedding and the head
  bias included, as the official finetune.py (model-soups commit d5398f1, line 113:
  `torch.optim.AdamW(model_parameters, ...)` over every trainable parameter).
  "matrices": tensors of rank >= 2 only (kernels, embeddings), the common ViT recipe.
  """
  if kind not in WEIGHT_DECAY_MASKS:
    raise ValueError(f"weight_decay_mask must be one of {WEIGHT_DECAY_MASKS}, got {kind!r}.")
  return jax.tree.map(lambda p: float(kind == "all" or p.ndim > 1), params)


# --- The train step -------------------------------------------------------


def mixup(rng: jax.Array, images: jax.Array, targets: jax.Array, alpha: jax.Array):
  """Mixup with Beta(alpha, alpha); alpha 0 is the identity (lambda = 1)."""
  k_lam, k_perm = jax.random.split(rng)
  lam = jax.random.beta(k_lam, jnp.maximum(alpha, 1e-3), jnp.maximum(alpha, 1e-3))
  lam = jnp.where(alpha > 0, jnp.maximum(lam, 1 - lam), 1.0)
  perm = jax.random.permutation(k_perm, images.shape[0])
  return lam * images + (1 - lam) * images[perm], lam * targets + (1 - lam) * targets[perm]


class StepFns(NamedTuple):
  """A train step before compiling: `init_state(params) -> state` and
  `step_fn(state, images, labels, hp, seed) -> (state, metrics)`."""

  init_state: Callable
  step_fn: Callable


def optimizer(grad_clip: float) -> optax.GradientTransformation:
  """Clip by global norm, then Adam's moments; lr and decoupled decay are applied by hand."""
  return optax.chain(optax.clip_by_global_norm(grad_clip), optax.scale_by_adam())


def initial_state(adam: optax.GradientTransformation) -> Callable:
  """params -> the train state {"step", "params", "opt_state"} every step here shares."""
  return lambda params: {"step": jnp.zeros((), jnp.int32), "params": params,
                         "opt_state": adam.init(params)}


def apply_gradients(state: PyTree, grads: PyTree, adam: optax.GradientTransformation, hp,
                    weight_decay_mask: str) -> tuple[PyTree, jax.Array]:
  """One AdamW update of the state; returns (new state, this step's lr)."""
  updates, opt_state = adam.update(grads, state["opt_state"], state["params"])
  lr = learning_rate(state["step"], hp)
  # AdamW with decoupled weight decay, written out so lr and wd stay traced.
  params = jax.tree.map(
      lambda p, u, m: p - lr * (u + hp["weight_decay"] * m * p),
      state["params"], updates, decay_mask(state["params"], weight_decay_mask))
  return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, lr


def make_train_step(apply_fn: Callable, num_classes: int, *, augment_fn: Callable,
                    preprocess_fn: Callable, grad_clip: float,
                    weight_decay_mask: str) -> StepFns:
  """The supervised step: augment_fn(rng, uint8 images, strength) then preprocess_fn(images),
  label smoothing and mixup, cross-entropy, AdamW. No piece has a default: the caller
  names the task's augmentation and preprocessing, the clip and the decay mask."""
  # The mask is fixed per sweep (a config field), so one compile still serves every member.
  decay_mask({}, weight_decay_mask)  # A bad value fails here, not inside jit.
  adam = optimizer(grad_clip)

  def step_fn(state, images, labels, hp, seed):
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])
    k_aug, k_mix = jax.random.split(rng)
    x = preprocess_fn(augment_fn(k_aug, images, hp["aug_strength"]))
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), hp["label_smoothing"])
    if not jnp.issubdtype(x.dtype, jnp.integer):  # Token ids cannot be mixed (text tasks).
      x, targets = mixup(k_mix, x, targets, hp["mixup"])

    def loss_fn(params):
      logits = apply_fn(params, x)
      return jnp.mean(optax.softmax_cross_entropy(logits, targets))

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    new_state, lr = apply_gradients(state, grads, adam, hp, weight_decay_mask)
    return new_state, {"loss": loss, "lr": lr, "grad_norm": optax.tree.norm(grads)}

  return StepFns(initial_state(adam), step_fn)


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """A step jitted for one state layout on one mesh; every run with that layout (the
  whole sweep) reuses it. `state_shapes` are the abstract state it was laid out for."""

  init_state: Callable
  fn: Callable
  mesh: Mesh
  state_sharding: PyTree
  state_shapes: PyTree
  # Jitted once here rather than per run: a sweep's members reuse them uncompiled.
  init_fn: Callable     # params -> state, in state_sharding.
  all_finite: Callable  # params -> replicated bool.


def compile_step(fns: StepFns, params: PyTree, mesh: Mesh,
                 sharding_rules: Sequence = sharding.REPLICATED) -> CompiledStep:
  """The one way to a step `train` runs: `fns` jitted for the layout that `sharding_rules`
  (soup/sharding.py) give the state of `params` (arrays or shapes only). The state keeps
  its layout from step to step and is donated; under FSDP the compiler gathers each param
  where it is used and reduce-scatters its gradient.
  """
  shapes = jax.eval_shape(fns.init_state, params)
  layout = sharding.state_shardings(shapes, mesh, sharding_rules)
  replicated, batch = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
  fn = jax.jit(fns.step_fn, in_shardings=(layout, batch, batch, replicated, replicated),
               out_shardings=(layout, replicated), donate_argnums=0)
  return CompiledStep(fns.init_state, fn, mesh, layout, shapes,
                      init_fn=jax.jit(fns.init_state, out_shardings=layout),
                      all_finite=jax.jit(_all_finite, out_shardings=replicated))


# --- The loop: resume, train, checkpoint, log -----------------------------


def _same_shapes(a: PyTree, b: PyTree) -> bool:
  (xs, ta), (ys, tb) = jax.tree.flatten(a), jax.tree.flatten(b)
  return ta == tb and all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(xs, ys))


def _initial_state(step: CompiledStep, params: PyTree, workdir: Path, checkpoint_every: int,
                   total_steps: int, description: str):
  """(manager, first step, state): fresh, or the latest checkpoint of an interrupted run.

  Each process puts only its own slices; Orbax restores each process's shards in place.
  """
  if not _same_shapes(jax.eval_shape(step.init_state, params), step.state_shapes):
    raise ValueError(f"{description}: params differ from those the step was compiled for "
                     "(train.compile_step).")
  layout = step.state_sharding
  # A copy of device params: the state is donated, and jit may hand its input back as
  # the state itself, which would delete the caller's (a sweep's shared start).
  params = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x,
                        sharding.put(params, layout["params"]))
  state = step.init_fn(params)
  manager = train_state.train_state_manager(workdir / TRAIN_STATE, checkpoint_every)
  start, restored = train_state.restore_train_state(manager, sharding.abstract(state, layout))
  if restored is not None:
    state = restored
    log.info("%s: resuming at step %d of %d", description, start, total_steps)
  return manager, start, state


def train(*, step: CompiledStep, params: PyTree, hyper: Hyper,
          batch_fn: Callable[[int], tuple[np.ndarray, np.ndarray]], workdir: str | Path,
          seed: int, checkpoint_every: int = 200, log_every: int = 20,
          description: str = "train") -> Outcome:
  """Trains params for hyper.total_steps steps of `step`, resuming from workdir/train_state.

  `step` comes from `compile_step` (the model, the task's augmentation and
  preprocessing, the clip, the decay mask and the state layout are all in it) for
  params of these shapes. `batch_fn(step)` returns the global batch of that step
  (host arrays). A non-finite loss stops the run and returns diverged=True with the
  last params.
  """
  workdir, mesh = Path(workdir), step.mesh
  manager, start, state = _initial_state(step, params, workdir, checkpoint_every,
                                         hyper.total_steps, description)
  replicated = mesh_lib.replicated(mesh)
  hp = jax.device_put(hyper.as_arrays(), replicated)

  diverged, loss = False, float("nan")
  with MetricWriter(workdir / LOGS, METRICS_LOG) as writer:
    bar = tqdm(total=hyper.total_steps, initial=start, desc=description, unit="step",
               dynamic_ncols=True, leave=False)
    for i in range(start, hyper.total_steps):
      images, labels = batch_fn(i)
      images, labels = mesh_lib.global_batch(mesh, images, labels)
      state, metrics = step.fn(state, images, labels, hp, seed)
      bar.update(1)
      last = i + 1 == hyper.total_steps
      if (i + 1) % log_every == 0 or last:
        metrics = jax.device_get(metrics)
        loss = float(metrics["loss"])
        writer.write(i + 1, {f"train/{k}": v for k, v in metrics.items()})
        bar.set_postfix(loss=f"{loss:.4f}")
        if not math.isfinite(loss):
          diverged = True
          log.warning("%s: loss is %s at step %d; stopping this run as diverged.",
                      description, loss, i + 1)
          break
      # The last step is saved too: a crash before the ingredient is written loses nothing.
      if (i + 1) % checkpoint_every == 0 or last:
        train_state.save_train_state(manager, i + 1, state, force=last)
    bar.close()
  manager.wait_until_finished()
  manager.close()
  final = state["params"]
  finite = bool(step.all_finite(final))
  if all(x.sharding.is_fully_replicated for x in jax.tree.leaves(final)):
    final = jax.device_get(final)  # Sharded params stay so: saved shard by shard.
  if not diverged and not finite:
    diverged = True  # The last update alone can blow up after the last finite loss.
    log.warning("%s: parameters are not finite after training; marking the run diverged.",
                description)
  return Outcome(final, diverged, int(jax.device_get(state["step"])), loss)
