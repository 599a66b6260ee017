"""ImageNet data without ImageNet: held-out lists, class subsets, ObjectNet, the Grain
pipeline (worker processes, resume), RandAugment.

The TFDS datasets are the catalog's own builders prepared for real (array_record,
no TensorFlow) with a few tiny random JPEGs (soup/data/imagenet_mock.py), so
every read goes through `tfds.data_source` as it would on the real data.
"""


import ml_collections as mlc
import numpy as np
import pytest
from PIL import Image

from soup.data import (
  grain_input,
  imagenet,
  imagenet_heldout,
  objectnet,
  randaugment,
  registry,
  tfds_source,
  transforms,
)
from tests.conftest import run_python


def data_config(mock_imagenet, **overrides):
  """num_workers 0: the Grain pipeline in this process (cheap to start); the tests of
  worker processes ask for them."""
  d = dict(name="imagenet", data_dir=mock_imagenet["data_dir"],
           objectnet_dir=mock_imagenet["objectnet_dir"],
           imagenet_v2_variant="matched-frequency", heldout_file=mock_imagenet["heldout_file"],
           heldout_per_class=1, heldout_in_memory=True, split_seed=0, image_size=32,
           normalization="clip", num_workers=0, cache_dir=mock_imagenet["cache_dir"])
  d.update(overrides)
  return mlc.ConfigDict(d)


def task_args(mock_imagenet, **overrides):
  """ImageNetTask's arguments: the data config and the registry's columns."""
  return data_config(mock_imagenet, **overrides), registry.IMAGENET


@pytest.fixture(scope="module")
def task(mock_imagenet):
  return imagenet.ImageNetTask(*task_args(mock_imagenet))


def source_of(mock_imagenet, column, name=None):
  return imagenet.open_tfds(column, mock_imagenet["data_dir"], name)[1]


# --- Held-out list -------------------------------------------------------------


def test_heldout_selection_is_seeded_and_per_class():
  labels = np.random.default_rng(0).permutation(np.repeat(np.arange(1000), 30))
  held = imagenet_heldout.select(labels, per_class=26, seed=0)
  assert len(held) == 26_000 and len(np.unique(held)) == 26_000
  assert np.all(np.diff(held) > 0)
  assert np.bincount(labels[held], minlength=1000).tolist() == [26] * 1000
  np.testing.assert_array_equal(held, imagenet_heldout.select(labels, per_class=26, seed=0))
  assert not np.array_equal(held, imagenet_heldout.select(labels, per_class=26, seed=1))
  # Class c's choice depends on class c's images only: moving images between classes 5
  # and 6 leaves the picks of class 7 alone.
  other = labels.copy()
  other[np.flatnonzero(labels == 5)[:3]] = 6
  held_other = imagenet_heldout.select(other, per_class=26, seed=0)
  np.testing.assert_array_equal(held[labels[held] == 7], held_other[other[held_other] == 7])
  assert not np.array_equal(held[labels[held] == 6], held_other[other[held_other] == 6])
  other[other == 5] = 6
  with pytest.raises(imagenet_heldout.HeldOutError, match="class 5 has 0"):
    imagenet_heldout.select(other, per_class=26, seed=0)


def test_heldout_verify_accepts_good_and_names_each_problem():
  labels = np.repeat(np.arange(1000), 30)
  idx = imagenet_heldout.select(labels, per_class=26)
  good = imagenet_heldout.HeldOut(idx, labels[idx], "5.1.0", len(labels), 26, 0)
  imagenet_heldout.verify(good, num_train=len(labels), per_class=26, tfds_version="5.1.0")
  finetune = good.finetune_indices()
  assert len(finetune) == 30_000 - 26_000 and not np.intersect1d(finetune, idx).size

  dup = idx.copy()
  dup[1] = dup[0]
  cases = {
      "unique indices": good.__class__(dup, labels[dup], "5.1.0", len(labels), 26, 0),
      "made for 29999 train": good.__class__(idx, labels[idx], "5.1.0", 29_999, 26, 0),
      "not 26 per class": good.__class__(idx, np.sort(labels[idx])[::-1].copy() * 0, "5.1.0",
                                         len(labels), 26, 0),
      "imagenet2012 5.0.0": good.__class__(idx, labels[idx], "5.0.0", len(labels), 26, 0),
  }
  for message, held in cases.items():
    with pytest.raises(imagenet_heldout.HeldOutError, match=message):
      imagenet_heldout.verify(held, num_train=len(labels), per_class=26, tfds_version="5.1.0")


