"""Learned soup: mixing weights and a logit temperature trained on held-out.

params = sum_i softmax(alpha)_i theta_i, one alpha vector for the whole model
("learned soup") or one per parameter tensor ("by layer"), starting uniform;
logits are scaled by a learned temperature beta (init 1), as in the official
code; AdamW, lr 0.05, no weight decay, 5 epochs, batch 256 by default.

The stack of N ingredients is the memory cost (N x P). On a Mesh its leaves are
split over the mesh axis, along the ingredient axis when D divides N, so each
device holds about N * P / D values; each held-out batch is split over it too.
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

from soup import memory, trees
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


def stack_ingredients(ingredients: Sequence[average.Source], mesh: Optional[Mesh] = None,
                      axis: str = "data", verify: bool = True,
                      layout: Optional[average.Layout] = None) -> PyTree:
  """Stacks N ingredients (params or checkpoint paths) into float32 leaves [N, ...],
  sharded over the mesh: for a sharded layout each leaf as its rules split it (the
  ingredient axis whole), else by stack_spec.

  Each device's shard is filled straight from the ingredients through the averager's
  reader (read_box), so no [N, ...] array is ever built on a host and a process reads
  only the parts its devices hold. Host memory beyond the device arrays: one leaf's
  shards. On CPU devices the aligned shard buffers become the device arrays without a copy.
  """
  opened = average.open_sources(ingredients, verify)
  specs = opened[0].specs
  n = len(opened)
  rules = {} if layout is None or not layout.is_sharded else layout.output_shardings(specs)
  out = {}
  for name, spec in specs.items():
    shape = (n, *spec.shape)
    if mesh is None:
      host = memory.aligned_empty(shape, np.float32)
      for i, source in enumerate(opened):
        np.copyto(host[i, ...], source.read(name), casting="same_kind")
      out[name] = jax.device_put(host)
      continue
    stacked_spec = (P(None, *rules[name].spec) if name in rules
                    else stack_spec(shape, mesh.shape[axis], axis))
    sharding = NamedSharding(mesh, stacked_spec)
    index_map = sharding.addressable_devices_indices_map(shape)
    bounds = {d: tuple(s.indices(size)[:2] for s, size in zip(idx, shape))
              for d, idx in index_map.items()}
    shards = {}  # Devices holding the same slice share one host buffer.
    for b in bounds.values():
      if b not in shards:
        shards[b] = memory.aligned_empty(tuple(hi - lo for lo, hi in b), np.float32)
    for b, shard in shards.items():
      for i in range(*b[0]):  # Only the ingredients and parts this process's devices hold.
        if np.dtype(spec.dtype) == np.float32:
          opened[i].read_box(name, b[1:], shard[i - b[0][0]])
        else:
          np.copyto(shard[i - b[0][0]], opened[i].read_box(name, b[1:]), casting="same_kind")
    arrays = [jax.device_put(shards[bounds[d]], d) for d in index_map]
    out[name] = jax.make_array_from_single_device_arrays(shape, sharding, arrays)
  return average.as_tree(out, opened[0])


def mix(stacked: PyTree, alphas: Any, by_layer: bool) -> PyTree:
  leaves, treedef = jax.tree.flatten(stacked)
  mixed = []
  for i, leaf in enumerate(leaves):
    w = jax.nn.softmax(alphas[i] if by_layer else alphas)
    mixed.append(jnp.tensordot(w, leaf, axes=1))
  return jax.tree.unflatten(treedef, mixed)


def init_mixing(num_leaves: int, n: int, by_layer: bool):
  """The trained variables: mixing logits alpha (uniform start) and temperature beta."""
  return {"alpha": jnp.zeros((num_leaves, n) if by_layer else (n,), jnp.float32),
          "beta": jnp.ones((), jnp.float32)}


def soup_shardings(stacked: PyTree, mesh: Mesh, axis: str = "data") -> PyTree:
  """Per leaf of the mixed soup: the stack's sharding without its ingredient axis when
  that axis is whole (a sharded layout), else split on the first dimension D divides."""
  d = mesh.shape[axis]

  def one(x):
    spec = tuple(x.sharding.spec) if isinstance(x, jax.Array) else ()
    if spec and spec[0] is None:
      return NamedSharding(mesh, P(*spec[1:]))
    return NamedSharding(mesh, stack_spec(tuple(x.shape[1:]), d, axis))

  return jax.tree.map(one, stacked)


def make_step(apply_fn: Callable[[PyTree, jax.Array], jax.Array], optimizer, by_layer: bool,
              shardings: Optional[PyTree] = None):
  """The jitted training step (p, opt_state, stacked, x, y, mask) -> (p, opt_state, loss).

  `shardings` (soup_shardings) keeps the mixed soup split over the devices: the sum
  over ingredients ends in a reduce-scatter rather than an all-reduce, so no device
  holds the whole soup (or its gradient) at once.
  """

  def loss_fn(p, stacked, x, y, mask):
    soup = mix(stacked, p["alpha"], by_layer)
    if shardings is not None:
      soup = jax.lax.with_sharding_constraint(soup, shardings)
    logits = p["beta"] * apply_fn(soup, x)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)

  @jax.jit
  def step(p, opt_state, stacked, x, y, mask):
    loss, grads = jax.value_and_grad(loss_fn)(p, stacked, x, y, mask)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  return step


def batch_size_on(mesh: Optional[Mesh], batch_size: int, axis: str = "data") -> int:
  """The batch padded (masked rows) to a multiple of the devices on the axis."""
  d = 1 if mesh is None else mesh.shape[axis]
  return -(-batch_size // d) * d


def learned_soup(ingredients: Sequence[average.Source],
                 apply_fn: Callable[[PyTree, jax.Array], jax.Array],
                 images: np.ndarray, labels: np.ndarray, *, by_layer: bool = False,
                 epochs: int = 5, learning_rate: float = 0.05, batch_size: int = 256,
                 seed: int = 0, mesh: Optional[Mesh] = None, axis: str = "data",
                 stacked: Optional[PyTree] = None, verify: bool = True,
                 layout: Optional[average.Layout] = None) -> LearnedSoupResult:
  """Trains the mixing weights on held-out (images, labels); returns the soup.

  Ingredients are params or checkpoint paths. On a mesh, the stack is split over
  the devices (stack_ingredients) and so is each held-out batch. With a sharded
  layout the stack and the soup keep its shardings, and the soup stays on the devices;
  otherwise the soup comes back as numpy arrays.
  """
  if stacked is None:
    stacked = stack_ingredients(ingredients, mesh, axis, verify, layout)
  n = jax.tree.leaves(stacked)[0].shape[0]
  num_leaves = len(jax.tree.leaves(stacked))
  params = init_mixing(num_leaves, n, by_layer)
  optimizer = optax.adamw(learning_rate, weight_decay=0.0)
  opt_state = optimizer.init(params)
  shardings = None if mesh is None else soup_shardings(stacked, mesh, axis)
  step = make_step(apply_fn, optimizer, by_layer, shardings)
  padded = batch_size_on(mesh, batch_size, axis)
  batch_sharding = None if mesh is None else NamedSharding(mesh, P(axis))

  def put(a):
    if batch_sharding is None:
      return a
    return jax.make_array_from_callback(a.shape, batch_sharding, lambda idx: a[idx])

  rng = np.random.default_rng(seed)
  num = len(labels)
  losses = []
  for epoch in range(epochs):
    order = rng.permutation(num)
    for start in range(0, num, batch_size):
      idx = order[start:start + batch_size]
      pad = padded - len(idx)  # Pad and mask: one compiled shape, split evenly over devices.
      x = np.concatenate([images[idx], np.zeros((pad, *images.shape[1:]), images.dtype)])
      y = np.concatenate([labels[idx], np.zeros((pad,), labels.dtype)])
      mask = np.concatenate([np.ones(len(idx), np.float32), np.zeros(pad, np.float32)])
      params, opt_state, loss = step(params, opt_state, stacked, put(x), put(y), put(mask))
      losses.append(float(loss))
    log.info("learned soup%s epoch %d: loss %.4f", " by layer" if by_layer else "", epoch,
             losses[-1])
  # The soup split over the devices, so that no device (or simulated device) holds it whole.
  final_mix = jax.jit(mix, static_argnums=2,
                      **({} if shardings is None else {"out_shardings": shardings}))
  soup = final_mix(stacked, params["alpha"], by_layer)
  sharded = layout is not None and layout.is_sharded
  if not sharded:
    soup = jax.device_get(soup)
  if ingredients:
    reference = average.open_source(ingredients[0], verify=False)
    dtypes = {n: np.dtype(spec.dtype) for n, spec in reference.specs.items()}
    flat = trees.flatten_with_names(soup)
    soup = average.as_tree(
        {n: x.astype(dtypes[n]) if sharded else np.asarray(x).astype(dtypes[n], copy=False)
         for n, x in flat.items()}, reference)
  weights = np.asarray(jax.nn.softmax(params["alpha"], axis=-1))
  if by_layer:
    names = list(trees.flatten_with_names(stacked))
    weights = {name: weights[i].tolist() for i, name in enumerate(names)}
  else:
    weights = weights.tolist()
  if not sharded:
    soup = jax.tree.map(np.array, soup)
  return LearnedSoupResult(soup, weights, float(params["beta"]), losses)
