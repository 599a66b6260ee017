"""The workdir's content-keyed caches and its config guard (fast; tests/test_experiment.py
checks the same through whole runs)."""

import json

import numpy as np
import pytest

from configs import clip_vit_b32_imagenet, fashion_mnist
from soup import checkpoints
from soup.workdir import Workdir, WorkdirMismatchError, eval_settings


def config_with(module=fashion_mnist, **data):
  config = module.get_config("smoke")
  config.unlock()
  config.data.update(data)
  return config


def params(scale=1.0):
  return {"dense": {"kernel": scale * np.arange(6, dtype=np.float32).reshape(2, 3),
                    "bias": np.zeros(3, np.float32)}}


@pytest.fixture
def workdir(tmp_path):
  wd = Workdir(tmp_path / "run")
  checkpoints.save_ingredient(wd.ingredient_dir("model_1"), params())
  return wd


@pytest.mark.parametrize("module,key,value", [
    (fashion_mnist, "data_dir", "/elsewhere/tfds"),
    (fashion_mnist, "idx_dir", "/elsewhere/idx"),
    (clip_vit_b32_imagenet, "objectnet_dir", "/elsewhere/objectnet"),
    (clip_vit_b32_imagenet, "heldout_file", "/elsewhere/heldout.npz"),
])
def test_a_changed_data_setting_misses_the_logits_cache(workdir, module, key, value):
  config = config_with(module)
  logits = {"split": np.ones((4, 3), np.float32)}
  workdir.write_logits("model_1", workdir.logits_key("model_1", config), logits)
  np.testing.assert_array_equal(
      workdir.read_logits("model_1", workdir.logits_key("model_1", config))["split"],
      logits["split"])
  changed = config_with(module, **{key: value})
  assert workdir.read_logits("model_1", workdir.logits_key("model_1", changed)) is None


def test_settings_that_cannot_change_a_logit_keep_the_cache(workdir):
  config = config_with(clip_vit_b32_imagenet)
  same = config_with(clip_vit_b32_imagenet, num_workers=7, cache_dir="/elsewhere",
                     heldout_in_memory=False)
  assert eval_settings(same) == eval_settings(config)
  assert workdir.logits_key("model_1", same) == workdir.logits_key("model_1", config)


def test_a_retrained_member_misses_the_logits_cache(workdir):
  config = config_with()
  before = workdir.logits_key("model_1", config)
  workdir.write_logits("model_1", before, {"split": np.zeros((2, 3), np.float32)})
  checkpoints.save_ingredient(workdir.ingredient_dir("model_1"), params())  # Same bytes.
  assert workdir.logits_key("model_1", config) == before
  checkpoints.save_ingredient(workdir.ingredient_dir("model_1"), params(scale=1.5))
  after = workdir.logits_key("model_1", config)
  assert after != before and workdir.read_logits("model_1", after) is None


def test_files_of_the_old_layout_are_recomputed(workdir):
  # eval/<name>.npz and soups/<recipe>.json written before the caches had keys.
  (workdir.root / "eval").mkdir()
  np.savez(workdir.root / "eval" / "model_1.npz", split=np.zeros(2))
  assert workdir.read_logits("model_1", "any") is None
  (workdir.root / "soups").mkdir()
  (workdir.root / "soups" / "uniform_soup.json").write_text(json.dumps([{"model_name": "x"}]))
  assert workdir.read_rows("uniform_soup", "any") is None
  workdir.write_rows("uniform_soup", "k1", [{"model_name": "uniform_soup"}])
  assert workdir.read_rows("uniform_soup", "k1") == [{"model_name": "uniform_soup"}]
  assert workdir.read_rows("uniform_soup", "k2") is None


def test_config_guard(tmp_path):
  wd = Workdir(tmp_path / "run")
  wd.check_config(config_with())
  wd.check_config(config_with(data_dir="/elsewhere"))  # Allowed to change: keyed instead.
  other = config_with()
  other.model.width = 48
  with pytest.raises(WorkdirMismatchError, match="model.width"):
    wd.check_config(other)
