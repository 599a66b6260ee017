"""The prepared Fashion-MNIST, the experiment's splits and the shifts."""

import hashlib

import numpy as np
import pytest

from soup.data import fashion_mnist_splits, fashion_mnist_tfds, shifts
from soup.data.batching import Split, train_batch


def _sha(a):
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def test_prepared_dataset_sizes_and_labels(fashion_mnist_ready):
  arrays = fashion_mnist_tfds.load_arrays()
  (train_x, train_y), (test_x, test_y) = arrays["train"], arrays["test"]
  assert train_x.shape == (60_000, 28, 28, 1) and train_x.dtype == np.uint8
  assert test_x.shape == (10_000, 28, 28, 1)
  # Fashion-MNIST is balanced: 6,000 / 1,000 images of each of the 10 classes.
  assert np.bincount(train_y, minlength=10).tolist() == [6000] * 10
  assert np.bincount(test_y, minlength=10).tolist() == [1000] * 10


def test_prepared_dataset_matches_the_idx_files(fashion_mnist_ready):
  """Same examples as the raw files (TFDS stores them in its own shuffled order)."""
  arrays = fashion_mnist_tfds.load_arrays()
  for split, (images_file, labels_file) in fashion_mnist_tfds._FILES.items():
    raw_x = fashion_mnist_tfds.read_idx(fashion_mnist_tfds.DEBIAN_DIR / images_file)
    raw_y = fashion_mnist_tfds.read_idx(fashion_mnist_tfds.DEBIAN_DIR / labels_file)
    x, y = arrays[split]
    key = lambda xs, ys: sorted(_sha(im) + str(int(label)) for im, label in zip(xs, ys))
    assert key(x[..., 0], y) == key(raw_x, raw_y)
  # Spot checksums of the raw data: the first training image is an ankle boot.
  raw_y = fashion_mnist_tfds.read_idx(fashion_mnist_tfds.DEBIAN_DIR / "train-labels-idx1-ubyte.gz")
  assert raw_y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
  raw_x = fashion_mnist_tfds.read_idx(fashion_mnist_tfds.DEBIAN_DIR / "train-images-idx3-ubyte.gz")
  assert int(raw_x.astype(np.int64).sum()) == 3_431_114_169
  assert int(raw_x[0].astype(np.int64).sum()) == 76_247


def test_idx_reader_rejects_truncated_files(tmp_path):
  import gzip
  path = tmp_path / "bad.gz"
  header = (0x0803).to_bytes(4, "big") + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
  path.write_bytes(gzip.compress(header + bytes(100)))
  with pytest.raises(ValueError, match="truncated"):
    fashion_mnist_tfds.read_idx(path)


def test_missing_idx_files_say_how_to_install(tmp_path):
  with pytest.raises(fashion_mnist_tfds.DatasetMissingError,
                     match="apt-get install -y dataset-fashion-mnist"):
    fashion_mnist_tfds.check_idx_files(tmp_path)


def test_experiment_splits_are_disjoint_and_sized(fashion_mnist_ready):
  import ml_collections as mlc
  cfg = mlc.ConfigDict(dict(data_dir="", split_seed=0, upstream_examples=1000,
                            held_out_examples=200, finetune_examples=300, test_examples=500,
                            shift_examples=100))
  s = fashion_mnist_splits.experiment_splits(cfg)
  sizes = (len(s["upstream"]), len(s["held_out"]), len(s["finetune"]), len(s["test"]))
  assert sizes == (1000, 200, 300, 500)
  hashes = {k: {_sha(im) for im in s[k].images} for k in ("upstream", "held_out", "finetune")}
  assert not hashes["upstream"] & hashes["held_out"]
  assert not hashes["held_out"] & hashes["finetune"]
  assert not hashes["upstream"] & hashes["finetune"]
  assert set(np.unique(s["upstream"].labels)) == {0, 1, 2, 3}  # The coarse label space.
  assert set(s["shifts"]) == set(shifts.SHIFTS)
  for name, split in s["shifts"].items():
    assert len(split) <= 100 and split.images.dtype == np.uint8, name


