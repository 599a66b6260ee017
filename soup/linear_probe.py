"""The linear probe: multinomial logistic regression on frozen features (model_0's head)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from soup.data import pipeline


def fit_linear_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, epochs: int,
                     batch_size: int, lr: float, weight_decay: float, seed: int) -> dict:
  """Multinomial logistic regression on frozen features (AdamW, minibatches)."""
  dim = features.shape[1]
  head = {"kernel": jnp.zeros((dim, num_classes), jnp.float32),
          "bias": jnp.zeros((num_classes,), jnp.float32)}
  opt = optax.adamw(lr, weight_decay=weight_decay)
  state = opt.init(head)

  @jax.jit
  def step(head, state, x, y):
    def loss_fn(h):
      return optax.softmax_cross_entropy_with_integer_labels(x @ h["kernel"] + h["bias"], y).mean()
    loss, g = jax.value_and_grad(loss_fn)(head)
    updates, state = opt.update(g, state, head)
    return optax.apply_updates(head, updates), state, loss

  rng = np.random.default_rng(seed)
  per_epoch = pipeline.steps_per_epoch(len(labels), batch_size)
  for _ in range(epochs):
    order = rng.permutation(len(labels))
    for b in range(per_epoch):
      idx = order[b * batch_size:(b + 1) * batch_size]
      head, state, _ = step(head, state, features[idx], labels[idx])
  return jax.tree.map(np.asarray, head)
