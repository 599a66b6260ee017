"""Learned soup: mixing weights and a logit temperature trained on held-out.

params = sum_i softmax(alpha)_i theta_i, one alpha vector for the whole model
("learned soup") or one per parameter tensor ("by layer"), starting uniform;
logits are scaled by a learned temperature beta (init 1), as in the official
code; AdamW, lr 0.05, no weight decay, 5 epochs, batch 256 by default.

The stack of N ingredients is the memory cost (N x P). On a Mesh its leaves are
split over the mesh axis, along the ingredient axis when D divides N, so each
device holds about N * P / D values.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from soup import checkpoints
from soup.soups import average

log = logging.getLogger(__name__)

PyTree = Any


@dataclasses.dataclass
class LearnedSoupResult:
  params: PyTree
  weights: Any            # [N] per model, or {leaf name: [N]} by layer.
  temperature: float
  losses: list[float]


def stack_spec(shape: tuple[int, ...], num_shards: int, axis: str) -> P:
  """Shards a stacked leaf [N, ...] on the first dimension D divides."""
  for dim, size in enumerate(shape):
    if size % num_shards == 0:
      return P(*([None] * dim), axis)
  return P()  # Too small to split: replicate (biases, norms of odd sizes).


def stack_ingredients(ingredients: Sequence[PyTree], mesh: Optional[Mesh] = None,
                      axis: str = "data") -> PyTree:
  """Stacks N ingredients into leaves [N, ...] (float32), sharded over the mesh."""
  for i, params in enumerate(ingredients[1:], 1):
    average.check_compatible(ingredients[0], params, "ingredient #0", f"ingredient #{i}")

  def stack(*leaves):
    stacked = np.stack([np.asarray(l, np.float32) for l in leaves])
    if mesh is None:
      return jnp.asarray(stacked)
    sharding = NamedSharding(mesh, stack_spec(stacked.shape, mesh.shape[axis], axis))
    return jax.make_array_from_callback(stacked.shape, sharding, lambda idx: stacked[idx])

  return jax.tree.map(stack, *ingredients)


def mix(stacked: PyTree, alphas: Any, by_layer: bool) -> PyTree:
  leaves, treedef = jax.tree.flatten(stacked)
  mixed = []
  for i, leaf in enumerate(leaves):
    w = jax.nn.softmax(alphas[i] if by_layer else alphas)
    mixed.append(jnp.tensordot(w, leaf, axes=1))
  return jax.tree.unflatten(treedef, mixed)


def learned_soup(ingredients: Sequence[PyTree], apply_fn: Callable[[PyTree, jax.Array], jax.Array],
                 images: np.ndarray, labels: np.ndarray, *, by_layer: bool = False,
                 epochs: int = 5, learning_rate: float = 0.05, batch_size: int = 256,
                 seed: int = 0, mesh: Optional[Mesh] = None, axis: str = "data",
                 stacked: Optional[PyTree] = None) -> LearnedSoupResult:
  """Trains the mixing weights on held-out (images, labels); returns the soup."""
  n = len(ingredients) if stacked is None else jax.tree.leaves(stacked)[0].shape[0]
  if stacked is None:
    stacked = stack_ingredients(ingredients, mesh, axis)
  num_leaves = len(jax.tree.leaves(stacked))
  params = {"alpha": jnp.zeros((num_leaves, n) if by_layer else (n,), jnp.float32),
            "beta": jnp.ones((), jnp.float32)}
  optimizer = optax.adamw(learning_rate, weight_decay=0.0)
  opt_state = optimizer.init(params)

  def loss_fn(p, stacked, x, y, mask):
    soup = mix(stacked, p["alpha"], by_layer)
    logits = p["beta"] * apply_fn(soup, x)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)

  @jax.jit
  def step(p, opt_state, stacked, x, y, mask):
    loss, grads = jax.value_and_grad(loss_fn)(p, stacked, x, y, mask)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  num = len(labels)
  losses = []
  for epoch in range(epochs):
    order = rng.permutation(num)
    for start in range(0, num, batch_size):
      idx = order[start:start + batch_size]
      pad = batch_size - len(idx)  # Pad and mask the last batch: one compiled shape.
      x = np.concatenate([images[idx], np.zeros((pad, *images.shape[1:]), images.dtype)])
      y = np.concatenate([labels[idx], np.zeros((pad,), labels.dtype)])
      mask = np.concatenate([np.ones(len(idx), np.float32), np.zeros(pad, np.float32)])
      params, opt_state, loss = step(params, opt_state, stacked, x, y, mask)
      losses.append(float(loss))
    log.info("learned soup%s epoch %d: loss %.4f", " by layer" if by_layer else "", epoch,
                 losses[-1])
  soup = jax.device_get(mix(stacked, params["alpha"], by_layer))
  reference = ingredients[0] if ingredients else None
  if reference is not None:
    soup = average._cast_like(soup, reference)
  weights = np.asarray(jax.nn.softmax(params["alpha"], axis=-1))
  if by_layer:
    names = list(checkpoints.flatten_with_names(stacked))
    weights = {name: weights[i].tolist() for i, name in enumerate(names)}
  else:
    weights = weights.tolist()
  return LearnedSoupResult(jax.tree.map(np.asarray, soup), weights, float(params["beta"]), losses)
