"""RandAugment as timm implements it, driven by a numpy Generator.

The paper's sweep names its augmentation with timm's strings, e.g.
``rand-m9-n2``: apply ``n`` operations drawn (with replacement) from the 15
below, each with probability 0.5, at magnitude ``m``. We reproduce timm's
``rand_augment_transform`` (timm/data/auto_augment.py) with PIL so the
magnitudes mean the same thing:

* magnitudes are on timm's 0..10 scale and clipped to it: ``m`` 11..20
  (which the paper's sweep samples) act as 10, as in timm;
* each magnitude-dependent op picks a random sign where timm does;
* geometric ops fill with the dataset mean and resample with a randomly
  chosen bilinear or bicubic filter (timm's ``interpolation='random'``).

Every random choice comes from the ``np.random.Generator`` passed in, so an
image, a string and a seed always give the same bytes (Python's ``random``,
which timm uses, is never touched).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitudes are on a 0..10 scale.
# timm's default _RAND_TRANSFORMS (the non-"increasing" set), in timm's order.
RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)
_RESAMPLE = (Image.BILINEAR, Image.BICUBIC)


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  """A parsed ``rand-...`` string (timm's sections: m, n, mstd, mmax, p)."""

  magnitude: float = 10.0
  num_layers: int = 2
  magnitude_std: float = 0.0
  magnitude_max: float = LEVEL_DENOM
  prob: float = 0.5


def parse(spec: str) -> RandAugmentSpec:
  """Parses timm's ``rand-m{M}-n{N}[-mstd{S}][-mmax{X}][-p{P}]``.

  Raises ValueError for anything else (unknown sections would silently change
  what the sweep means), e.g. ``parse("rand-m9-n2") == RandAugmentSpec(9.0, 2)``.
  """
  parts = spec.split("-")
  if parts[0] != "rand":
    raise ValueError(f"RandAugment spec {spec!r} must start with 'rand-' (e.g. 'rand-m9-n2').")
  values = {}
  for part in parts[1:]:
    m = re.fullmatch(r"(mstd|mmax|m|n|p)(\d+(?:\.\d+)?)", part)
    if not m:
      raise ValueError(f"Unknown section {part!r} in RandAugment spec {spec!r}; "
                       "known: m<magnitude>, n<num ops>, mstd<std>, mmax<max>, p<prob>.")
    values[m.group(1)] = float(m.group(2))
  n = values.get("n", 2.0)
  if n != int(n):
    raise ValueError(f"RandAugment spec {spec!r}: n must be an integer.")
  return RandAugmentSpec(magnitude=values.get("m", 10.0), num_layers=int(n),
                         magnitude_std=values.get("mstd", 0.0),
                         magnitude_max=values.get("mmax", LEVEL_DENOM),
                         prob=values.get("p", 0.5))


# --- The operations (timm's, same arguments) ------------------------------


def _signed(value: float, rng: np.random.Generator) -> float:
  return -value if rng.random() < 0.5 else value


def _affine(img, matrix, fill, resample):
  return img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


def _solarize_add(img, add: int, thresh: int = 128):
  lut = [min(255, i + add) if i < thresh else i for i in range(256)]
  return img.point(lut * len(img.getbands()))


def apply_op(img: Image.Image, name: str, magnitude: float, rng: np.random.Generator,
             fill: tuple[int, ...], translate_pct: float = 0.45) -> Image.Image:
  """One timm op at a 0..10 magnitude (already clipped)."""
  level = magnitude / LEVEL_DENOM
  resample = _RESAMPLE[int(rng.integers(2))]
  if name == "AutoContrast":
    return ImageOps.autocontrast(img)
  if name == "Equalize":
    return ImageOps.equalize(img)
  if name == "Invert":
    return ImageOps.invert(img)
  if name == "Rotate":
    return img.rotate(_signed(30.0 * level, rng), resample=resample, fillcolor=fill)
  if name == "Posterize":
    bits = int(4 * level)  # timm: keep the 0..4 most significant bits.
    if bits <= 0:  # What older Pillow (timm's) did for 0 bits; Pillow >= 12 refuses it.
      return Image.new(img.mode, img.size)
    return img if bits >= 8 else ImageOps.posterize(img, bits)
  if name == "Solarize":
    return ImageOps.solarize(img, int(256 * level))
  if name == "SolarizeAdd":
    return _solarize_add(img, int(110 * level))
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    factor = 1.8 * level + 0.1  # timm's _enhance_level_to_arg: 0.1..1.9.
    return getattr(ImageEnhance, name)(img).enhance(factor)
  if name == "ShearX":
    return _affine(img, (1, _signed(0.3 * level, rng), 0, 0, 1, 0), fill, resample)
  if name == "ShearY":
    return _affine(img, (1, 0, 0, _signed(0.3 * level, rng), 1, 0), fill, resample)
  if name == "TranslateXRel":
    pixels = _signed(translate_pct * level, rng) * img.size[0]
    return _affine(img, (1, 0, pixels, 0, 1, 0), fill, resample)
  if name == "TranslateYRel":
    pixels = _signed(translate_pct * level, rng) * img.size[1]
    return _affine(img, (1, 0, 0, 0, 1, pixels), fill, resample)
  raise ValueError(f"Unknown RandAugment op {name!r}; known: {RAND_TRANSFORMS}.")


class RandAugment:
  """``RandAugment(parse("rand-m9-n2"), fill=(123, 117, 104))(img, rng)``."""

  def __init__(self, spec: RandAugmentSpec | str, fill: Sequence[int] = (128, 128, 128),
               ops: Sequence[str] = RAND_TRANSFORMS):
    self.spec = parse(spec) if isinstance(spec, str) else spec
    self.fill = tuple(int(v) for v in fill)
    self.ops = tuple(ops)

  def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
    s = self.spec
    for index in rng.integers(len(self.ops), size=s.num_layers):  # With replacement, as timm.
      if s.prob < 1.0 and rng.random() > s.prob:
        continue
      magnitude = s.magnitude
      if s.magnitude_std == float("inf"):
        magnitude = rng.uniform(0, magnitude)
      elif s.magnitude_std > 0:
        magnitude = rng.normal(magnitude, s.magnitude_std)
      magnitude = min(max(0.0, magnitude), s.magnitude_max)
      img = apply_op(img, self.ops[index], magnitude, rng, self.fill)
    return img


def from_string(spec: Optional[str],
                fill: Sequence[int] = (128, 128, 128)) -> Optional[RandAugment]:
  """None (or "") -> no RandAugment; otherwise the parsed transform."""
  return RandAugment(spec, fill) if spec else None
