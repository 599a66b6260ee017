"""FSDP: sharding rules, the sharded train state on 8 simulated devices, kill -9 and resume,
and soups of sharded ingredients over 2 processes x 4 devices (tests/fsdp_checks.py)."""

import json
import signal

import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from soup import sharding
from tests import fsdp_checks
from tests.conftest import free_port, run_python, run_python_together

pytestmark = pytest.mark.slow  # The pipeline or several processes: -m 'not slow' skips it.

MESH8 = AbstractMesh((8,), ("data",))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  # One compilation cache for the subprocesses: the resumed run reuses the killed run's step.
  cache = tmp_path_factory.mktemp("jax_cache")
  return {"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
          "JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


# --- Rules ----------------------------------------------------------------


def _specs(tree, rules):
  import jax
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, np.float32), tree,
                        is_leaf=lambda x: isinstance(x, tuple))
  return sharding.partition_specs(shapes, MESH8, rules)


def test_fsdp_splits_the_largest_divisible_dimension_else_replicates():
  specs = _specs({"kernel": (1664, 8192), "qkv": (24, 1664), "bias": (10,), "odd": (3, 5, 7),
                  "tie": (16, 16), "scalar": ()}, sharding.FSDP)
  assert specs == {"kernel": P(None, "data"), "qkv": P(None, "data"), "bias": P(), "odd": P(),
                   "tie": P("data"), "scalar": P()}


def test_first_matching_rule_wins_and_unmatched_paths_are_replicated():
  tree = {"visual": {"proj": (64, 16), "ln": {"scale": (64,)}}, "head": {"kernel": (16, 8)}}
  rules = [(r"visual/ln/.*", "replicate"), (r"visual/.*", 'fsdp(axis="data")')]
  assert _specs(tree, rules) == {"visual": {"proj": P("data"), "ln": {"scale": P()}},
                                 "head": {"kernel": P()}}
  # A size threshold keeps small arrays whole (big_vision's min_size_to_shard_mb).
  big = {"a": (1024, 1024), "b": (1024, 8)}
  assert _specs(big, [(".*", 'fsdp(axis="data", min_size_mb=1)')]) == {"a": P("data"), "b": P()}
  assert _specs(big, sharding.REPLICATED) == {"a": P(), "b": P()}


def test_bad_rules_get_one_line_errors():
  for rules, match in [([(".*", "fsdp(axis='model')")], "mesh has axes"),
                       ([(".*", "shard_everything")], "Bad sharding rule"),
                       ([(".*", "fsdp(__import__('os'))")], "Bad sharding rule"),
                       ([("(", "replicate")], "Bad regex"),
                       ([(".*",)], "pair")]:
    with pytest.raises(sharding.ShardingRuleError, match=match):
      _specs({"a": (8, 8)}, rules)


def test_config_check_names_a_bad_rule_before_any_compute(tmp_path):
  from configs import clip_vit_bigg14_imagenet as bigg
  from soup import validate
  config = bigg.get_config("smoke")
  validate.check(config, bigg.get_sweep, (), tmp_path)  # The config's own rules pass.
  config.sharding_rules = ((".*", "fsdp(axis='model')"),)
  with pytest.raises(validate.ConfigError, match="mesh has axes"):
    validate.check(config, bigg.get_sweep, (), tmp_path)


def test_giant_tower_under_fsdp_on_8_devices():
  """ViT-bigG-14's image tower: what stays whole under FSDP on 8 devices (shapes only)."""
  import jax
  import jax.numpy as jnp

  from soup.models import clip
  model = clip.CLIPImageClassifier(clip.get_config("ViT-bigG-14"), num_classes=1000)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
  specs = jax.tree.leaves(sharding.partition_specs(shapes, MESH8, sharding.FSDP),
                          is_leaf=lambda x: isinstance(x, P))
  sizes = [x.size for x in jax.tree.leaves(shapes)]
  whole = sum(n for n, s in zip(sizes, specs) if s == P())
  assert sum(sizes) == 1_844_907_264 + 1280 * 1000 + 1000
  assert whole == 0  # Every leaf, the 1000-class head bias included, has a dimension 8 divides.


# --- 8 simulated devices, 2 processes -------------------------------------


def test_fsdp_state_bytes_equivalence_to_replication_and_one_compile(env):
  proc = run_python(["tests/fsdp_checks.py", "layout"], env)
  assert "layout: ok" in proc.stdout


def test_kill_9_and_resume_under_fsdp_is_bit_identical(env, tmp_path):
  workdir = str(tmp_path / "run")
  killed = run_python(["tests/fsdp_checks.py", "killed", workdir, "13"], env, check=False)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert (tmp_path / "run" / "train_state" / "10").is_dir()  # The step-10 checkpoint survived.
  proc = run_python(["tests/fsdp_checks.py", "resume", workdir], env)
  assert "resume: ok" in proc.stdout


