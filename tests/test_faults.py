"""Fault injection: kills, torn checkpoint writes, bad ingredients, bad configs.

Every test runs the real CLI (`python -m soup.main`, smoke config) in a
subprocess, injects one fault and asserts what a user would see. Kills are
deterministic: a small runner script (RUNNER below) monkeypatches one function
to SIGKILL its own process at a chosen call, so no test hook lives in library
code. One uninterrupted baseline run is shared by the module; every other test
copies the parts of its workdir it needs (never pretraining again), so the
file takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from soup import atomic_io, recipes, results as R
from soup.data.fashion_mnist_tfds import default_data_dir
from tests.conftest import ROOT as REPO, run_python

pytestmark = pytest.mark.slow  # The pipeline or several processes: -m 'not slow' skips it.

CONFIG = "configs/fashion_mnist.py:smoke"
# Only the recipes these tests compare: the learned soups would triple each run.
RECIPES = "--config.soups.recipes=('best_individual','uniform_soup','greedy_soup')"
ALL_AFTER_PROBE = "--config.stages=('sweep','evaluate','soups','report')"
EVAL_SOUPS = "--config.stages=('evaluate','soups','report')"
SOUP_NAMES = ("uniform_soup", "greedy_soup")
# Smoke fine-tunes: 1024 examples / batch 128 = 8 steps, a train state every 4.
STEPS, CKPT_EVERY = 8, 4

# Runs soup.main with one fault armed, described by $SOUP_FAULT (JSON):
#   {"kind": "step", "member": "model_2", "call": 7}: SIGKILL before that member's
#       7th train step (host batch -> device), i.e. mid-training.
#   {"kind": "orbax_commit", "path": "models/model_1/train_state"}: SIGKILL when Orbax
#       commits (renames) a checkpoint under that path: its data is written, the
#       commit is not.
#   {"kind": "write", "path": "models/model_1/ingredient/ingredient.json"}: SIGKILL
#       when atomic_write_text is asked to write that file (params already saved).
#   {"kind": "replace"}: SIGKILL inside os.replace of an atomic write.
RUNNER = r'''
import json, os, signal, sys
import soup.main  # Sets XLA_FLAGS before jax starts.

fault = json.loads(os.environ.get("SOUP_FAULT", "null"))


def die(what):
  print(f"[fault] SIGKILL at {what}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)


kind = fault and fault["kind"]
if kind == "step":
  from soup import train
  current = {"name": None, "calls": 0}
  orig_train, orig_batch = train.train, train.mesh_lib.global_batch

  def patched_train(**kw):
    current.update(name=os.path.basename(str(kw["workdir"])), calls=0)
    return orig_train(**kw)

  def patched_batch(*a, **k):
    if current["name"] == fault["member"]:
      current["calls"] += 1
      if current["calls"] == fault["call"]:
        die(f"{fault['member']} train step call {fault['call']}")
    return orig_batch(*a, **k)

  train.train = patched_train
  train.mesh_lib.global_batch = patched_batch
elif kind == "orbax_commit":
  from orbax.checkpoint._src.path import atomicity
  orig_finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *a, **k):
    if fault["path"] in str(self.get()):
      die(f"Orbax commit of {self.get()}")
    return await orig_finalize(self, *a, **k)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize
elif kind == "write":
  from soup import atomic_io
  orig_write = atomic_io.atomic_write_text

  def atomic_write_text(path, text):
    if str(path).endswith(fault["path"]):
      die(f"write of {path}")
    return orig_write(path, text)

  atomic_io.atomic_write_text = atomic_write_text
elif kind == "replace":
  os.replace = lambda src, dst: die(f"os.replace({src}, {dst})")

if kind == "replace":
  from soup import atomic_io
  atomic_io.atomic_write_text(sys.argv[1], sys.argv[2])
else:
  from absl import app
  sys.argv[0] = "soup.main"
  app.run(soup.main.main)
'''


# --- Helpers ---------------------------------------------------------------


def run_cli(workdir: Path, *args: str, fault: dict | None = None, env: dict | None = None,
            config: str = CONFIG, timeout: float = 240) -> subprocess.CompletedProcess:
  """The CLI on the smoke config, with the test recipes, optionally with a fault armed."""
  env = {**(env or {}), "SOUP_FAULT": None if fault is None else json.dumps(fault)}
  cmd = ["-m", "soup.main"] if fault is None else ["-c", RUNNER]
  cmd += [f"--config={config}", f"--workdir={workdir}", RECIPES, *args]
  return run_python(cmd, env, timeout=timeout, check=False)


def output(proc: subprocess.CompletedProcess) -> str:
  return proc.stdout + proc.stderr


def expect_ok(proc: subprocess.CompletedProcess) -> None:
  assert proc.returncode == 0, f"exit {proc.returncode}:\n{output(proc)[-4000:]}"


def expect_killed(proc: subprocess.CompletedProcess) -> None:
  assert proc.returncode == -signal.SIGKILL, (
      f"expected SIGKILL, got exit {proc.returncode}:\n{output(proc)[-4000:]}")
  assert "[fault] SIGKILL" in proc.stderr


def expect_failed(proc: subprocess.CompletedProcess) -> str:
  assert proc.returncode not in (0, -signal.SIGKILL), (
      f"expected a clean failure, got exit {proc.returncode}:\n{output(proc)[-4000:]}")
  return output(proc)


def copy_workdir(baseline: Path, dst: Path, members=("model_0",)) -> Path:
  """A workdir holding the baseline's config, upstream model and the given ingredients
  (bytes and mtimes preserved), as if an earlier run had stopped right there."""
  dst.mkdir(parents=True)
  shutil.copy2(baseline / "config.json", dst / "config.json")
  shutil.copytree(baseline / "upstream" / "ingredient", dst / "upstream" / "ingredient")
  for name in members:
    shutil.copytree(baseline / "models" / name / "ingredient", dst / "models" / name / "ingredient")
  return dst


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
  """Every file under root: (size, mtime_ns, bytes)."""
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
          for p in sorted(root.rglob("*")) if p.is_file()}


def load_params(path: Path):
  from soup import checkpoints
  return checkpoints.load_ingredient(path)


def assert_trees_identical(a, b, what: str) -> None:
  from soup import trees as tree_lib
  fa, fb = tree_lib.flatten_with_names(a), tree_lib.flatten_with_names(b)
  assert fa.keys() == fb.keys(), what
  differ = [k for k in fa if fa[k].dtype != fb[k].dtype or not np.array_equal(fa[k], fb[k])]
  assert not differ, f"{what}: leaves {differ[:5]} differ"


def accuracies(workdir: Path) -> dict[str, dict[str, float]]:
  cols = R.FASHION_MNIST.all + ("avg_shifts",)
  return {r["model_name"]: {c: r[c] for c in cols} for r in R.read(workdir / "results.jsonl")}


def assert_same_soups(workdir: Path, baseline: Path) -> None:
  """Bit-identical members, soups and results.jsonl accuracies."""
  for name in ("model_1", "model_2", "model_3"):
    assert_trees_identical(load_params(workdir / "models" / name / "ingredient"),
                           load_params(baseline / "models" / name / "ingredient"), name)
  for name in SOUP_NAMES:
    assert_trees_identical(load_params(workdir / "soups" / name),
                           load_params(baseline / "soups" / name), name)
  assert accuracies(workdir) == accuracies(baseline)


def metrics_steps(workdir: Path, name: str) -> list[int]:
  path = workdir / "models" / name / "logs" / "metrics.jsonl"
  return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def smoke_config():
  from configs import fashion_mnist
  return fashion_mnist.get_config("smoke")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
  """One uninterrupted smoke run (every stage), shared by every test."""
  if not (Path(default_data_dir()) / "fashion_mnist").is_dir():
    pytest.skip(f"TFDS fashion_mnist is not prepared in {default_data_dir()}: run "
                "scripts/setup.sh (or `python -m soup.data.prepare`).")
  workdir = tmp_path_factory.mktemp("baseline") / "run"
  expect_ok(run_cli(workdir))
  for name in SOUP_NAMES:
    assert (workdir / "soups" / name / "ingredient.json").exists()
  return workdir


# --- 1. kill -9 mid-training -----------------------------------------------


def test_kill_mid_training_resumes_bit_identically(baseline, tmp_path):
  workdir = copy_workdir(baseline, tmp_path / "run")
  # model_1 completes; model_2 dies before its 7th step (after the step-4 train state).
  killed = run_cli(workdir, "--config.stages=('sweep',)",
                   fault={"kind": "step", "member": "model_2", "call": 7})
  expect_killed(killed)
  models = workdir / "models"
  assert (models / "model_1" / "ingredient" / "ingredient.json").exists()
  assert not (models / "model_2" / "ingredient" / "ingredient.json").exists()
  assert not (models / "model_3").exists()
  assert (models / "model_2" / "train_state" / str(CKPT_EVERY)).is_dir()
  steps_before = metrics_steps(workdir, "model_2")
  assert steps_before == [2, 4, 6]
  done = {d: snapshot(workdir / d) for d in
          ("upstream", "models/model_0", "models/model_1/ingredient")}

  rerun = run_cli(workdir, ALL_AFTER_PROBE)
  expect_ok(rerun)
  # Completed members are untouched: same bytes and mtimes.
  for d, snap in done.items():
    assert snapshot(workdir / d) == snap, f"{d} was rewritten"
  # model_2 resumed from its step-4 train state, not from scratch.
  assert f"resuming at step {CKPT_EVERY} of {STEPS}" in (workdir / "log.txt").read_text()
  resumed = metrics_steps(workdir, "model_2")[len(steps_before):]
  assert resumed and resumed[0] > CKPT_EVERY, resumed
  assert resumed == [6, 8]
  assert_same_soups(workdir, baseline)


# --- 2. kill -9 mid-checkpoint write ---------------------------------------


def test_kill_mid_checkpoint_writes(baseline, tmp_path):
  workdir = copy_workdir(baseline, tmp_path / "run")
  member = workdir / "models" / "model_1"
  # (a) The Orbax train-state save at step 4: data written, commit (rename) not done.
  killed = run_cli(workdir, "--config.stages=('sweep',)",
                   fault={"kind": "orbax_commit", "path": "models/model_1/train_state"})
  expect_killed(killed)
  assert not (member / "train_state" / str(CKPT_EVERY)).exists()
  assert list((member / "train_state").iterdir()), "expected a torn, uncommitted save"
  assert not (member / "ingredient").exists()
  assert metrics_steps(workdir, "model_1") == [2, CKPT_EVERY]  # Logged, then killed saving.

  # (b) The ingredient save: Orbax params committed, ingredient.json not written.
  killed = run_cli(workdir, "--config.stages=('sweep',)",
                   fault={"kind": "write", "path": "models/model_1/ingredient/ingredient.json"})
  expect_killed(killed)
  assert (member / "ingredient" / "params" / "commit_success.txt").exists()
  assert not (member / "ingredient" / "ingredient.json").exists()
  # The torn train state of (a) was discarded: model_1 started over from step 0.
  assert "resuming" not in (workdir / "log.txt").read_text()
  assert metrics_steps(workdir, "model_1") == [2, 4] + [2, 4, 6, 8]
  # The final train state is checkpointed too, so the kill before ingredient.json lost nothing.
  assert (member / "train_state" / str(STEPS)).is_dir()

  # (c) The rerun restores model_1's final state, trains no step again, writes the ingredient.
  expect_ok(run_cli(workdir, ALL_AFTER_PROBE))
  assert f"resuming at step {STEPS} of {STEPS}" in (workdir / "log.txt").read_text()
  assert metrics_steps(workdir, "model_1") == [2, 4] + [2, 4, 6, 8]
  assert (member / "ingredient" / "ingredient.json").exists()
  assert_same_soups(workdir, baseline)


# --- 3-5. Bad ingredients: corrupted, another architecture, diverged -------


def bad_workdir(baseline: Path, dst: Path) -> Path:
  """Baseline's trained members, no evaluation or soups yet."""
  workdir = copy_workdir(baseline, dst, ("model_0", "model_1", "model_2", "model_3"))
  shutil.copy2(baseline / "sweep.json", workdir / "sweep.json")
  return workdir


