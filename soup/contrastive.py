"""Self-supervised upstream pretraining: SimCLR's InfoNCE over two augmented views.

The paper's start, CLIP, never saw ImageNet's labels: it was trained contrastively.
This is the embedded default's counterpart (Chen et al. 2020, SimCLR): every image
of a batch is augmented twice (random-resized crop, flip, brightness and contrast
jitter), both views go through the backbone and a small projection MLP, and the
InfoNCE loss at temperature T asks each view to pick its twin among the 2B - 1
others. No label is read. The projection head is dropped afterwards, as SimCLR
does; the backbone is the upstream ingredient.

`make_step` returns the trainer's `train.StepFns`: the same state ({"step",
"params", "opt_state"}), optimizer (clip-by-global-norm then Adam) and AdamW
update, so it goes through `train.compile_step` and `train.train` like any
fine-tune, with their resume, checkpoints, divergence check and metrics.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from soup import train

PyTree = Any


class ProjectionHead(nn.Module):
  """SimCLR's g(.): Dense -> ReLU -> Dense; its output is what InfoNCE compares."""

  hidden: int
  out: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.out, name="out")(nn.relu(nn.Dense(self.hidden, name="hidden")(x)))


# --- Views ----------------------------------------------------------------


def random_resized_crop(rng: jax.Array, images: jax.Array, scale=(0.25, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> jax.Array:
  """Inception-style crop of each image (area fraction in `scale`), resized back.

  One bilinear `scale_and_translate` per image, so shapes stay static under jit.
  """
  n, h, w, c = images.shape
  k_area, k_ratio, k_y, k_x = jax.random.split(rng, 4)
  area = jax.random.uniform(k_area, (n,), minval=scale[0], maxval=scale[1])
  log_r = jax.random.uniform(k_ratio, (n,), minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1]))
  aspect = jnp.exp(log_r)
  ch = jnp.clip(jnp.sqrt(area / aspect) * h, 4.0, h)
  cw = jnp.clip(jnp.sqrt(area * aspect) * w, 4.0, w)
  y0 = jax.random.uniform(k_y, (n,)) * (h - ch)
  x0 = jax.random.uniform(k_x, (n,)) * (w - cw)

  def one(image, ch, cw, y0, x0):
    s = jnp.stack([h / ch, w / cw])
    t = jnp.stack([-y0 * h / ch, -x0 * w / cw])
    return jax.image.scale_and_translate(image, (h, w, c), (0, 1), s, t, "linear",
                                         antialias=True)

  return jax.vmap(one)(images, ch, cw, y0, x0)


def view(rng: jax.Array, images: jax.Array, crop_scale=(0.25, 1.0), jitter: float = 0.4):
  """One SimCLR view of a uint8-valued batch, still on the 0..255 scale."""
  n = images.shape[0]
  k_crop, k_flip, k_bright, k_contrast = jax.random.split(rng, 4)
  x = random_resized_crop(k_crop, images.astype(jnp.float32), crop_scale)
  x = jnp.where(jax.random.uniform(k_flip, (n, 1, 1, 1)) < 0.5, x[:, :, ::-1], x)
  bright = jax.random.uniform(k_bright, (n, 1, 1, 1), minval=1 - jitter, maxval=1 + jitter)
  contrast = jax.random.uniform(k_contrast, (n, 1, 1, 1), minval=1 - jitter, maxval=1 + jitter)
  x = x * bright
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return jnp.clip(mean + contrast * (x - mean), 0, 255)


# --- Loss -----------------------------------------------------------------


def info_nce(z1: jax.Array, z2: jax.Array, temperature: float):
  """NT-Xent over 2B embeddings; returns (loss, top-1 accuracy of finding the twin)."""
  z = jnp.concatenate([z1, z2], axis=0)
  z = z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-6)
  b = z1.shape[0]
  sim = (z @ z.T) / temperature
  sim = jnp.where(jnp.eye(2 * b, dtype=bool), -jnp.inf, sim)  # A view is not its own twin.
  twin = jnp.concatenate([jnp.arange(b, 2 * b), jnp.arange(b)])
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(sim, twin))
  return loss, jnp.mean(jnp.argmax(sim, axis=-1) == twin)


# --- The step -------------------------------------------------------------


def init_params(params: PyTree, feature_dim: int, hidden: int, out: int, seed: int) -> PyTree:
  """The backbone's params plus a fresh projection head under "projection"."""
  head = ProjectionHead(hidden, out)
  proj = head.init(jax.random.key(seed + 1), jnp.zeros((1, feature_dim)))["params"]
  return {**params, "projection": proj}


def make_step(features_fn: Callable, preprocess_fn: Callable, *, temperature: float,
              hidden: int, out: int, grad_clip: float, weight_decay_mask: str,
              crop_scale=(0.25, 1.0), jitter: float = 0.4) -> train.StepFns:
  """The SimCLR step: (state, images, labels, hp, seed) -> (state, metrics), as train's.

  `features_fn(backbone_params, x)` is the pooled representation; `preprocess_fn` the
  task's, applied to both views. Labels are ignored.
  """
  train.decay_mask({}, weight_decay_mask)  # A bad value fails here, not inside jit.
  adam = train.optimizer(grad_clip)
  head = ProjectionHead(hidden, out)

  def step_fn(state, images, labels, hp, seed):
    del labels  # Self-supervised: the labels are never read.
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])
    k1, k2 = jax.random.split(rng)
    x = jnp.concatenate([view(k1, images, crop_scale, jitter),
                         view(k2, images, crop_scale, jitter)])
    x = preprocess_fn(x)

    def loss_fn(params):
      backbone = {k: v for k, v in params.items() if k != "projection"}
      z = head.apply({"params": params["projection"]}, features_fn(backbone, x))
      z1, z2 = jnp.split(z, 2)
      return info_nce(z1, z2, temperature)

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    new_state, lr = train.apply_gradients(state, grads, adam, hp, weight_decay_mask)
    return new_state, {"loss": loss, "twin_accuracy": acc, "lr": lr,
                       "grad_norm": optax.tree.norm(grads)}

  return train.StepFns(train.initial_state(adam), step_fn)
