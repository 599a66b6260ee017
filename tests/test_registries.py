"""The registries of models and datasets, the workdir's layout, and the one accuracy function."""

import ml_collections as mlc
import numpy as np
import pytest

from soup import layout, linear_probe, metrics, models, resources, workdir
from soup.data import registry as datasets
from soup.models import pretrained
from soup.soups import ensemble


def test_unknown_model_names_the_registered_ones():
  with pytest.raises(models.UnknownModelError, match="'vitt' is unknown; use one of vit, clip"):
    models.build({"name": "vitt"}, 10)
  config = mlc.ConfigDict({"model": {"name": "vitt"}})
  with pytest.raises(models.UnknownModelError, match="use one of vit, clip"):
    pretrained.load_pretrained(config)


def test_every_model_names_a_loader_of_pretrained():
  for entry in models.MODELS.values():
    assert callable(getattr(pretrained, entry.pretrained_loader))


def test_unknown_dataset_names_the_registered_ones():
  data = mlc.ConfigDict({"name": "mnist"})
  for call in (resources.make_task, resources.task_columns):
    with pytest.raises(datasets.UnknownDatasetError,
                       match="'mnist' is unknown; use one of fashion_mnist, imagenet"):
      call(data)


def test_stage_groups_partition_the_stages():
  assert layout.MODEL_STAGES + layout.EVAL_STAGES == layout.STAGES
  assert set(layout.SETUP_STAGES) < set(layout.MODEL_STAGES)


def test_workdir_paths_are_the_layout(tmp_path):
  wd = workdir.Workdir(tmp_path)
  assert wd.ingredient_dir("model_3") == tmp_path / "models" / "model_3" / "ingredient"
  assert wd.upstream / layout.INGREDIENT == tmp_path / layout.UPSTREAM_INGREDIENT
  assert wd.soup_dir("greedy_soup") == tmp_path / "soups" / "greedy_soup"


def test_one_accuracy_for_every_caller():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(257, 10)).astype(np.float32)
  labels = rng.integers(0, 10, 257)
  mask = np.arange(10) % 3 != 0
  # Hand-computed: the argmax over the allowed classes against the labels.
  for class_mask in (None, mask):
    allowed = np.where(class_mask is None or class_mask, logits, -np.inf)
    assert metrics.accuracy(logits, labels, class_mask) == np.mean(allowed.argmax(1) == labels)
  # The greedy ensemble scores its candidates with the same function.
  assert ensemble.score is metrics.score
  head = {"kernel": np.eye(10, dtype=np.float32), "bias": np.zeros(10, np.float32)}
  assert linear_probe.accuracy(head, logits, labels) == metrics.accuracy(logits, labels)
