"""Deterministic distribution shifts of the test set, mirroring the paper's five.

Each takes uint8 images [n, 28, 28, 1] and returns new uint8 images of the
same shape; the same inputs and seed always give the same bytes.

Ours (mirrors): what it does.
- V2 (ImageNetV2): re-sampled: down to 14x14 and back (bilinear), 0.8x contrast.
- Sketch (ImageNet-Sketch): edge map: Sobel gradient magnitude, rescaled per image.
- R (ImageNet-R): another rendition, a cartoon: the silhouette (pixels > 40)
  filled flat at 110, Sobel edges drawn over it.
- ObjectNet (ObjectNet): new viewpoints: rotation U(-35, 35) deg, shift
  U(-3, 3) px, per-image seeded.
- A (ImageNet-A): hard subset: test images a nearest-centroid pixel classifier
  (fit on the upstream split) gets wrong, unchanged.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def resample(images: np.ndarray) -> np.ndarray:
  from PIL import Image
  out = np.empty_like(images)
  for i, im in enumerate(images[..., 0]):
    small = Image.fromarray(im).resize((14, 14), Image.BILINEAR)
    out[i, ..., 0] = np.asarray(small.resize((28, 28), Image.BILINEAR))
  mean = out.reshape(len(out), -1).mean(axis=1)[:, None, None, None]
  return np.clip(mean + 0.8 * (out.astype(np.float32) - mean), 0, 255).round().astype(np.uint8)


def sketch(images: np.ndarray) -> np.ndarray:
  x = images[..., 0].astype(np.float32)
  gx = ndimage.sobel(x, axis=2)
  gy = ndimage.sobel(x, axis=1)
  mag = np.hypot(gx, gy)
  peak = mag.reshape(len(mag), -1).max(axis=1)[:, None, None]
  return (255 * mag / np.maximum(peak, 1e-6)).round().astype(np.uint8)[..., None]


def rendition(images: np.ndarray) -> np.ndarray:
  """Shape kept, texture replaced (inverting the intensities instead left every model at chance)."""
  flat_fill = np.where(images > 40, 110, 0).astype(np.uint8)
  return np.maximum(flat_fill, sketch(images))


def objectnet(images: np.ndarray, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  angles = rng.uniform(-35, 35, len(images))
  shifts = rng.uniform(-3, 3, (len(images), 2))
  out = np.empty_like(images)
  for i, im in enumerate(images[..., 0].astype(np.float32)):
    rotated = ndimage.rotate(im, angles[i], reshape=False, order=1, mode="constant")
    moved = ndimage.shift(rotated, shifts[i], order=1, mode="constant")
    out[i, ..., 0] = np.clip(moved, 0, 255).round().astype(np.uint8)
  return out


def nearest_centroid_errors(reference_images: np.ndarray, reference_labels: np.ndarray,
                            images: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Indices of `images` that a nearest-centroid pixel classifier gets wrong."""
  ref = reference_images.reshape(len(reference_images), -1).astype(np.float32) / 255
  classes = np.unique(reference_labels)
  centroids = np.stack([ref[reference_labels == c].mean(axis=0) for c in classes])
  x = images.reshape(len(images), -1).astype(np.float32) / 255
  dist = (x**2).sum(1)[:, None] - 2 * x @ centroids.T + (centroids**2).sum(1)[None]
  predicted = classes[np.argmin(dist, axis=1)]
  return np.flatnonzero(predicted != labels)


SHIFTS = ("V2", "Sketch", "R", "ObjectNet", "A")


def make_shifts(test_images: np.ndarray, test_labels: np.ndarray, reference_images: np.ndarray,
                reference_labels: np.ndarray, max_examples: int, seed: int = 0
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The five shift splits; each holds at most max_examples images.

  The first four transform the same fixed random subset of the test set; A is
  the first max_examples hard test images in a fixed random order.
  """
  order = np.random.default_rng(seed).permutation(len(test_images))
  subset = np.sort(order[:max_examples])
  images, labels = test_images[subset], test_labels[subset]
  hard = nearest_centroid_errors(reference_images, reference_labels, test_images, test_labels)
  hard = np.sort(np.random.default_rng(seed + 1).permutation(hard)[:max_examples])
  return {
      "V2": (resample(images), labels),
      "Sketch": (sketch(images), labels),
      "R": (rendition(images), labels),
      "ObjectNet": (objectnet(images, seed), labels),
      "A": (test_images[hard], test_labels[hard]),
  }