def test_missing_heldout_file_says_which_command_creates_it(tmp_path):
  with pytest.raises(imagenet_heldout.HeldOutError, match="scripts/make_imagenet_heldout.py"):
    imagenet_heldout.load(tmp_path / "absent.npz")


def test_heldout_file_round_trip_and_task_split(mock_imagenet, task):
  held = imagenet_heldout.load(mock_imagenet["heldout_file"])
  train = source_of(mock_imagenet, "ImageNet2p")
  labels = imagenet.read_labels(train)
  assert held.num_train == len(train) == 2000 and held.tfds_version == "5.1.0"
  np.testing.assert_array_equal(held.labels, labels[held.indices])
  assert np.bincount(held.labels, minlength=1000).tolist() == [1] * 1000
  # The task fine-tunes on exactly the other images.
  assert task.finetune_size() == 1000
  assert not np.intersect1d(task.finetune_idx, held.indices).size
  np.testing.assert_array_equal(task.eval_splits()["ImageNet2p"].labels, held.labels)


def test_heldout_in_memory_equals_the_stream(mock_imagenet, task):
  in_memory = task.eval_splits()["ImageNet2p"]
  streamed_task = imagenet.ImageNetTask(*task_args(mock_imagenet, heldout_in_memory=False))
  streamed = streamed_task.eval_splits()["ImageNet2p"]
  assert in_memory.images is not None and streamed.images is None
  np.testing.assert_array_equal(in_memory.images, np.concatenate(list(streamed.iterate(300))))
  np.testing.assert_array_equal(in_memory.labels, streamed.labels)


def test_task_refuses_a_list_made_for_other_data(mock_imagenet, tmp_path):
  held = imagenet_heldout.load(mock_imagenet["heldout_file"])
  wrong = tmp_path / "wrong.npz"
  imagenet_heldout.save(wrong, held.indices, held.labels, tfds_version=held.tfds_version,
                        num_train=held.num_train + 1, per_class=1, seed=0)
  with pytest.raises(imagenet_heldout.HeldOutError, match="made for 2001 train examples"):
    imagenet.ImageNetTask(*task_args(mock_imagenet, heldout_file=str(wrong)))


def test_missing_datasets_say_how_to_prepare_them(mock_imagenet, tmp_path):
  with pytest.raises(imagenet.DatasetMissingError, match=r"tfds build imagenet2012 .*--manual_dir"):
    imagenet.ImageNetTask(*task_args(mock_imagenet, data_dir=str(tmp_path)))
  task = imagenet.ImageNetTask(*task_args(mock_imagenet, objectnet_dir=str(tmp_path / "nowhere")))
  with pytest.raises(imagenet.DatasetMissingError, match="ObjectNet.*objectnet.dev"):
    task.eval_splits()


# --- Class subsets: ImageNet-R / ImageNet-A ------------------------------------


def test_200_class_lists_are_the_known_wnids():
  r, a = imagenet.IMAGENET_R_CLASSES, imagenet.IMAGENET_A_CLASSES
  for classes in (r, a):
    assert len(classes) == 200 and list(classes) == sorted(set(classes))
  # Starts of the released wnid lists (hendrycks/imagenet-r, natural-adv-examples).
  assert imagenet.subset_wnids(r)[:5] == ("n01443537", "n01484850", "n01494475", "n01498041",
                                          "n01514859")
  assert imagenet.subset_wnids(a)[:5] == ("n01498041", "n01531178", "n01534433", "n01558993",
                                          "n01580077")
  assert imagenet.subset_wnids(r)[-1] == imagenet.subset_wnids(a)[-1] == "n12267677"  # acorn


