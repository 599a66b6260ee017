"""Host-side image transforms of the ImageNet task (PIL), as in the paper's code.

  evaluation: resize the shorter side to `size` (bicubic), center crop
    (CLIP's `preprocess`, up to normalization, which runs in jit);
  training with aug=None: the same (the paper's finetune.py without --timm-aug);
  training with aug="rand-mM-nN": timm's transforms_imagenet_train, i.e. a
    random-resized crop (scale 0.08-1, ratio 3/4-4/3, bilinear or bicubic),
    a horizontal flip with probability 0.5, then RandAugment (randaugment.py).

Light on imports on purpose: the input pipeline's worker processes load it.
"""

from __future__ import annotations

import io
import math
from typing import Optional

import numpy as np
from PIL import Image

from soup.data import randaugment


def decode_rgb(data: bytes) -> Image.Image:
  with Image.open(io.BytesIO(data)) as img:
    return img.convert("RGB")


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
  """torchvision Resize(size, BICUBIC): shorter side to size, longer side truncated."""
  w, h = img.size
  if w <= h:
    new = (size, int(size * h / w))
  else:
    new = (int(size * w / h), size)
  return img if new == (w, h) else img.resize(new, Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
  """torchvision CenterCrop (images here are never smaller than size)."""
  w, h = img.size
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return img.crop((left, top, left + size, top + size))


def eval_transform(img: Image.Image, size: int) -> np.ndarray:
  """CLIP's evaluation preprocessing, up to normalization: uint8 [size, size, 3]."""
  return np.asarray(center_crop(resize_shorter_side(img, size), size), np.uint8)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision RandomResizedCrop.get_params: (left, top, w, h), 10 tries then a center crop."""
  area = width * height
  log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(*log_ratio))
    w = int(round(np.sqrt(target * aspect)))
    h = int(round(np.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def train_transform(img: Image.Image, size: int, rng: np.random.Generator,
                    augment: Optional[randaugment.RandAugment]) -> np.ndarray:
  """aug None: eval preprocessing; else timm's crop, flip and RandAugment."""
  if augment is None:
    return eval_transform(img, size)
  left, top, w, h = random_resized_crop_box(*img.size, rng)
  resample = (Image.BILINEAR, Image.BICUBIC)[int(rng.integers(2))]
  img = img.resize((size, size), resample, box=(left, top, left + w, top + h))
  if rng.random() < 0.5:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(augment(img, rng), np.uint8)


def train_example(data: bytes, size: int, rng: np.random.Generator,
                  augment: Optional[randaugment.RandAugment], draft: bool = False) -> np.ndarray:
  """train_transform of an encoded image: the same random draws in the same order.

  draft=True (config.data.train_jpeg_draft) lets libjpeg decode a JPEG at 1/2, 1/4 or
  1/8 scale (PIL's draft mode) when the random crop still covers at least size x size
  pixels at that scale: the crop is then resized from the smaller image, which costs
  a fraction of a full decode. The crop box, flip and RandAugment are unchanged; the
  crop's pixels differ slightly (DCT scaling instead of full decode + resampling).
  Evaluation and aug=None (the eval preprocessing) always decode in full.
  """
  if augment is None:
    return eval_transform(decode_rgb(data), size)
  with Image.open(io.BytesIO(data)) as img:
    width, height = img.size
    left, top, w, h = random_resized_crop_box(width, height, rng)
    if draft and img.format == "JPEG":
      img.draft("RGB", (math.ceil(width * size / w), math.ceil(height * size / h)))
    img = img.convert("RGB")
  sx, sy = img.size[0] / width, img.size[1] / height
  resample = (Image.BILINEAR, Image.BICUBIC)[int(rng.integers(2))]
  img = img.resize((size, size), resample, box=(left * sx, top * sy, (left + w) * sx,
                                                  (top + h) * sy))
  if rng.random() < 0.5:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(augment(img, rng), np.uint8)


def row_rng(seed: int, step: int, row: int) -> np.random.Generator:
  """The randomness of row `row` of step `step`'s global batch: a function of these alone,
  so which worker or host decodes the row does not matter."""
  return np.random.default_rng([int(seed), int(step), int(row), 0x5EED])
