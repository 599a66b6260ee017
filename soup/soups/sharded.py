"""Soups of giant ingredients, kept in the FSDP layout from disk to the held-out evaluation.

A ViT-G-class ingredient is ~7 GB (float32), 58 of them ~400 GB: no host should hold
one whole. Here every ingredient is restored by Orbax straight into a sharding (each
process reads only the chunks of its own devices' shards), the running mean lives
sharded on the devices, and candidate soups are scored by an `evaluate(params)` that
receives the sharded params (soup.evaluate.Evaluator keeps them sharded; the compiler
gathers each layer where it is used).

The arithmetic is the one of soup/soups/average.py: mean_k = mean_{k-1} + (w_k / W_k)
(x_k - mean_{k-1}) in float32, so the results equal the host soups to float32 rounding.

Ingredients written with `save_ingredient` from sharded params are chunked per shard
(Orbax writes each shard as its own chunk), which is what lets a later restore on the
same layout read only its part. Each process also records a CRC-32 per shard it wrote;
a restore on the same layout checks the shards it read against them.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from soup import atomic_io, checkpoints, sharding as sharding_lib, trees
from soup.soups import average, greedy

log = logging.getLogger(__name__)

PyTree = Any
SHARD_FILE = "shards.process{}.json"


# --- Writing and reading sharded ingredients --------------------------------


def _index_key(index: tuple) -> str:
  return ",".join(f"{s.start or 0}:{s.stop if s.stop is not None else ''}" for s in index)


def _shard_crcs(params: PyTree) -> dict[str, dict[str, str]]:
  """CRC-32 of every shard this process holds (one replica of each)."""
  out: dict[str, dict[str, str]] = {}
  for name, leaf in trees.flatten_with_names(params).items():
    for shard in leaf.addressable_shards:
      if shard.replica_id == 0:
        data = np.ascontiguousarray(np.asarray(shard.data))
        out.setdefault(name, {})[_index_key(shard.index)] = (
            f"{zlib.crc32(data.reshape(-1).view(np.uint8)):08x}")
  return out


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def save_ingredient(path: str | os.PathLike, params: PyTree,
                    metadata: Optional[Mapping] = None) -> None:
  """Saves sharded params as an ingredient; every process calls it and writes its shards.

  Same folder layout as checkpoints.save_ingredient (params/ then ingredient.json,
  written last so its presence means complete). Fingerprints are per shard, one file
  per process; ingredient.json records dtype and shape of every leaf.
  """
  path = Path(path).absolute()
  if jax.process_index() == 0 and path.exists():
    import shutil
    shutil.rmtree(path)  # A leftover from an interrupted write.
  _barrier(f"ingredient-clean:{path}")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / "params", params)
  checkpointer.wait_until_finished()
  checkpointer.close()
  atomic_io.atomic_write_text(path / SHARD_FILE.format(jax.process_index()),
                            json.dumps(_shard_crcs(params)))
  _barrier(f"ingredient-shards:{path}")
  if jax.process_index() == 0:
    leaves = trees.flatten_with_names(params)
    info = {"fingerprints": {k: f"{np.dtype(v.dtype)}{list(v.shape)}:sharded"
                             for k, v in leaves.items()},
            "sharded": True, "metadata": dict(metadata or {})}
    atomic_io.atomic_write_text(path / checkpoints.INGREDIENT_FILE, json.dumps(info, indent=1))
  _barrier(f"ingredient-done:{path}")


def _recorded_crcs(path: Path) -> dict[str, dict[str, str]]:
  out: dict[str, dict[str, str]] = {}
  for f in sorted(path.glob(SHARD_FILE.format("*"))):
    for name, shards in json.loads(f.read_text()).items():
      out.setdefault(name, {}).update(shards)
  return out


def restore(path: str | os.PathLike, shardings: PyTree, verify: bool = True) -> PyTree:
  """An ingredient restored straight into `shardings` (a NamedSharding per leaf).

  Each process reads only what its devices hold (plus whatever shares a chunk with
  it). With verify, the shards read are checked against the CRCs recorded at save
  time when the layouts agree; ingredients saved from host arrays have whole-leaf
  fingerprints, which need the whole leaf, so only their shapes and dtypes are checked.
  """
  path = Path(path).absolute()
  info = checkpoints.ingredient_metadata(path)
  shapes = checkpoints.ingredient_shapes(path)
  target = sharding_lib.abstract(shapes, shardings)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      params = checkpointer.restore(path / "params", target)
  except Exception as e:  # Orbax/tensorstore raise many types for broken files.
    raise checkpoints.CheckpointError(
        f"Cannot restore ingredient {path} into its sharding: {type(e).__name__}: {e}. The "
        "checkpoint is corrupted or truncated, or of another model; delete it and rerun that "
        "member.") from e
  if verify:
    _verify(path, info, params)
  return params


def _verify(path: Path, info: dict, params: PyTree) -> None:
  expected = info["fingerprints"]
  leaves = trees.flatten_with_names(params)
  for name, leaf in leaves.items():
    if not str(expected.get(name, "")).startswith(f"{np.dtype(leaf.dtype)}{list(leaf.shape)}:"):
      raise checkpoints.CheckpointError(
          f"Ingredient {path}: leaf {name} is {leaf.dtype}{list(leaf.shape)}, but "
          f"{checkpoints.INGREDIENT_FILE} says {expected.get(name)}. Delete it and rerun that "
          "member.")
  if not info.get("sharded"):
    return
  recorded, got, unchecked = _recorded_crcs(path), _shard_crcs(params), 0
  for name, shards in got.items():
    for index, crc in shards.items():
      want = recorded.get(name, {}).get(index)
      if want is None:
        unchecked += 1  # Saved under another layout: that shard was never fingerprinted.
      elif want != crc:
        raise checkpoints.CheckpointError(
            f"Ingredient {path} is corrupted: shard [{index}] of {name} does not match its "
            "saved fingerprint. Delete it and rerun that member.")
  if unchecked:
    log.info("%s: %d shards read in another layout than saved; not fingerprint-checked.",
             path, unchecked)


def ingredient_shardings(path: str | os.PathLike, mesh: Mesh,
                         rules: sharding_lib.Rules = sharding_lib.FSDP) -> PyTree:
  """The layout `rules` give to an ingredient's params (from its metadata; no array I/O)."""
  return sharding_lib.shardings(checkpoints.ingredient_shapes(path), mesh, rules)