def test_200_class_masking_scores_the_argmax_among_the_200(mock_imagenet, task):
  split = task.eval_splits()["ImageNetR"]
  raw = imagenet.read_labels(source_of(mock_imagenet, "ImageNetR"))
  classes = np.asarray(imagenet.IMAGENET_R_CLASSES)
  np.testing.assert_array_equal(classes[split.labels], raw)  # Label k is class classes[k].
  n = len(raw)
  logits = np.zeros((n, 1000), np.float32)
  logits[:, 0] = 10.0                       # Class 0 (tench) is not among the 200 ...
  logits[np.arange(n), raw] = 5.0           # ... so the true class wins inside the mask.
  wrong = classes[(split.labels + 1) % 200]
  logits[:3, wrong[:3]] = 6.0               # And a wrong in-mask class wins for 3 images.
  scored = split.scored_logits(logits)
  assert scored.shape == (n, 200)
  np.testing.assert_array_equal(np.argmax(scored[3:], -1), split.labels[3:])
  assert split.accuracy(logits) == pytest.approx((n - 3) / n)
  assert np.mean(np.argmax(logits, -1) == raw) == 0.0  # Unmasked, every image would be wrong.


# --- ObjectNet ----------------------------------------------------------------


def test_objectnet_mapping_is_the_authors():
  m = objectnet.load_mapping()
  assert len(m.folders) == 113 and list(m.folders) == sorted(m.folders)
  assert sum(len(ids) for ids in m.imagenet_ids) == 125
  ids = dict(zip(m.folders, m.imagenet_ids))
  assert ids["alarm_clock"] == (409, 530)   # analog clock, digital clock
  assert ids["banana"] == (954,) and ids["bench"] == (703,)  # banana, park bench


def test_objectnet_logits_are_the_max_over_mapped_classes():
  m = objectnet.load_mapping()
  logits = np.random.default_rng(0).normal(size=(4, 1000)).astype(np.float32)
  mapped = m.logits(logits)
  assert mapped.shape == (4, 113)
  for c, ids in enumerate(m.imagenet_ids):
    np.testing.assert_array_equal(mapped[:, c], logits[:, list(ids)].max(axis=1))
  alarm = m.folders.index("alarm_clock")
  logits[1, 530] = 100.0                    # digital clock -> ObjectNet "alarm clock".
  assert np.argmax(m.logits(logits)[1]) == alarm


def test_objectnet_border_crop():
  img = np.zeros((20, 30, 3), np.uint8)
  img[[0, -1]] = img[:, [0, -1]] = (255, 0, 0)   # The release's 1-pixel red frame.
  img[2:-2, 2:-2] = np.arange(16 * 26 * 3).reshape(16, 26, 3) % 251
  cropped = np.asarray(objectnet.crop_border(Image.fromarray(img)))
  assert cropped.shape == (16, 26, 3)
  np.testing.assert_array_equal(cropped, img[2:-2, 2:-2])


def test_objectnet_folder_reading(mock_imagenet, task):
  paths, labels = objectnet.list_images(mock_imagenet["objectnet_dir"])
  last = len(objectnet.load_mapping().folders) - 1
  assert labels.tolist() == [0, 0, 0, 1, 1, 1, last, last, last]  # Unscored folder, .txt skipped.
  assert [p.name for p in paths[:3]] == ["00.png", "01.png", "02.png"]
  split = task.eval_splits()["ObjectNet"]
  np.testing.assert_array_equal(split.labels, labels)
  assert split.scored_logits(np.zeros((2, 1000))).shape == (2, 113)


def test_objectnet_border_crop_is_a_switch_off_by_default(mock_imagenet, task):
  """Off (the default, as the official code ran): the whole image, red frame included, is
  resized and center-cropped; on: 2 pixels go first."""
  paths, _ = objectnet.list_images(mock_imagenet["objectnet_dir"])
  with Image.open(paths[0]) as im:
    whole = im.convert("RGB")
  uncropped = transforms.eval_transform(whole, 32)
  cropped = transforms.eval_transform(objectnet.crop_border(whole), 32)
  assert not np.array_equal(uncropped, cropped)
  assert task.objectnet_border == 0
  np.testing.assert_array_equal(next(task.eval_splits()["ObjectNet"].iterate(4))[0], uncropped)
  on = imagenet.ImageNetTask(*task_args(mock_imagenet, objectnet_border_crop=True))
  assert on.objectnet_border == objectnet.BORDER == 2
  np.testing.assert_array_equal(next(on.eval_splits()["ObjectNet"].iterate(4))[0], cropped)