def test_self_supervised_upstream_sees_finetuning_images_but_never_held_out(fashion_mnist_ready):
  import ml_collections as mlc
  base = dict(data_dir="", split_seed=0, upstream_examples=1000, held_out_examples=200,
              finetune_examples=300, test_examples=100, shift_examples=50)
  apart = fashion_mnist_splits.experiment_splits(mlc.ConfigDict(base))
  s = fashion_mnist_splits.experiment_splits(
      mlc.ConfigDict(dict(base, upstream_includes_finetune=True)))
  assert len(s["upstream"]) == 1300
  hashes = {k: {_sha(im) for im in s[k].images} for k in ("upstream", "held_out", "finetune")}
  assert hashes["finetune"] <= hashes["upstream"]
  assert not hashes["upstream"] & hashes["held_out"]
  # Only the upstream changes: the scored splits and the shifts are the same images.
  for split in ("held_out", "finetune", "test"):
    np.testing.assert_array_equal(s[split].images, apart[split].images)
  for name in s["shifts"]:
    np.testing.assert_array_equal(s["shifts"][name].images, apart["shifts"][name].images)


def test_shifts_are_deterministic_and_change_the_images():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (20, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, 20).astype(np.int32)
  a = shifts.make_shifts(images, labels, images, labels, max_examples=10, seed=3)
  b = shifts.make_shifts(images, labels, images, labels, max_examples=10, seed=3)
  for name in shifts.SHIFTS:
    np.testing.assert_array_equal(a[name][0], b[name][0])
    assert a[name][0].shape[1:] == (28, 28, 1)
  originals = images[np.sort(np.random.default_rng(3).permutation(20)[:10])]
  for name in ("V2", "Sketch", "R", "ObjectNet"):
    diff = np.abs(a[name][0].astype(int) - originals.astype(int)).mean()
    assert diff > 5, (name, diff)
  flat = np.zeros((1, 9, 9, 1), np.uint8)
  flat[0, 2:7, 2:7] = 200  # A square: filled at 110 inside, edges at 255 on its border.
  r = shifts.rendition(flat)[0, ..., 0]
  assert r[4, 4] == 110 and r.max() == 255 and r[0, 0] == 0


def test_hard_split_holds_exactly_the_nearest_centroid_errors():
  ref = np.zeros((4, 2, 2, 1), np.uint8)
  ref[2:] = 200
  ref_labels = np.array([0, 0, 1, 1])
  images = np.stack([np.zeros((2, 2, 1), np.uint8), np.full((2, 2, 1), 200, np.uint8)] * 2)
  labels = np.array([0, 1, 1, 0])  # The last two are "wrong" for the centroids.
  np.testing.assert_array_equal(
      shifts.nearest_centroid_errors(ref, ref_labels, images, labels), [2, 3])


def test_train_batches_are_a_function_of_the_step():
  split = Split(np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1),
                np.arange(100, dtype=np.int32))
  a = [train_batch(split, 32, seed=1, step=s)[1] for s in range(6)]
  b = [train_batch(split, 32, seed=1, step=s)[1] for s in (3, 4, 5)]
  for x, y in zip(a[3:], b):
    np.testing.assert_array_equal(x, y)
  epoch0 = np.concatenate(a[:3])
  assert len(set(epoch0.tolist())) == 96  # No repeats within an epoch.


def test_upstream_label_spaces_and_splits_independent_of_upstream_size(fashion_mnist_ready):
  import ml_collections as mlc
  base = dict(data_dir="", split_seed=0, held_out_examples=200, finetune_examples=300,
              test_examples=100, shift_examples=50)
  fine = fashion_mnist_splits.experiment_splits(mlc.ConfigDict(dict(
      base, upstream_examples=2000, upstream_labels="fine")))
  merged = fashion_mnist_splits.experiment_splits(mlc.ConfigDict(dict(
      base, upstream_examples=1000, upstream_labels="tops_merged")))
  assert set(np.unique(fine["upstream"].labels)) == set(range(10))
  assert set(np.unique(merged["upstream"].labels)) == set(range(7))
  # T-shirt/top (0), Pullover (2), Coat (4) and Shirt (6) share one upstream label.
  np.testing.assert_array_equal(
      fashion_mnist_splits.UPSTREAM_LABELS["tops_merged"][[0, 2, 4, 6]], 0)
  # Another upstream size leaves held-out and fine-tuning on the same images.
  for split in ("held_out", "finetune"):
    np.testing.assert_array_equal(fine[split].images, merged[split].images)
  with pytest.raises(ValueError, match="upstream_labels"):
    fashion_mnist_splits.experiment_splits(mlc.ConfigDict(dict(base, upstream_examples=100,
                                                        upstream_labels="bogus")))
