"""Where each array of the train state lives: sharding rules, as big_vision writes them.

`config.sharding_rules` is a sequence of (regex, rule) pairs matched against parameter
paths ("visual/transformer/resblocks_3/mlp/c_fc/kernel"); the first regex that fully
matches a path decides, and a path no regex matches is replicated. Rules:

  'replicate'                          every device holds the whole array (the default);
  'fsdp(axis="data")'                  split over the mesh axis along the largest dimension
                                       that the axis size divides; replicated if none does;
  'fsdp(axis="data", min_size_mb=4)'   the same, but arrays of at most 4 MiB stay
                                       replicated (big_vision's default threshold).

So `[(".*", 'fsdp(axis="data")')]` is ZeRO-3 / FSDP: params and both AdamW moments
split over the data axis; the jitted step's compiler inserts the all-gathers before
each use and reduce-scatters the gradients. The optimizer's moments mirror their
param's layout (same shape, same sharding); scalars (step, counts) are replicated.
Adapted from big_vision/sharding.py (infer_sharding, fsdp).
"""

from __future__ import annotations

import ast
import logging
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

PyTree = Any
Rules = Sequence[tuple[str, str]]
REPLICATED: Rules = ()
FSDP: Rules = ((".*", 'fsdp(axis="data")'),)

# A rule maps (name, shape, dtype, mesh) to a PartitionSpec.
Rule = Callable[[str, tuple, np.dtype, Mesh], P]


def leaf_name(path) -> str:
  """A key path as the rules see it: "visual/transformer/resblocks_3/mlp/c_fc/kernel"."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def named_leaves(tree: PyTree) -> dict[str, Any]:
  """Every leaf of any pytree (optimizer states included) by its path name."""
  return {leaf_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


class ShardingRuleError(ValueError):
  """config.sharding_rules is malformed or names a mesh axis that does not exist."""


def replicate() -> Rule:
  return lambda name, shape, dtype, mesh: P()


def fsdp(axis: str = "data", min_size_mb: float = 0.0) -> Rule:
  """Splits the largest dimension the axis size divides (ties: the first such dimension)."""

  def spec(name, shape, dtype, mesh):
    if axis not in mesh.shape:
      raise ShardingRuleError(f"sharding rule fsdp(axis={axis!r}) for {name}: the mesh has axes "
                              f"{tuple(mesh.shape)}; use one of those.")
    size = mesh.shape[axis]
    if int(np.prod(shape)) * np.dtype(dtype).itemsize <= min_size_mb * 2**20:
      return P()
    # Stable sort: among equal sizes the leading dimension wins.
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if shape[dim] % size == 0:
        return P(*(None,) * dim, axis)
    log.debug("fsdp: %s %s has no dimension divisible by %d; replicated.", name, shape, size)
    return P()

  return spec


RULES = {"replicate": replicate, "fsdp": fsdp}


def parse_rule(text: str) -> Rule:
  """'replicate' or 'fsdp(axis="data", min_size_mb=4)' -> a Rule (literal arguments only)."""
  try:
    node = ast.parse(text.strip(), mode="eval").body
    if isinstance(node, ast.Name):
      name, kwargs = node.id, {}
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args):
      name = node.func.id
      kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    else:
      raise ValueError("not a rule call")
    if name not in RULES:
      raise ValueError(f"unknown rule {name!r}")
    return RULES[name](**kwargs)
  except (SyntaxError, ValueError, TypeError) as e:
    raise ShardingRuleError(
        f"Bad sharding rule {text!r} ({e}): write 'replicate', 'fsdp(axis=\"data\")' or "
        "'fsdp(axis=\"data\", min_size_mb=4)'.") from e


def _compiled(rules: Rules) -> list[tuple[re.Pattern, Rule]]:
  out = []
  for item in rules or ():
    if len(item) != 2:
      raise ShardingRuleError(f"Each sharding rule is a (regex, rule) pair; got {item!r}.")
    pattern, rule = item
    try:
      out.append((re.compile(pattern), parse_rule(rule)))
    except re.error as e:
      raise ShardingRuleError(f"Bad regex {pattern!r} in config.sharding_rules: {e}.") from e
  return out


def check_rules(rules: Rules, axes: Sequence[str] = ("data",)) -> None:
  """Parses every rule and checks its mesh axis exists; needs no devices (validate.py)."""
  from jax.sharding import AbstractMesh
  mesh = AbstractMesh((1,) * len(axes), tuple(axes))
  for _, rule in _compiled(rules):
    rule("config.sharding_rules", (1,), np.dtype(np.float32), mesh)


def partition_specs(tree: PyTree, mesh: Mesh, rules: Rules) -> PyTree:
  """A PartitionSpec per leaf (arrays or ShapeDtypeStructs); first full match wins."""
  compiled = _compiled(rules)

  def spec(path, leaf):
    name = leaf_name(path)
    for pattern, rule in compiled:
      if pattern.fullmatch(name):
        return rule(name, tuple(np.shape(leaf)), np.dtype(leaf.dtype), mesh)
    return P()

  return jax.tree_util.tree_map_with_path(spec, tree)


def shardings(tree: PyTree, mesh: Mesh, rules: Rules) -> PyTree:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), partition_specs(tree, mesh, rules),
                      is_leaf=lambda x: isinstance(x, P))


def state_shardings(state: PyTree, mesh: Mesh, rules: Rules) -> PyTree:
  """Shardings of a train state {"step", "params", "opt_state"}.

  Params follow the rules; an optimizer leaf whose path ends in a param's path with
  the same shape (Adam's mu and nu) gets that param's sharding; the rest is replicated.
  """
  param_shardings = shardings(state["params"], mesh, rules)
  by_name = named_leaves(param_shardings)
  shapes = {k: np.shape(v) for k, v in named_leaves(state["params"]).items()}
  replicated = NamedSharding(mesh, P())

  def mirror(path, leaf):
    parts = leaf_name(path).split("/")
    for i in range(len(parts)):
      name = "/".join(parts[i:])
      if name in by_name and shapes[name] == np.shape(leaf):
        return by_name[name]
    return replicated

  out = {k: jax.tree.map(lambda _: replicated, v) for k, v in state.items()}
  out["params"] = param_shardings
  if "opt_state" in state:
    out["opt_state"] = jax.tree_util.tree_map_with_path(mirror, state["opt_state"])
  return out


def put(tree: PyTree, tree_shardings: PyTree) -> PyTree:
  """Host arrays (the same on every process) -> global arrays laid out as given.

  Each process transfers only the slices its own devices hold.
  """
  def one(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree.map(one, tree, tree_shardings)


def abstract(tree: PyTree, tree_shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs carrying shardings: an Orbax restore target, or jit's abstract input."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, tree_shardings)


def describe(tree_shardings: PyTree) -> dict[str, int]:
  """How many leaves are split and how many replicated (for the log)."""
  specs = [s.spec for s in jax.tree.leaves(tree_shardings)]
  split = sum(any(a is not None for a in spec) for spec in specs)
  return {"split": split, "replicated": len(specs) - split}