# --- Streaming evaluation ---------------------------------------------------------


def test_eval_batches_are_ordered_with_a_partial_last_batch(mock_imagenet, task):
  split = task.eval_splits()["ImageNet"]
  batches = list(split.iterate(8))
  assert [len(b) for b in batches] == [8, 8, 5] and len(split) == 21
  assert all(b.shape[1:] == (32, 32, 3) and b.dtype == np.uint8 for b in batches)
  source = source_of(mock_imagenet, "ImageNet")
  want = np.stack([transforms.eval_transform(transforms.decode_rgb(source[i]["image"]), 32)
                   for i in range(21)])
  np.testing.assert_array_equal(np.concatenate(batches), want)
  np.testing.assert_array_equal(np.concatenate(list(split.iterate(21))), want)
  np.testing.assert_array_equal(split.labels, [source[i]["label"] for i in range(21)])


def test_eval_transform_resizes_the_shorter_side_then_center_crops():
  img = Image.fromarray(np.zeros((40, 100, 3), np.uint8))
  assert transforms.resize_shorter_side(img, 20).size == (50, 20)
  tall = Image.fromarray(np.zeros((99, 30, 3), np.uint8))
  assert transforms.resize_shorter_side(tall, 20).size == (20, 66)
  x = np.zeros((20, 50, 3), np.uint8)
  x[:, 25:] = 255  # Right half white: the centered 20x20 crop is half black, half white.
  out = transforms.eval_transform(Image.fromarray(x), 20)
  assert out.shape == (20, 20, 3)
  assert (out[:, :10] == 0).all() and (out[:, 10:] == 255).all()


def test_preprocess_uses_clip_statistics(task):
  out = np.asarray(task.preprocess(np.full((1, 2, 2, 3), 255, np.uint8)))
  want = (1.0 - np.asarray(imagenet.CLIP_MEAN)) / np.asarray(imagenet.CLIP_STD)
  np.testing.assert_allclose(out[0, 0, 0], want, rtol=1e-6)
  x = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3)
  np.testing.assert_array_equal(task.augment(None, x, 1.0), x)


# --- Fine-tuning batches -------------------------------------------------------


def test_finetune_batch_is_a_function_of_seed_and_step(mock_imagenet, task):
  hp = {"aug": "rand-m9-n2"}
  x1, y1 = task.finetune_batch(16, 7, 3, hp)
  x2, y2 = task.finetune_batch(16, 7, 3, hp)
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(y1, y2)
  assert x1.shape == (16, 32, 32, 3) and x1.dtype == np.uint8
  assert not np.array_equal(x1, task.finetune_batch(16, 7, 4, hp)[0])
  assert not np.array_equal(x1, task.finetune_batch(16, 8, 3, hp)[0])
  # Labels are those of the records at the batch's positions.
  pos = task.batch_positions(16, 7, 3)
  train = source_of(mock_imagenet, "ImageNet2p")
  np.testing.assert_array_equal(y1, [train[int(i)]["label"] for i in task.finetune_idx[pos]])


def test_an_epoch_visits_each_finetune_image_at_most_once(task):
  per_epoch = task.finetune_size() // 64
  seen = np.concatenate([task.batch_positions(64, 1, s) for s in range(per_epoch)])
  assert len(seen) == len(np.unique(seen)) == per_epoch * 64
  assert not np.array_equal(task.batch_positions(64, 1, 0), task.batch_positions(64, 1, per_epoch))
  assert not np.intersect1d(task.finetune_idx[seen], task.heldout.indices).size


