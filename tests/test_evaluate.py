"""Exact evaluation: ordered, padded, masked; nothing dropped."""

import numpy as np

from soup import mesh as mesh_lib
from soup.data.task import EvalSplit
from soup.evaluate import Evaluator


def test_last_partial_batch_is_counted():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(103, 6)).astype(np.float32)  # 103 = 4 * 25 + 3.
  w = rng.normal(size=(6, 4)).astype(np.float32)
  mesh = mesh_lib.make_mesh()
  evaluator = Evaluator(lambda p, x: x @ p, mesh, batch_size=mesh.size * 25)
  logits = evaluator.logits(w, images)
  assert logits.shape == (103, 4)
  np.testing.assert_allclose(logits, images @ w, rtol=1e-5, atol=1e-6)
  labels = np.argmax(images @ w, axis=1)
  labels[-1] = (labels[-1] + 1) % 4  # Only the very last example is wrong.
  assert evaluator.accuracy(w, images, labels) == 102 / 103


def test_streamed_split_equals_in_memory_split():
  rng = np.random.default_rng(1)
  images = rng.normal(size=(37, 3)).astype(np.float32)
  labels = rng.integers(0, 2, 37)
  w = rng.normal(size=(3, 2)).astype(np.float32)
  ev = Evaluator(lambda p, x: x @ p, mesh_lib.make_mesh(), batch_size=10)
  in_memory = EvalSplit(labels=labels, images=images)
  streamed = EvalSplit(labels=labels, batches=lambda bs: (images[i:i + 7] for i in range(0, 37, 7)))
  a = ev.logits_of_batches(w, in_memory.iterate(10))
  b = ev.logits_of_batches(w, streamed.iterate(10))
  np.testing.assert_array_equal(a, b)
  assert in_memory.accuracy(a) == streamed.accuracy(b)


def test_logits_map_scores_in_the_split_label_space():
  logits = np.array([[0.0, 5.0, 1.0, 2.0]], np.float32)
  subset = np.array([0, 2, 3])  # e.g. ImageNet-R's classes
  split = EvalSplit(labels=np.array([2]), images=np.zeros((1, 1)),
                    logits_map=lambda logits: logits[:, subset])
  assert split.accuracy(logits) == 1.0  # Class 1 is out of the split's label space.
