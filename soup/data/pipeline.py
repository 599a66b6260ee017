"""In-memory batching and on-device augmentation.

Fashion-MNIST fits in memory many times over and per-example TFDS reads are
slower than training the tiny ViT, so the splits are read once into arrays.
Batch b of a run is a pure function of (seed, b): resuming at any step
replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # uint8 [n, h, w, c]
  labels: np.ndarray  # int32 [n]

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, indices: np.ndarray) -> "Split":
    return Split(self.images[indices], self.labels[indices])


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Training drops the last partial batch (evaluation never does)."""
  if num_examples < batch_size:
    raise ValueError(f"{num_examples} training examples cannot fill a batch of {batch_size}.")
  return num_examples // batch_size


def train_batch(split: Split, batch_size: int, seed: int,
                step: int) -> tuple[np.ndarray, np.ndarray]:
  """The batch of global step `step`: epoch-wise permutations seeded by (seed, epoch)."""
  per_epoch = steps_per_epoch(len(split), batch_size)
  epoch, index = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(len(split))
  idx = np.sort(order[index * batch_size:(index + 1) * batch_size])
  return split.images[idx], split.labels[idx]


# --- Augmentation (inside the jitted train step) -------------------------


def normalize(images: jax.Array) -> jax.Array:
  """uint8 -> float32 roughly zero-mean, unit-variance (Fashion-MNIST stats)."""
  return (images.astype(jnp.float32) / 255.0 - 0.286) / 0.353


def augment(rng: jax.Array, images: jax.Array, strength: jax.Array) -> jax.Array:
  """Random translation, horizontal flip and contrast jitter, scaled by strength in [0, 1].

  strength 0 is the identity. Max shift 4 px, flip probability 0.5, contrast
  factor in [1 - 0.4 s, 1 + 0.4 s]; shapes are static so one compile serves
  every member of the sweep.
  """
  n, h, w, c = images.shape
  x = images.astype(jnp.float32)
  k_shift, k_flip, k_contrast = jax.random.split(rng, 3)
  pad = 4
  shifts = jnp.round(jax.random.uniform(k_shift, (n, 2), minval=-pad, maxval=pad) * strength)
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  starts = (pad - shifts).astype(jnp.int32)
  x = jax.vmap(lambda im, s: jax.lax.dynamic_slice(im, (s[0], s[1], 0), (h, w, c)))(padded, starts)
  flip = jax.random.uniform(k_flip, (n, 1, 1, 1)) < 0.5 * (strength > 0)
  x = jnp.where(flip, x[:, :, ::-1], x)
  factor = 1 + 0.4 * strength * jax.random.uniform(k_contrast, (n, 1, 1, 1), minval=-1, maxval=1)
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return jnp.clip(mean + factor * (x - mean), 0, 255)


def mixup(rng: jax.Array, images: jax.Array, targets: jax.Array, alpha: jax.Array):
  """Mixup with Beta(alpha, alpha); alpha 0 is the identity (lambda = 1)."""
  k_lam, k_perm = jax.random.split(rng)
  lam = jax.random.beta(k_lam, jnp.maximum(alpha, 1e-3), jnp.maximum(alpha, 1e-3))
  lam = jnp.where(alpha > 0, jnp.maximum(lam, 1 - lam), 1.0)
  perm = jax.random.permutation(k_perm, images.shape[0])
  return lam * images + (1 - lam) * images[perm], lam * targets + (1 - lam) * targets[perm]