def test_no_aug_is_the_eval_preprocessing(mock_imagenet, task):
  x, _ = task.finetune_batch(8, 0, 0, {"aug": None})
  train = source_of(mock_imagenet, "ImageNet2p")
  idx = task.finetune_idx[task.batch_positions(8, 0, 0)]
  want = np.stack([transforms.eval_transform(transforms.decode_rgb(train[int(i)]["image"]), 32)
                   for i in idx])
  np.testing.assert_array_equal(x, want)
  assert not np.array_equal(x, task.finetune_batch(8, 0, 0, {"aug": "rand-m9-n0"})[0])


def test_each_host_decodes_only_its_rows(mock_imagenet, monkeypatch):
  task = imagenet.ImageNetTask(*task_args(mock_imagenet))
  full_x, full_y = task.finetune_batch(8, 3, 2, {"aug": "rand-m5-n1"})
  monkeypatch.setattr(imagenet, "local_rows",  # As process 1 of 2 would hold.
                      lambda batch_size: np.array([4, 5, 6, 7]))
  x, y = task.finetune_batch(8, 3, 2, {"aug": "rand-m5-n1"})
  assert task.finetune_stream(8, 3, {"aug": "rand-m5-n1"}).read(2)[0].shape == (4, 32, 32, 3)
  np.testing.assert_array_equal(x[4:], full_x[4:])   # Same bytes: randomness is per row.
  np.testing.assert_array_equal(y[4:], full_y[4:])
  assert not x[:4].any() and not y[:4].any()


def test_finetune_examples_are_a_fixed_random_sample(task):
  x, y = task.finetune_examples(20)
  x2, y2 = task.finetune_examples(20)
  np.testing.assert_array_equal(x, x2)
  assert x.shape == (20, 32, 32, 3) and len(np.unique(y)) > 15  # Spread over classes.


# --- RandAugment -----------------------------------------------------------------


def test_randaugment_string_parsing():
  assert randaugment.parse("rand-m9-n2") == randaugment.RandAugmentSpec(9.0, 2)
  assert randaugment.parse("rand-m12-n0").num_layers == 0
  s = randaugment.parse("rand-m9-n3-mstd0.5-mmax12-p0.7")
  assert (s.magnitude, s.num_layers, s.magnitude_std, s.magnitude_max, s.prob) == (
      9, 3, 0.5, 12, 0.7)
  for bad in ("augmix-m5", "rand-x9", "rand-m9-n2.5", "rand-m9-inc1"):
    with pytest.raises(ValueError):
      randaugment.parse(bad)
  assert randaugment.from_string(None) is None and randaugment.from_string("") is None


def _image(seed=0, size=32):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8))


def test_randaugment_is_deterministic_given_the_generator():
  aug = randaugment.RandAugment("rand-m9-n2", fill=(123, 117, 104))
  outs = [np.asarray(aug(_image(), np.random.default_rng(s))) for s in (0, 0, 1, 2, 3, 4)]
  np.testing.assert_array_equal(outs[0], outs[1])
  assert sum(not np.array_equal(outs[0], o) for o in outs[2:]) >= 3
  # n0 applies no op; magnitudes above 10 are clipped to 10, as timm does.
  np.testing.assert_array_equal(
      np.asarray(randaugment.RandAugment("rand-m9-n0")(_image(), np.random.default_rng(0))),
      np.asarray(_image()))
  for s in range(5):
    np.testing.assert_array_equal(
        np.asarray(randaugment.RandAugment("rand-m20-n2")(_image(), np.random.default_rng(s))),
        np.asarray(randaugment.RandAugment("rand-m10-n2")(_image(), np.random.default_rng(s))))


