"""The trainer: one readable loop for upstream pretraining and every fine-tune.

Per-run hyperparameters (lr, weight decay, label smoothing, mixup, augmentation
strength, schedule lengths) are traced arguments of the jitted step, so one
compilation serves the whole sweep. The train state is replicated on the mesh,
the batch split over its data axis, and the state donated to the step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from soup import checkpoints
from soup import mesh as mesh_lib
from soup.data import pipeline
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


def make_train_step(apply_fn: Callable, num_classes: int, augment_fn: Callable,
                    preprocess_fn: Callable, grad_clip: float, weight_decay_mask: str = "matrices"):
  # The mask is fixed per sweep (a config field), so one compile still serves every member.
  decay_mask({}, weight_decay_mask)  # A bad value fails here, not inside jit.
  adam = optax.chain(optax.clip_by_global_norm(grad_clip), optax.scale_by_adam())

  def init_state(params):
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": adam.init(params)}

  def step_fn(state, images, labels, hp, seed):
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])
    k_aug, k_mix = jax.random.split(rng)
    x = preprocess_fn(augment_fn(k_aug, images, hp["aug_strength"]))
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), hp["label_smoothing"])
    x, targets = pipeline.mixup(k_mix, x, targets, hp["mixup"])

    def loss_fn(params):
      logits = apply_fn(params, x)
      return jnp.mean(optax.softmax_cross_entropy(logits, targets))

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = adam.update(grads, state["opt_state"], state["params"])
    lr = learning_rate(state["step"], hp)
    # AdamW with decoupled weight decay, written out so lr and wd stay traced.
    params = jax.tree.map(
        lambda p, u, m: p - lr * (u + hp["weight_decay"] * m * p),
        state["params"], updates, decay_mask(state["params"], weight_decay_mask))
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    return new_state, {"loss": loss, "lr": lr, "grad_norm": optax.global_norm(grads)}

  return init_state, step_fn


# --- The loop: resume, train, checkpoint, log -----------------------------


def train(*, apply_fn: Callable, params: PyTree, hyper: Hyper, num_classes: int,
          batch_fn: Callable[[int], tuple[np.ndarray, np.ndarray]], mesh: Mesh,
          workdir: str | Path, seed: int, augment_fn: Callable = pipeline.augment,
          preprocess_fn: Callable = pipeline.normalize, grad_clip: float = 1.0,
          checkpoint_every: int = 200, log_every: int = 20, description: str = "train",
          compiled_step: Optional[Callable] = None,
          weight_decay_mask: str = "matrices") -> Outcome:
  """Trains params for hyper.total_steps steps, resuming from workdir/train_state.

  `batch_fn(step)` returns the global batch of that step (host arrays). A
  non-finite loss stops the run and returns diverged=True with the last params.
  """
  workdir = Path(workdir)
  init_state, step_fn = make_train_step(apply_fn, num_classes, augment_fn, preprocess_fn, grad_clip,
                                        weight_decay_mask)
  step_jit = compiled_step or jax.jit(step_fn, donate_argnums=0)
  replicated = mesh_lib.replicated(mesh)

  # Setup: fresh state, or the latest checkpoint of an interrupted run.
  state = jax.device_put(init_state(jax.tree.map(jnp.asarray, params)), replicated)
  manager = checkpoints.train_state_manager(workdir / "train_state", checkpoint_every)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
  start, restored = checkpoints.restore_train_state(manager, abstract)
  if restored is not None:
    state = restored
    log.info("%s: resuming at step %d of %d", description, start, hyper.total_steps)
  hp = jax.device_put(hyper.as_arrays(), replicated)

  diverged, loss = False, float("nan")
  with MetricWriter(workdir / "logs") as writer:
    bar = tqdm(total=hyper.total_steps, initial=start, desc=description, unit="step",
               dynamic_ncols=True, leave=False)
    for step in range(start, hyper.total_steps):
      images, labels = batch_fn(step)
      images, labels = mesh_lib.global_batch(mesh, images, labels)
      state, metrics = step_jit(state, images, labels, hp, seed)
      bar.update(1)
      last = step + 1 == hyper.total_steps
      if (step + 1) % log_every == 0 or last:
        metrics = jax.device_get(metrics)
        loss = float(metrics["loss"])
        writer.write(step + 1, {f"train/{k}": v for k, v in metrics.items()})
        bar.set_postfix(loss=f"{loss:.4f}")
        if not math.isfinite(loss):
          diverged = True
          log.warning("%s: loss is %s at step %d; stopping this run as diverged.",
                          description, loss, step + 1)
          break
      # The last step is saved too: a crash before the ingredient is written loses nothing.
      if (step + 1) % checkpoint_every == 0 or last:
        manager.save(step + 1, args=checkpoints.ocp.args.StandardSave(state), force=last)
    bar.close()
  manager.wait_until_finished()
  manager.close()
  final = jax.device_get(state["params"])
  if not diverged and not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(final)):
    diverged = True  # The last update alone can blow up after the last finite loss.
    log.warning("%s: parameters are not finite after training; marking the run diverged.",
                description)
  return Outcome(final, diverged, int(jax.device_get(state["step"])), loss)