def largest_data_file(ingredient: Path) -> Path:
  files = [p for p in (ingredient / "params").rglob("*") if p.is_file()
           and not p.name.startswith((".", "_")) and p.name != "commit_success.txt"]
  return max(files, key=lambda p: p.stat().st_size)


def check_excluded(workdir: Path, baseline: Path, bad: str, reason: str) -> None:
  """`bad` is excluded, logged and named in results; the soups are those of the rest."""
  log = (workdir / "log.txt").read_text()
  assert f"excluding {bad}" in log
  rows = R.read(workdir / "results.jsonl")
  assert bad not in {r["model_name"] for r in rows}
  soups = {r["model_name"]: r for r in rows if r["recipe"] in SOUP_NAMES}
  assert set(soups) == set(SOUP_NAMES)
  rest = [n for n in ("model_0", "model_1", "model_2", "model_3") if n != bad]
  for row in soups.values():
    excluded = row["excluded"]
    assert bad in excluded and reason.lower() in excluded[bad].lower(), excluded
    assert bad not in row["ingredients"] and row["ingredients_considered"] == rest
  from soup import mesh as mesh_lib, soups as soup_lib
  paths = {n: baseline / "models" / n / "ingredient" for n in rest}
  # The experiment averages in the run's layout (the host's, numpy's update, for a config
  # without sharding rules); so does this call, which makes the comparison exact.
  layout = soup_lib.Layout.of_run(mesh_lib.make_mesh())
  assert_trees_identical(load_params(workdir / "soups" / "uniform_soup"),
                         soup_lib.weighted_average([paths[n] for n in rest], layout=layout),
                         "uniform soup vs. the mean of the remaining members")
  greedy = soups["greedy_soup"]["ingredients"]
  assert_trees_identical(load_params(workdir / "soups" / "greedy_soup"),
                         soup_lib.weighted_average([paths[n] for n in greedy], layout=layout),
                         "greedy soup vs. the mean of its ingredients")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_ingredient(baseline, tmp_path, damage):
  workdir = bad_workdir(baseline, tmp_path / "run")
  data = largest_data_file(workdir / "models" / "model_2" / "ingredient")
  raw = bytearray(data.read_bytes())
  if damage == "truncate":
    raw = raw[: len(raw) // 2]
  else:
    for i in range(len(raw) // 3, len(raw) // 3 + 64):
      raw[i] ^= 0xFF
  data.write_bytes(bytes(raw))

  if damage == "truncate":  # The error mode, once: fails, naming the member.
    text = expect_failed(run_cli(workdir, EVAL_SOUPS, "--config.soups.on_bad_ingredient=error"))
    assert "model_2" in text and ("corrupt" in text or "truncated" in text), text[-3000:]
    assert not (workdir / "results.jsonl").exists()
    assert not (workdir / "soups" / "uniform_soup").exists()
    return
  expect_ok(run_cli(workdir, EVAL_SOUPS, "--config.soups.on_bad_ingredient=exclude"))
  check_excluded(workdir, baseline, "model_2", "corrupt")


def test_ingredient_of_another_architecture(baseline, tmp_path):
  import jax

  from soup import checkpoints, models, trees as tree_lib
  workdir = bad_workdir(baseline, tmp_path / "run")
  config = smoke_config().copy_and_resolve_references()
  with config.unlocked():
    config.model.width = 48
  # A width-48 ViT's param tree (shapes from eval_shape: no slow eager init), random values.
  shapes = jax.eval_shape(models.build(config.model, 10).init, jax.random.key(0),
                          np.zeros((1, 28, 28, 1), np.float32))["params"]
  rng = np.random.default_rng(0)
  wide = jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(s.dtype), shapes)
  target = workdir / "models" / "model_2" / "ingredient"
  checkpoints.save_ingredient(target, wide, {"recipe": "individual"})
  narrow = checkpoints.ingredient_shapes(workdir / "models" / "model_0" / "ingredient")
  differ = [k for k, v in tree_lib.flatten_with_names(narrow).items()
            if tuple(v.shape) != tree_lib.flatten_with_names(wide)[k].shape]
  assert differ

  text = expect_failed(run_cli(workdir, EVAL_SOUPS, "--config.soups.on_bad_ingredient=error"))
  assert "model_2" in text and f"'{differ[0]}' has shape" in text, text[-3000:]
  assert not (workdir / "results.jsonl").exists()

  expect_ok(run_cli(workdir, EVAL_SOUPS, "--config.soups.on_bad_ingredient=exclude"))
  check_excluded(workdir, baseline, "model_2", differ[0])


DIVERGING_CONFIG = """
from configs import fashion_mnist as _base


get_config = _base.get_config


def get_sweep(config):
  members = _base.get_sweep(config)
  members[1]["lr"] = 1e30  # model_2 blows up to inf/NaN within a few steps.
  return members
"""


def test_diverged_member(baseline, tmp_path):
  workdir = copy_workdir(baseline, tmp_path / "run", ("model_0", "model_1", "model_3"))
  config = tmp_path / "diverging.py"
  config.write_text(DIVERGING_CONFIG)
  args = [ALL_AFTER_PROBE]
  # The member really trains and diverges; exclude mode soups the rest.
  expect_ok(run_cli(workdir, *args, "--config.soups.on_bad_ingredient=exclude",
                    config=f"{config}:smoke"))
  meta = json.loads((workdir / "models" / "model_2" / "ingredient" / "ingredient.json").read_text())
  assert meta["metadata"]["diverged"] is True
  assert "stopping this run as diverged" in (workdir / "log.txt").read_text()
  check_excluded(workdir, baseline, "model_2", "diverged")

  text = expect_failed(run_cli(workdir, *args, "--config.soups.on_bad_ingredient=error",
                               config=f"{config}:smoke"))
  assert "model_2 diverged" in text, text[-3000:]


def test_nan_ingredient_not_flagged_diverged(baseline, tmp_path):
  """NaN params whose metadata says diverged=False (e.g. the last update overflowed after
  the last finite loss): caught by their values, never averaged into a soup."""
  from soup import checkpoints
  workdir = bad_workdir(baseline, tmp_path / "run")
  target = workdir / "models" / "model_2" / "ingredient"
  params = checkpoints.load_ingredient(target)
  params["head"]["kernel"] = np.full_like(params["head"]["kernel"], np.nan)
  meta = checkpoints.ingredient_metadata(target)["metadata"]
  assert meta["diverged"] is False
  checkpoints.save_ingredient(target, params, meta)

  text = expect_failed(run_cli(workdir, EVAL_SOUPS, "--config.soups.on_bad_ingredient=error"))
  assert "model_2 has non-finite values" in text and "head/kernel" in text, text[-3000:]
  assert not (workdir / "results.jsonl").exists()

  expect_ok(run_cli(workdir, EVAL_SOUPS, "--config.soups.on_bad_ingredient=exclude"))
  check_excluded(workdir, baseline, "model_2", "non-finite")


# --- 6. Config and environment errors --------------------------------------


def test_unknown_config_key(tmp_path):
  text = expect_failed(run_cli(tmp_path / "run", "--config.sweep.num_memberz=3"))
  assert "num_memberz" in text, text[-3000:]
  assert not (tmp_path / "run" / "models").exists()


def test_missing_dataset(tmp_path):
  empty = tmp_path / "empty_tfds"
  empty.mkdir()
  text = expect_failed(run_cli(tmp_path / "run", env={"TFDS_DATA_DIR": str(empty)}))
  assert "python -m soup.data.prepare" in text, text[-3000:]
  assert "apt-get install" in text and "dataset-fashion-mnist" in text
  assert str(empty) in text


def test_workdir_of_another_config(baseline, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(baseline, workdir)
  before = snapshot(workdir)
  text = expect_failed(run_cli(workdir, "--config.model.width=48"))
  assert "different config" in text and "model.width" in text, text[-3000:]
  after = snapshot(workdir)
  assert after.keys() == before.keys(), sorted(after.keys() ^ before.keys())
  assert [k for k in before if before[k] != after[k]] == []


# --- 7. Atomic writes -------------------------------------------------------


def temp_leftovers(directory: Path) -> list[str]:
  return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_atomic_write_text_interrupted(tmp_path, monkeypatch, where):
  path = tmp_path / "results.jsonl"
  R.write(path, [{"model_name": "model_0", "acc": 0.5}])
  old = path.read_bytes()

  class Interrupted(Exception):
    pass

  def boom(*a, **k):
    raise Interrupted(where)

  if where == "write":  # Half the text reaches the temp file, then the write fails.
    real_fdopen = os.fdopen

    class HalfFile:
      def __init__(self, f):
        self.f = f

      def __enter__(self):
        return self

      def __exit__(self, *exc):
        self.f.close()

      def write(self, text):
        self.f.write(text[: len(text) // 2])
        self.f.flush()
        raise Interrupted("write")

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: HalfFile(real_fdopen(*a, **k)))
  else:
    monkeypatch.setattr(os, where, boom)
  with pytest.raises(Interrupted):
    R.write(path, [{"model_name": f"model_{i}", "acc": 0.9} for i in range(100)])
  monkeypatch.undo()
  assert path.read_bytes() == old
  assert temp_leftovers(tmp_path) == []
  atomic_io.atomic_write_text(tmp_path / "report.md", "new")  # Still writable afterwards.
  assert (tmp_path / "report.md").read_text() == "new" and temp_leftovers(tmp_path) == []


def test_atomic_write_text_killed(tmp_path):
  """kill -9 between the temp file and the rename: the old file stays whole."""
  path = tmp_path / "results.jsonl"
  path.write_text("old\n")
  proc = run_python(["-c", RUNNER, str(path), "new\n" * 1000],
                    {"SOUP_FAULT": json.dumps({"kind": "replace"})}, timeout=60, check=False)
  expect_killed(proc)
  assert path.read_text() == "old\n"
  # A kill cannot clean up: at most one hidden, complete temp file stays, never read.
  leftovers = temp_leftovers(tmp_path)
  assert all(name.startswith(".results.jsonl.") for name in leftovers), leftovers


def test_report_figure_write_interrupted(tmp_path, monkeypatch):
  from soup import report
  rows = R.read(REPO / "tests" / "data" / "paper" / "greedy_soup_results.jsonl",
                recipes.infer_recipe)
  fig = tmp_path / "figure.png"
  fig.write_bytes(b"old figure")
  monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
  with pytest.raises(OSError, match="disk full"):
    report.plot_figure(rows, None, fig)
  assert fig.read_bytes() == b"old figure"
  assert temp_leftovers(tmp_path) == []