def test_randaugment_ops_have_timm_semantics():
  img = _image()
  x = np.asarray(img).astype(int)
  rng = np.random.default_rng(0)
  op = lambda name, m: np.asarray(randaugment.apply_op(img, name, m, rng, (0, 0, 0))).astype(int)
  np.testing.assert_array_equal(op("Invert", 10), 255 - x)
  assert set(np.unique(op("Posterize", 10) % 16)) == {0}       # Keeps 4 bits at m10 ...
  assert not op("Posterize", 0).any()                           # ... and 0 bits (black) at m0.
  np.testing.assert_array_equal(op("Solarize", 10), x)          # Threshold 256: nothing inverted.
  np.testing.assert_array_equal(op("Solarize", 0), 255 - x)     # Threshold 0: all inverted.
  np.testing.assert_array_equal(op("Brightness", 5), x)         # Factor 1.8 * 0.5 + 0.1 = 1.
  added = op("SolarizeAdd", 10)                                 # +110 below 128, clipped.
  np.testing.assert_array_equal(added, np.where(x < 128, np.minimum(x + 110, 255), x))
  for name in randaugment.RAND_TRANSFORMS:
    out = randaugment.apply_op(img, name, 7, rng, (0, 0, 0))
    assert out.size == img.size and out.mode == "RGB"


# --- The Grain pipeline: worker processes, order, resume -----------------------


def _double(i):  # Module-level: pickled by reference into the workers.
  return np.full((2,), 2 * i, np.int64)


def test_stream_position_state_is_the_one_grain_reaches():
  stream = grain_input.Stream(_double, 20, num_workers=2)
  try:
    assert [int(stream.read(i)[0]) for i in range(7)] == [0, 2, 4, 6, 8, 10, 12]
    assert stream.position == 7
    reached = stream._iterator.get_state()  # Grain's own state: the one seek computes.
    assert reached == grain_input._state_at(stream._initial, 7, 2)
    assert int(stream.read(2)[0]) == 4 and int(stream.read(3)[0]) == 6   # Seek back, go on.
    assert int(stream.read(19)[0]) == 38 and int(stream.read(0)[0]) == 0  # Last, then first.
    assert int(stream.read(7)[0]) == 14                                   # Seek to 7 again.
  finally:
    stream.close()
  with pytest.raises(IndexError):
    stream.seek(20)


@pytest.mark.slow
def test_training_stream_resumes_bit_identically(mock_imagenet):
  """A member stopped after step 3 and restarted from the step alone (as the trainer
  does) sees the same bytes as one that never stopped, whatever the number of worker
  processes."""
  hp = {"aug": "rand-m9-n2"}
  uninterrupted = imagenet.ImageNetTask(*task_args(mock_imagenet, num_workers=2))
  stream = uninterrupted.finetune_stream(16, 7, hp)
  want = [stream.read(s) for s in range(4)]
  want += [uninterrupted.finetune_batch(16, 7, s, hp) for s in range(4, 8)]
  uninterrupted.close()

  # New worker processes.
  resumed = imagenet.ImageNetTask(*task_args(mock_imagenet, num_workers=2))
  stream = resumed.finetune_stream(16, 7, hp)
  for s in range(4, 8):  # Step 4 first: the new stream seeks there.
    x, y = stream.read(s)
    np.testing.assert_array_equal(x, want[s][0])
    np.testing.assert_array_equal(y, want[s][1])
  assert stream.position == 8
  x8, _ = stream.read(8)  # Goes on from step 8.
  resumed.close()

  in_process = imagenet.ImageNetTask(*task_args(mock_imagenet))
  for s in (5, 2, 8):  # The trainer resumes by asking for the step: any order works.
    x, y = in_process.finetune_batch(16, 7, s, hp)
    np.testing.assert_array_equal(x, want[s][0] if s < 8 else x8)
  assert not np.array_equal(want[4][0], want[5][0])


@pytest.mark.slow
def test_eval_streams_with_workers_are_exact_and_seekable(mock_imagenet):
  task = imagenet.ImageNetTask(*task_args(mock_imagenet, num_workers=2, heldout_in_memory=False))
  splits = task.eval_splits()
  serial = imagenet.ImageNetTask(*task_args(mock_imagenet, heldout_in_memory=False)).eval_splits()
  # Out of column order, twice, and one abandoned midway: every split stays exact.
  for column in ("ImageNetR", "ImageNet", "ObjectNet", "ImageNetR", "ImageNetA"):
    got = list(splits[column].iterate(8))
    assert [len(b) for b in got[:-1]] == [8] * (len(got) - 1) and 0 < len(got[-1]) <= 8
    want = np.concatenate(list(serial[column].iterate(8)))
    np.testing.assert_array_equal(np.concatenate(got), want)
    next(splits["ImageNetSketch"].iterate(8))
  source = source_of(mock_imagenet, "ImageNetV2", "imagenet_v2/matched-frequency")
  want = [transforms.eval_transform(transforms.decode_rgb(source[i]["image"]), 32)
          for i in range(21)]
  np.testing.assert_array_equal(np.concatenate(list(splits["ImageNetV2"].iterate(5))), want)
  task.close()


