"""The Fashion-MNIST experiment's split policy: which images each stage sees.

The 60k training images (read by soup/data/fashion_mnist_tfds.py) are cut into
upstream | held-out | fine-tuning, disjoint, with the upstream's label space chosen
by config.data.upstream_labels; the test images give the test split and its shifts.
"""

from __future__ import annotations

import numpy as np

from soup.data.batching import Split
from soup.data.fashion_mnist_tfds import load_arrays

# Upstream label space: tops / bottoms and dresses / footwear / bags (0-3).
COARSE_OF_CLASS = np.array([0, 1, 0, 1, 0, 2, 0, 2, 3, 2], np.int32)
# Upstream label spaces (config.data.upstream_labels): class -> upstream label.
#   coarse: the 4 groups above (the weak upstream: it never separates the four tops);
#   tops_merged: the 10 classes but T-shirt/top, Pullover, Coat and Shirt as one "top" (7):
#     the upstream knows most classes, as CLIP knows most of ImageNet, and fine-tuning
#     must learn the hardest distinctions of the task;
#   fine: the 10 classes themselves (the upstream already solves the task).
UPSTREAM_LABELS = {
    "coarse": COARSE_OF_CLASS,
    "tops_merged": np.array([0, 1, 0, 2, 0, 3, 0, 4, 5, 6], np.int32),
    "fine": np.arange(10, dtype=np.int32),
}


def experiment_splits(data_config) -> dict:
  """All splits of the Fashion-MNIST experiment, as in-memory `Split`s.

  The 60k training images are permuted once (split_seed) and cut into
  upstream | held-out | fine-tuning, disjoint; the test split and its five
  shifts come from the 10k test images. Returns
  {"upstream", "held_out", "finetune", "test", "shifts": {name: Split}}.
  """
  from soup.data import shifts as shifts_lib

  d = data_config
  arrays = load_arrays(d.data_dir or None)
  train_images, train_labels = arrays["train"]
  test_images, test_labels = arrays["test"]
  need = d.upstream_examples + d.held_out_examples + d.finetune_examples
  if need > len(train_labels):
    raise ValueError(f"upstream + held_out + finetune examples = {need} > {len(train_labels)}.")
  order = np.random.default_rng(d.split_seed).permutation(len(train_labels))
  # Held-out and fine-tuning come first, so an upstream of another size (an ablation)
  # leaves them, and so every comparison, on the same images.
  a, b = d.held_out_examples, d.held_out_examples + d.finetune_examples
  held_idx, ft_idx, upstream_idx = order[:a], order[a:b], order[b:b + d.upstream_examples]
  train = Split(train_images, train_labels.astype(np.int32))
  # A self-supervised upstream reads no labels, so it may see the fine-tuning images too,
  # as CLIP's web images overlap ImageNet's kind of image; held-out and test never.
  seen = np.concatenate([ft_idx, upstream_idx]) if d.get("upstream_includes_finetune") \
      else upstream_idx
  upstream = train.take(np.sort(seen))
  labels = d.get("upstream_labels", "coarse")
  if labels not in UPSTREAM_LABELS:
    raise ValueError(f"config.data.upstream_labels={labels!r}: use one of "
                     f"{', '.join(UPSTREAM_LABELS)}.")
  images = upstream.images
  if d.get("upstream_transform", "none") == "resample":
    images = shifts_lib.resample(images)  # Another rendition upstream (V2's resampling).
  elif d.get("upstream_transform", "none") != "none":
    raise ValueError(f"config.data.upstream_transform={d.upstream_transform!r}: use 'none' or "
                     "'resample'.")
  upstream = Split(images, UPSTREAM_LABELS[labels][upstream.labels])
  test = Split(test_images[: d.test_examples], test_labels[: d.test_examples].astype(np.int32))
  shifts = shifts_lib.make_shifts(test.images, test.labels, train_images[upstream_idx],
                                  train_labels[upstream_idx], d.shift_examples, d.split_seed)
  return {
      "upstream": upstream,
      "held_out": train.take(np.sort(held_idx)),
      "finetune": train.take(np.sort(ft_idx)),
      "test": test,
      "shifts": {name: Split(im, lb.astype(np.int32)) for name, (im, lb) in shifts.items()},
  }
