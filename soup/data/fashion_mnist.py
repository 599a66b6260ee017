"""The Fashion-MNIST task: its splits in memory, normalization and augmentation on device.

Where the arrays come from (Debian's IDX files prepared into TFDS) is
soup/data/fashion_mnist_tfds.py; which images each stage sees is
soup/data/fashion_mnist_splits.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from soup.data import batching
from soup.data.fashion_mnist_splits import experiment_splits
from soup.data.task import EvalSplit, Task

# --- Normalization and augmentation (inside the jitted train step) ---------


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


class FashionMNISTTask(Task):
  """The embedded default: every split in memory, augmentation on device."""

  num_classes = 10

  def provenance(self) -> dict:
    """No data provenance fields: the splits are fixed by config.data (see Task.provenance)."""
    return {}

  def __init__(self, data_config, columns):
    self.columns = columns  # The dataset registry's (soup/data/registry.py).
    self.splits = experiment_splits(data_config)
    self.upstream = self.splits["upstream"]
    c = self.columns
    evals = {c.held_out: self.splits["held_out"], c.test: self.splits["test"]}
    evals.update({col: self.splits["shifts"][col.removeprefix("FashionMNIST")] for col in c.shifts})
    self._eval = {col: EvalSplit(labels=s.labels, images=s.images) for col, s in evals.items()}

  def finetune_size(self) -> int:
    return len(self.splits["finetune"])

  def finetune_batch(self, batch_size, seed, step, hparams=None):
    return batching.train_batch(self.splits["finetune"], batch_size, seed, step)

  def finetune_examples(self, count):
    split = self.splits["finetune"]
    return split.images[:count], split.labels[:count]

  def eval_splits(self):
    return self._eval

  def preprocess(self, images):
    return normalize(images)

  def augment(self, rng, images, strength):
    return augment(rng, images, strength)
