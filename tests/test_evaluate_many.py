"""Decode once, evaluate many: the evaluate stage runs a group of models on each batch.

Fashion-MNIST at smoke size and mock ImageNet (soup/data/imagenet_mock.py), random models
saved as ingredients: the grouped stage's logits equal model-by-model evaluation's bit for
bit (every model runs the same compiled forward on the same device batch), each split's
batches are pulled once per group, a stopped stage resumes with the missing models only, a
group too large for the devices is refused before any evaluation, and the images cross
to the devices as uint8.
"""

import collections

import jax
import numpy as np
import pytest

from configs import clip_vit_b32_imagenet, fashion_mnist
from soup import checkpoints, evaluate as evaluate_lib, experiment, mesh as mesh_lib
from soup.data import imagenet_mock
from soup.data.task import EvalSplit
from soup.ingredients import IngredientStore
from soup.resources import Resources
from soup.workdir import Workdir

NAMES = ["model_0", "model_1", "model_2", "model_3"]


def make_run(config, root, names=NAMES):
  """Resources, workdir and store of `config`, with a random model saved per name."""
  res, wd = Resources(config), Workdir(root)
  model = res.model(res.num_classes)
  image = res.image_spec()
  for seed, name in enumerate(names):
    params = model.init(jax.random.key(seed), np.zeros((1, *image.shape), image.dtype))["params"]
    rng = np.random.default_rng(seed)  # Noise on every leaf: the heads start at zero.
    params = jax.tree.map(lambda x: (x + rng.normal(0, 0.1, x.shape)).astype(x.dtype),
                          jax.device_get(params))
    checkpoints.save_ingredient(wd.ingredient_dir(name), params, {})
  store = IngredientStore(wd, config.soups, res.expected_param_shapes, res.layout)
  return res, wd, store


def one_by_one(res, forward, params, split):
  """Logits of one model as the stage computed them before groups: its own pass over the
  split, each batch padded, sent to the devices and run through the jitted forward."""
  params = jax.device_put(params, mesh_lib.replicated(res.mesh))
  bs, out = res.config.eval.batch_size, []
  for batch in split.iterate(bs):
    padded = np.concatenate([batch, np.zeros((bs - len(batch), *batch.shape[1:]), batch.dtype)])
    out.append(np.asarray(forward(params, mesh_lib.global_batch(res.mesh, padded)))[:len(batch)])
  return np.concatenate(out)


def count_pulls(monkeypatch, batch_size):
  """Batches of `batch_size` pulled from each EvalSplit's iterator, by split; each must be
  uint8 (normalization runs in jit: one byte a pixel crosses to the devices)."""
  pulled = collections.Counter()
  iterate = EvalSplit.iterate

  def counting(split, size):
    for batch in iterate(split, size):
      assert batch.dtype == np.uint8, batch.dtype
      pulled[id(split)] += size == batch_size
      yield batch
  monkeypatch.setattr(EvalSplit, "iterate", counting)
  return pulled