# --- Arithmetic on sharded trees (the layout of the first argument is kept) ---


@jax.jit
def _to_float32(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


# The running mean is donated: its buffers become the new mean, no second copy.
_update = jax.jit(average.running_update.__wrapped__, donate_argnums=0)
_candidate = jax.jit(average.running_update.__wrapped__)


@jax.jit
def _interpolate(a, b, alpha):
  return jax.tree.map(
      lambda x, y: ((1 - alpha) * x.astype(jnp.float32) + alpha * y.astype(jnp.float32)
                    ).astype(x.dtype), a, b)


@jax.jit
def _zeros_like(tree):
  return jax.tree.map(jnp.zeros_like, tree)


def _cast_like(tree: PyTree, reference: PyTree) -> PyTree:
  return jax.tree.map(lambda m, r: m if m.dtype == r.dtype else m.astype(r.dtype), tree, reference)


def _check_compatible(first: Path, path: Path) -> None:
  average.check_compatible(checkpoints.ingredient_shapes(first),
                           checkpoints.ingredient_shapes(path),
                           str(first), str(path))


# --- Recipes --------------------------------------------------------------


def uniform_soup(paths: Sequence[str | os.PathLike], shardings: PyTree,
                 weights: Optional[Sequence[float]] = None, verify: bool = True) -> PyTree:
  """Weighted mean of ingredients, restored one at a time into `shardings`; float32 result
  kept in the ingredients' dtype, sharded. Peak per device: 1/D of the mean and of one
  ingredient (plus replicated leaves)."""
  if not paths:
    raise ValueError("Cannot average zero ingredients.")
  paths = [Path(p) for p in paths]
  w = average.checked_weights(len(paths), weights)
  reference = mean = None
  total = 0.0
  for i, path in enumerate(paths):
    if i:
      _check_compatible(paths[0], path)
    params = restore(path, shardings, verify)
    total += w[i]
    if reference is None:
      reference = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
      mean = _to_float32(params)
      if w[0] == 0:
        mean = _zeros_like(mean)
    elif w[i] > 0:
      mean = _update(mean, params, np.float32(w[i] / total))
    del params
  return _cast_like(mean, reference)


def greedy_soup(ingredients: Mapping[str, str | os.PathLike], held_out_scores: Mapping[str, float],
                evaluate: Callable[[PyTree], float], shardings: PyTree, comparison: str = ">",
                verify: bool = True) -> greedy.GreedyResult:
  """The paper's greedy soup on sharded params: candidates restored into `shardings`, the
  running mean and every candidate soup sharded, `evaluate` called on sharded params."""
  order = greedy.ranked({n: held_out_scores[n] for n in ingredients})
  first_path = Path(ingredients[order[0]])
  first = restore(first_path, shardings, verify)
  reference = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), first)
  state = {"mean": _to_float32(first), "count": 1, "candidate": None}
  del first

  def try_candidate(name):
    _check_compatible(first_path, Path(ingredients[name]))
    params = restore(ingredients[name], shardings, verify)
    state["candidate"] = None  # The rejected candidate's buffers go before the next is made.
    state["candidate"] = _candidate(state["mean"], params, np.float32(1.0 / (state["count"] + 1)))
    del params
    return float(evaluate(_cast_like(state["candidate"], reference)))

  def accept(name):
    state["mean"], state["count"] = state["candidate"], state["count"] + 1

  selected, best, history = greedy.greedy_select(order, float(held_out_scores[order[0]]),
                                                 try_candidate, accept, comparison,
                                                 "sharded greedy soup")
  return greedy.GreedyResult(selected, best, history, _cast_like(state["mean"], reference))


def wise_ft(initial: str | os.PathLike, finetuned: str | os.PathLike, alphas: Sequence[float],
            shardings: PyTree, evaluate: Optional[Callable[[PyTree], float]] = None,
            verify: bool = True) -> dict[float, Any]:
  """WiSE-FT, theta(alpha) = (1 - alpha) theta_0 + alpha theta_ft, on sharded params.

  Returns {alpha: held-out score} when `evaluate` is given, else {alpha: sharded params}
  (hold one alpha at a time for a giant model: pass evaluate).
  """
  _check_compatible(Path(initial), Path(finetuned))
  a = restore(initial, shardings, verify)
  b = restore(finetuned, shardings, verify)
  out = {}
  for alpha in alphas:
    mixed = _interpolate(a, b, np.float32(alpha))
    out[float(alpha)] = float(evaluate(mixed)) if evaluate else mixed
    del mixed
  return out