def test_sharded_soups_on_2_processes_equal_host_soups_and_each_read_half(tmp_path):
  from soup import metrics, soups, trees as tree_lib

  port, out = free_port(), tmp_path / "result"
  run_python_together([["tests/fsdp_checks.py", "soups", str(r), str(port),
                        str(tmp_path / "ingredients"), str(out)] for r in (0, 1)],
                      {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, timeout=300)
  got = [json.loads((tmp_path / f"result.{r}.json").read_text()) for r in (0, 1)]

  # The same soups on one host, from the same ingredients.
  trees = fsdp_checks.soup_ingredients()
  names = [f"model_{i}" for i in range(4)]
  x, y = fsdp_checks.soup_heldout()
  import jax
  apply = jax.jit(fsdp_checks.soup_apply)
  evaluate = lambda p: metrics.accuracy(np.asarray(apply(p, x)), y)
  scores = {n: evaluate(t) for n, t in zip(names, trees)}
  uniform = soups.weighted_average(trees)
  greedy = soups.greedy_soup(dict(zip(names, trees)), scores, evaluate)
  wise = {str(a): evaluate(soups.wise_ft(trees[0], trees[1], a)) for a in (0.0, 0.5, 1.0)}
  assert len(set(scores.values())) > 1 and 1 < len(greedy.ingredients) < 4  # Choices were made.
  for g in got:
    assert g["scores"] == scores and g["greedy"] == greedy.ingredients and g["wise"] == wise
    assert g["greedy_held_out"] == greedy.held_out
  with np.load(f"{out}.npz") as soup_arrays:
    for key, expected in (("uniform", uniform), ("greedy", greedy.result)):
      for name, value in tree_lib.flatten_with_names(expected).items():
        np.testing.assert_allclose(soup_arrays[f"{key}/{name}"], value, rtol=2e-6, atol=1e-6,
                                   err_msg=f"{key}/{name}")

  # Each process read its half of the ingredient bytes it restored (the reader's own count),
  # plus the one replicated 5-value leaf.
  ingredient_bytes = sum(t.nbytes for t in jax.tree.leaves(trees[0]))
  restores = 4 + 4 + 4 + 4  # uniform, scores, greedy (first + 3 candidates), WiSE-FT (1+2+1).
  for g in got:
    share = g["read_bytes"] / (restores * ingredient_bytes)
    print(f"process read {g['read_bytes']} bytes = {share:.4f} of the restored ingredients")
    assert 0.5 <= share <= 0.51, share


def test_sharded_ingredients_round_trip_and_detect_corruption(tmp_path):
  import jax

  from soup import checkpoints, mesh as mesh_lib, soups
  mesh = mesh_lib.make_mesh()
  tree = fsdp_checks.soup_ingredients(1)[0]
  shardings = sharding.shardings(tree, mesh, sharding.FSDP)
  layout = soups.Layout.sharded(mesh, sharding.FSDP)
  # Saved shard by shard (no gather), and from host arrays as a replicated run saves.
  checkpoints.save_ingredient(tmp_path / "a", sharding.put(tree, shardings),
                              {"recipe": "individual"})
  checkpoints.save_ingredient(tmp_path / "b", tree)
  assert checkpoints.ingredient_metadata(tmp_path / "a")["metadata"] == {"recipe": "individual"}
  chunks = {n: fp["chunk"] for n, fp in
            checkpoints.ingredient_metadata(tmp_path / "a")["fingerprints"].items()}
  shard_shapes = {n: list(shardings[n].shard_shape(np.shape(x))) for n, x in tree.items()}
  assert chunks == shard_shapes, chunks  # One chunk per shard.
  for name in ("a", "b"):
    restored = soups.restore(tmp_path / name, layout)
    assert jax.tree.all(jax.tree.map(lambda x, s: x.sharding == s, restored, shardings))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), tree)
    # Plain Orbax reads it too.
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as checkpointer:
      jax.tree.map(np.testing.assert_array_equal,
                   checkpointer.restore((tmp_path / name / "params").absolute()), tree)
  # The uniform soup of one ingredient is that ingredient.
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(soups.weighted_average([tmp_path / "a"], layout=layout)), tree)

  # Damaged bytes in the largest data file: a read error or a shard fingerprint mismatch.
  data = max((p for p in (tmp_path / "a" / "params").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)
  data.write_bytes(bytes(raw))
  with pytest.raises(checkpoints.CheckpointError, match="corrupted"):
    soups.restore(tmp_path / "a", layout)
  with pytest.raises(checkpoints.CheckpointError, match="not a complete ingredient"):
    soups.restore(tmp_path / "missing", layout)