# --- The official held-out mask (imagenet_98_idxs.npy) ---------------------------


def _official_style_mask(train_source, per_class_pick):
  """A 0/1 float mask over ImageFolder order, as the official file: per class, hold out the
  file whose number is per_class_pick (e.g. 4108), found by sorting the names ourselves."""
  labels, names = tfds_source.read_fields(train_source, ("label", "file_name"))
  names = [n.decode() for n in names]
  imagefolder = sorted(names)  # '<wnid>_<number>.JPEG': string order = folder, then file.
  mask = np.zeros(len(names))
  for j, name in enumerate(imagefolder):
    if name.endswith(f"_{per_class_pick}.JPEG"):
      mask[j] = 1
  return mask, names, np.asarray(labels)


def test_imagefolder_order_sorts_file_names_as_strings():
  wnids = ("n01440764", "n01675722")
  names = ["n01675722_4108.JPEG", "n01440764_9.JPEG", "n01675722_10026.JPEG", "n01440764_10.JPEG"]
  order = imagenet_heldout.imagefolder_order(names, np.array([1, 0, 1, 0]), wnids)
  assert [names[i] for i in order] == ["n01440764_10.JPEG", "n01440764_9.JPEG",
                                       "n01675722_10026.JPEG", "n01675722_4108.JPEG"]
  with pytest.raises(imagenet_heldout.HeldOutError, match="do not start with their class"):
    imagenet_heldout.imagefolder_order(names, np.array([0, 0, 1, 0]), wnids)


def test_official_mask_maps_onto_tfds_indices_by_file_name(mock_imagenet, tmp_path):
  train = source_of(mock_imagenet, "ImageNet2p")
  mask, names, labels = _official_style_mask(train, 4108)
  assert mask.sum() == 1000
  path = tmp_path / "imagenet_98_idxs.npy"
  np.save(path, mask)
  out = tmp_path / "heldout_official.npz"
  make = run_python(["scripts/make_imagenet_heldout.py", f"--data_dir={mock_imagenet['data_dir']}",
                     f"--official_mask={path}", f"--out={out}", "--per_class=1"], timeout=300)
  assert "official" in make.stdout
  held = imagenet_heldout.load(out)
  assert held.source == "official" and held.seed == -1 and held.per_class == 1
  # Exactly the images the mask names, by file name: n01675722_4108.JPEG is held out, while
  # n01675722_10026.JPEG (before it in ImageFolder order, after it numerically) is not.
  held_names = {names[i] for i in held.indices}
  assert "n01675722_4108.JPEG" in held_names and "n01675722_10026.JPEG" not in held_names
  assert all(n.endswith("_4108.JPEG") for n in held_names)
  np.testing.assert_array_equal(held.labels, labels[held.indices])
  # The mask read in TFDS order, or over numerically sorted names, picks other images.
  assert not np.array_equal(np.flatnonzero(mask), held.indices)
  numeric = sorted(range(len(names)), key=lambda i: (names[i].split("_")[0],
                                                     int(names[i].split("_")[1].split(".")[0])))
  assert set(np.asarray(numeric)[np.flatnonzero(mask)].tolist()) != set(held.indices.tolist())
  # The task says which list it holds out; the seeded default says so too.
  official = imagenet.ImageNetTask(*task_args(mock_imagenet, heldout_file=str(out)))
  assert official.provenance() == {"heldout_list": "official"}
  np.testing.assert_array_equal(official.eval_splits()["ImageNet2p"].labels, held.labels)
  seeded = imagenet_heldout.load(mock_imagenet["heldout_file"])
  assert seeded.source == "seeded" and seeded.seed == 0