def check_stage(config, root, monkeypatch, group_size):
  """Runs the evaluate stage on NAMES; returns its logits, model-by-model's, and the pulls."""
  res, wd, store = make_run(config, root)
  config.eval.group_size = group_size
  pulled = count_pulls(monkeypatch, config.eval.batch_size)
  experiment.evaluate(config, wd, res, store, NAMES)
  monkeypatch.undo()
  grouped = {n: wd.read_logits(n, wd.logits_key(n, config)) for n in NAMES}
  forward = jax.jit(res.apply_fn(), out_shardings=mesh_lib.replicated(res.mesh))
  alone = {n: {c: one_by_one(res, forward, store.load(n), s) for c, s in res.splits().items()}
           for n in NAMES}
  passes = -(-len(NAMES) // group_size)
  expected = {id(s): passes * -(-len(s) // config.eval.batch_size) for s in res.splits().values()}
  return grouped, alone, dict(pulled), expected, res


@pytest.fixture(scope="module")
def fashion_config(fashion_mnist_ready):
  config = fashion_mnist.get_config("smoke")
  config.eval.batch_size = 256  # Held-out 500 and shifts 300: partial last batches.
  return config


@pytest.mark.parametrize("group_size", [4, 3])
def test_fashion_mnist_group_logits_are_model_by_models_and_each_split_is_read_once(
    fashion_config, tmp_path, monkeypatch, group_size):
  grouped, alone, pulled, expected, res = check_stage(fashion_config, tmp_path, monkeypatch,
                                                      group_size)
  for name in NAMES:
    assert grouped[name].keys() == alone[name].keys() == res.splits().keys()
    for column in alone[name]:  # Bitwise: the same executable on the same device batch.
      np.testing.assert_array_equal(grouped[name][column], alone[name][column])
      assert len(grouped[name][column]) == len(res.splits()[column])
  assert pulled == expected  # 4 models: one read of each split per group.
  assert not np.array_equal(grouped["model_0"][res.columns.test],
                            grouped["model_1"][res.columns.test])


def mock_imagenet_config(tmp_path):
  """The ImageNet smoke config on mock data written under tmp_path, batch 8: splits of 21
  (and ObjectNet's 6) end in partial batches."""
  mock = imagenet_mock.write_datasets(tmp_path / "mock", train_per_class=1, eval_examples=21)
  config = clip_vit_b32_imagenet.get_config("smoke")
  config.data.update(data_dir=mock["data_dir"], objectnet_dir=mock["objectnet_dir"],
                     heldout_file=mock["heldout_file"], num_workers=0,
                     cache_dir=str(tmp_path / "labels"))
  config.eval.batch_size = 8
  return config


def test_mock_imagenet_group_logits_are_model_by_models(tmp_path, monkeypatch):
  config = mock_imagenet_config(tmp_path)
  grouped, alone, pulled, expected, res = check_stage(config, tmp_path / "run", monkeypatch, 4)
  for name in NAMES:
    for column in alone[name]:
      np.testing.assert_array_equal(grouped[name][column], alone[name][column])
  assert pulled == expected
  res.task.close()


def test_a_stopped_stage_evaluates_only_the_missing_models(fashion_config, tmp_path,
                                                           monkeypatch):
  fashion_config.eval.group_size = 2
  res, wd, store = make_run(fashion_config, tmp_path)
  evaluate_many, load = res.evaluate_many, store.load

  def stop_after_one_group(group):
    if wd.has_logits("model_0", wd.logits_key("model_0", fashion_config)):
      raise KeyboardInterrupt  # The stage is stopped during its second group.
    return evaluate_many(group)
  monkeypatch.setattr(res, "evaluate_many", stop_after_one_group)
  with pytest.raises(KeyboardInterrupt):
    experiment.evaluate(fashion_config, wd, res, store, NAMES)
  done = {n: wd.has_logits(n, wd.logits_key(n, fashion_config)) for n in NAMES}
  assert done == {"model_0": True, "model_1": True, "model_2": False, "model_3": False}
  written = {n: (wd.root / "eval" / f"{n}.npz").stat().st_mtime_ns for n in NAMES[:2]}

  evaluated = []
  monkeypatch.setattr(res, "evaluate_many",
                      lambda group: evaluated.append(len(group)) or evaluate_many(group))
  loaded = []
  monkeypatch.setattr(store, "load", lambda n: loaded.append(n) or load(n))
  experiment.evaluate(fashion_config, wd, res, store, NAMES)
  assert loaded == ["model_2", "model_3"] and evaluated == [2]
  assert {n: (wd.root / "eval" / f"{n}.npz").stat().st_mtime_ns for n in NAMES[:2]} == written
  assert all(wd.has_logits(n, wd.logits_key(n, fashion_config)) for n in NAMES)
  experiment.evaluate(fashion_config, wd, res, store, NAMES)  # Nothing missing: nothing read.
  assert loaded == ["model_2", "model_3"]


def test_a_group_that_cannot_fit_is_refused_before_compute(fashion_config, tmp_path,
                                                           monkeypatch):
  res, wd, store = make_run(fashion_config, tmp_path)
  model_bytes, forward_bytes = res.eval_footprint()
  room = forward_bytes + int(2.5 * model_bytes)  # The forward pass and 2.5 models.
  monkeypatch.setattr(evaluate_lib, "free_device_memory", lambda mesh: (room, "a test's"))
  monkeypatch.setattr(res, "evaluate_many", lambda group: pytest.fail("evaluated"))
  fashion_config.eval.group_size = 3
  with pytest.raises(evaluate_lib.GroupTooLargeError, match="group_size=2, or 0"):
    experiment.evaluate(fashion_config, wd, res, store, NAMES)
  fashion_config.eval.group_size = 0
  assert res.eval_group_size(len(NAMES)) == 2  # As many as fit.
  fashion_config.eval.group_size = 1
  assert res.eval_group_size(len(NAMES)) == 1  # Model by model: never refused.


def test_group_size_rules():
  gib = 2**30
  assert evaluate_lib.group_size(0, 72, gib // 3, gib, 40 * gib) == 72   # All fit.
  assert evaluate_lib.group_size(0, 72, gib, gib, 17 * gib) == 16
  assert evaluate_lib.group_size(0, 72, 4 * gib, gib, 2 * gib) == 1      # None fits: one.
  assert evaluate_lib.group_size(16, 10, gib, gib, 40 * gib) == 10       # Capped by models.
  assert evaluate_lib.group_size(1, 72, 4 * gib, gib, 2 * gib) == 1
  with pytest.raises(evaluate_lib.GroupTooLargeError, match="17.00 GiB; 9.00 GiB is free"):
    evaluate_lib.group_size(16, 72, gib, gib, 9 * gib)
  # The host's budget: params and logits of each model until its group ends.
  assert evaluate_lib.group_size(0, 72, gib // 3, gib, 40 * gib, "", gib, 20 * gib) == 20
  with pytest.raises(evaluate_lib.GroupTooLargeError, match="on the host.*group_size=20"):
    evaluate_lib.group_size(30, 72, gib // 3, gib, 40 * gib, "", gib, 20 * gib)


def test_images_cross_to_the_devices_as_uint8(fashion_config):
  """Normalization runs in jit (Task.preprocess): the host sends 1 byte per pixel."""
  task = Resources(fashion_config).task
  for split in task.eval_splits().values():
    assert next(split.iterate(64)).dtype == np.uint8
  images, _ = task.finetune_batch(32, 0, 0, {})
  assert images.dtype == np.uint8


# A subprocess: mallopt is process-wide. mallinfo2's hblkhd counts the bytes in mmapped
# blocks, so a batch-sized array served from fresh pages shows there, one from the heap not.
_ALLOCATION = """
import ctypes, json
import numpy as np
from soup import memory
class Mallinfo2(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                             "usmblks", "fsmblks", "uordblks", "fordblks",
                                             "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
applied = memory.keep_freed_blocks()
before = libc.mallinfo2().hblkhd
batch = np.ones(150528 * 256, np.uint8)  # A 256-image ImageNet batch at 224 px: 38.5 MB.
mapped = libc.mallinfo2().hblkhd - before
del batch
heap = libc.mallinfo2().arena
import threading  # The next batch, from another thread (as XLA's), reuses the freed block.
thread = threading.Thread(target=lambda: globals().update(again=np.ones(150528 * 256, np.uint8)))
thread.start()
thread.join()
grew = libc.mallinfo2().arena - heap
print(json.dumps({"applied": applied, "mapped": mapped, "heap_grew": grew}))
"""


@pytest.mark.parametrize("env,applied", [({}, True), ({"SOUP_GLIBC_DEFAULTS": "1"}, False),
                                         ({"MALLOC_MMAP_THRESHOLD_": "1048576"}, False),
                                         ({"MALLOC_ARENA_MAX": "4"}, False)])
def test_batches_come_from_the_heap_as_soup_main_sets_the_allocator(env, applied):
  """soup.main's memory.keep_freed_blocks: a batch's block is heap (reused once freed), not
  fresh pages from the kernel; a user's own allocator settings, or the opt-out, win (the
  MALLOC_ARENA_MAX case: glibc's thresholds stay, so the batch is mapped)."""
  import ctypes
  import json
  import os
  import subprocess
  import sys
  try:
    ctypes.CDLL("libc.so.6").mallinfo2
  except (OSError, AttributeError):
    pytest.skip("needs glibc 2.33+ (mallinfo2)")
  base = {k: v for k, v in os.environ.items()
          if k != "SOUP_GLIBC_DEFAULTS" and not k.startswith("MALLOC_")}
  out = subprocess.run([sys.executable, "-c", _ALLOCATION], env={**base, **env}, check=True,
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__))))
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["applied"] is applied
  if applied:
    assert result["mapped"] == 0
    assert result["heap_grew"] < 1 << 20
  else:
    assert result["mapped"] >= 150528 * 256


def test_wise_ft_alphas_between_its_ends_are_one_group(fashion_config, tmp_path, monkeypatch):
  """The soups stage's WiSE-FT evaluates its interpolations together (each split read once
  for them all), with the logits of evaluating each alone; its ends are the cached models'."""
  import copy

  from soup import soups
  config = copy.deepcopy(fashion_config)
  config.eval.group_size = 0  # As many as fit (an earlier test may have left another).
  config.soups.recipes = ("wise_ft",)
  config.soups.wise_ft.alphas = (0.0, 0.25, 0.5, 0.75, 1.0)
  res, wd, store = make_run(config, tmp_path)
  experiment.evaluate(config, wd, res, store, NAMES)
  logits = {}
  row = res.row
  monkeypatch.setattr(res, "row", lambda name, recipe, lg, *a, **k: logits.setdefault(name, lg)
                      and row(name, recipe, lg, *a, **k))
  pulled = count_pulls(monkeypatch, config.eval.batch_size)
  rows = experiment.soup_rows(config, wd, res, store, NAMES)
  assert [r["model_name"] for r in rows] == [f"wise_ft_alpha_{a:g}" for a in (0, .25, .5, .75, 1)]
  # The three interpolations: one pass over each split.
  assert pulled == {id(s): -(-len(s) // config.eval.batch_size) for s in res.splits().values()}
  monkeypatch.undo()
  init = wd.ingredient_dir("model_0")
  best = max(NAMES[1:], key=lambda n: res.held_out_accuracy(store.load(n)))
  for alpha in (0.25, 0.5, 0.75):
    alone = res.evaluate(soups.wise_ft(init, wd.ingredient_dir(best), alpha, res.layout))
    for column, values in alone.items():
      np.testing.assert_array_equal(logits[f"wise_ft_alpha_{alpha:g}"][column], values)
  for alpha, name in ((0.0, "model_0"), (1.0, best)):
    for column, values in wd.read_logits(name, wd.logits_key(name, config)).items():
      np.testing.assert_array_equal(logits[f"wise_ft_alpha_{alpha:g}"][column], values)


def test_mock_imagenet_soups_decode_each_streamed_split_once(tmp_path, monkeypatch):
  """The soups stage keeps the streamed splits decoded (they fit): two soups evaluated, each
  streamed split decoded once, and the soups' logits those of decoding again for each."""
  config = mock_imagenet_config(tmp_path)
  config.soups.recipes = ("uniform_soup", "wise_ft")
  config.soups.wise_ft.update(alphas=(0.0, 0.5, 1.0), endpoint="best_individual")

  def soups_stage(root, keep):
    res, wd, store = make_run(config, root)
    experiment.evaluate(config, wd, res, store, NAMES)
    decodes = collections.Counter()
    for column, split in res.splits().items():
      if split.batches is not None:
        split.batches = (lambda size, column=column, batches=split.batches:
                         decodes.update([column]) or batches(size))
    if not keep:
      monkeypatch.setattr(res.task, "keep_eval_decoded", lambda budget: None)
    logits, row = {}, res.row
    monkeypatch.setattr(res, "row", lambda name, recipe, lg, *a, **k: logits.setdefault(name, lg)
                        and row(name, recipe, lg, *a, **k))
    rows = experiment.soup_rows(config, wd, res, store, NAMES)
    monkeypatch.undo()
    res.task.close()
    return logits, rows, decodes

  kept, kept_rows, kept_decodes = soups_stage(tmp_path / "kept", keep=True)
  again, again_rows, again_decodes = soups_stage(tmp_path / "again", keep=False)
  streamed = set(again_decodes)
  assert streamed and kept_decodes == {c: 1 for c in streamed}
  assert again_decodes == {c: 2 for c in streamed}  # The uniform soup and WiSE-FT's alpha 0.5.
  assert kept.keys() == again.keys() == {"uniform_soup", "wise_ft_alpha_0", "wise_ft_alpha_0.5",
                                         "wise_ft_alpha_1"}
  for name in kept:
    for column in again[name]:
      np.testing.assert_array_equal(kept[name][column], again[name][column])
  strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
  assert strip(kept_rows) == strip(again_rows)