def test_official_mask_errors_say_what_is_wrong():
  labels = np.array([0, 0, 1, 1])
  names = ["n01440764_1.JPEG", "n01440764_2.JPEG", "n01443537_1.JPEG", "n01443537_2.JPEG"]
  wnids = ("n01440764", "n01443537")
  np.testing.assert_array_equal(
      imagenet_heldout.from_official_mask(np.array([0., 1., 1., 0.]), names, labels, wnids), [1, 2])
  with pytest.raises(imagenet_heldout.HeldOutError, match=r"expected \(4,\)"):
    imagenet_heldout.from_official_mask(np.ones(5), names, labels, wnids)
  with pytest.raises(imagenet_heldout.HeldOutError, match="only 0 and 1"):
    imagenet_heldout.from_official_mask(np.array([0, 2, 0, 1]), names, labels, wnids)


def test_heldout_module_does_not_import_the_task():
  """imagenet_heldout and imagenet share tfds_source: no import cycle."""
  code = ("import sys; import soup.data.imagenet_heldout, soup.data.tfds_source; "
          "assert 'soup.data.imagenet' not in sys.modules, 'cycle'")
  run_python(["-c", code], timeout=120)


def test_report_says_which_heldout_list(tmp_path):
  from soup import report, results
  base = {"model_name": "model_1", "recipe": "individual", "ImageNet2p": 0.8, "ImageNet": 0.79,
          **{c: 0.5 for c in results.IMAGENET.shifts}}
  def notes(*kinds):
    rows = [dict(base, model_name=f"model_{i + 1}", heldout_list=k) for i, k in enumerate(kinds)]
    return " ".join(report.build_report(rows, results.IMAGENET)["notes"])
  assert "paper's own held-out split" in notes("official", "official")
  assert "seeded draw" in notes("seeded") and "paper's own" not in notes("seeded")
  assert "mix held-out lists (official, seeded)" in notes("official", "seeded")
  assert "held-out list" not in notes(None) and "seeded" not in notes(None)


# --- Cheaper training decode (JPEG draft mode) -----------------------------------------


def _jpeg(width, height, seed=0):
  import io
  rng = np.random.default_rng(seed)
  coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), np.uint8)).resize((width, height),
                                                                             Image.BICUBIC)
  noisy = np.asarray(coarse, np.float32) + rng.normal(0, 6, (height, width, 3))
  out = io.BytesIO()
  Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
  return out.getvalue()


def test_train_example_is_train_transform_and_draft_only_changes_pixels_slightly():
  from soup.data import transforms
  aug = randaugment.RandAugment("rand-m9-n2", fill=(123, 117, 104))
  small, large = _jpeg(500, 375), _jpeg(1600, 1200)
  for data in (small, large):  # Without draft: exactly the decode-then-transform result.
    for s in range(3):
      want = transforms.train_transform(transforms.decode_rgb(data), 64,
                                        np.random.default_rng(s), aug)
      np.testing.assert_array_equal(transforms.train_example(data, 64, np.random.default_rng(s),
                                                             aug), want)
  reduced, diffs = 0, []
  for s in range(12):
    full_rng, draft_rng = np.random.default_rng(s), np.random.default_rng(s)
    full = transforms.train_example(large, 64, full_rng, None if s % 4 == 0 else aug)
    fast = transforms.train_example(large, 64, draft_rng, None if s % 4 == 0 else aug, draft=True)
    assert full_rng.random() == draft_rng.random()  # Same draws: the stream stays in step.
    if s % 4 == 0:
      np.testing.assert_array_equal(fast, full)  # aug None is the eval transform: no draft.
    else:
      reduced += not np.array_equal(fast, full)
      diffs.append(np.abs(fast.astype(int) - full.astype(int)).mean())
  assert reduced >= 6 and max(diffs) < 6  # Drafted, and close (mean abs difference, 0..255).
  for s in range(5):  # 500x375 at 224 px: no crop is 448 px wide and high, so no draft.
    np.testing.assert_array_equal(
        transforms.train_example(small, 224, np.random.default_rng(s), aug, draft=True),
        transforms.train_example(small, 224, np.random.default_rng(s), aug))
