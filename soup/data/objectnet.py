"""ObjectNet, scored the way the model soups authors did (their datasets/objectnet.py).

ObjectNet has no TFDS builder (its licence forbids redistribution), so it is
read from the unpacked release: ``objectnet-1.0/images/<folder>/<image>.png``.
Only the 113 of its 313 classes that overlap ImageNet-1k are scored:

* a class's label is its index among the 113 folder names, sorted (what
  torchvision's ImageFolder gave the authors); images of other folders are
  skipped;
* a model's ObjectNet logit for a class is the max of its logits over the
  ImageNet classes mapped to it (``ObjectNetMapping.logits``);
* the 2-pixel border crop is a switch, config.data.objectnet_border_crop, off
  by default, because the authors' released numbers were computed without it.
  Their code means to crop (the release draws a 1-pixel frame around each
  photo), but in mlfoundations/model-soups datasets/objectnet.py (commit
  d5398f1), `ObjectNetBase.__init__` calls `super().__init__(...)` first, and
  `ImageNet.__init__` -> `populate_test()` -> `get_test_dataset()` builds
  `ObjectNetDataset(label_map, valdir, transform=self.preprocess)` with the
  uncropped transform; only afterwards does `__init__` rebind
  `self.preprocess = Compose([crop, self.preprocess])`, which the dataset and
  its loader never see. Off reproduces their numbers; on applies the crop
  their code intended (a model's ObjectNet accuracy moves by a little).

The mapping comes from the authors' metadata, copied to objectnet_metadata/
(MIT, see the LICENSE there).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

METADATA_DIR = Path(__file__).parent / "objectnet_metadata"
NUM_CLASSES = 113
BORDER = 2
# torchvision's IMG_EXTENSIONS: what ImageFolder would have listed.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
INSTALL_HINT = (
    "Download ObjectNet 1.0 from https://objectnet.dev (objectnet-1.0.zip, password in its "
    "instructions), unzip it and pass --config.data.objectnet_dir=/path/to/objectnet-1.0 "
    "(the folder holding images/<class folder>/*.png).")


class ObjectNetMissingError(FileNotFoundError):
  """The ObjectNet folder is not where the config says."""


@dataclasses.dataclass(frozen=True)
class ObjectNetMapping:
  """The 113 scored classes: folder names (sorted) and their ImageNet labels."""

  folders: tuple[str, ...]                      # Label i is folders[i].
  imagenet_ids: tuple[tuple[int, ...], ...]     # ImageNet labels (0..999) of class i.

  def logits(self, imagenet_logits: np.ndarray) -> np.ndarray:
    """[n, 1000] ImageNet logits -> [n, 113]: per class, the max over its ImageNet classes."""
    x = np.asarray(imagenet_logits)
    return np.stack([x[:, list(ids)].max(axis=1) for ids in self.imagenet_ids], axis=1)


def load_mapping(metadata_dir: str | Path = METADATA_DIR) -> ObjectNetMapping:
  """Reads the metadata exactly as the authors' get_metadata() does.

  ``imagenet_to_label_2012_v2`` lists class descriptions by ILSVRC2012 id; the
  ids are turned into the standard (sorted-wnid) labels through
  ``pytorch_to_imagenet_2012_id.json``. One description occurs twice in that
  list ("crane": the bird and the machine); like the authors' dict, the later
  line wins (no ObjectNet class maps to it).
  """
  d = Path(metadata_dir)
  folder_names = json.loads((d / "folder_to_objectnet_label.json").read_text())
  folder_of_name = {v: k for k, v in folder_names.items()}
  imagenet_of_objectnet = json.loads((d / "objectnet_to_imagenet_1k.json").read_text())
  label_of_2012_id = {v: int(k) for k, v in
                      json.loads((d / "pytorch_to_imagenet_2012_id.json").read_text()).items()}
  lines = (d / "imagenet_to_label_2012_v2").read_text().splitlines()
  label_of_description = {line.strip(): label_of_2012_id[i] for i, line in enumerate(lines)}
  ids_of_folder = {}
  for name, descriptions in imagenet_of_objectnet.items():
    ids_of_folder[folder_of_name[name]] = tuple(label_of_description[x]
                                                for x in descriptions.split("; "))
  folders = tuple(sorted(ids_of_folder))
  if len(folders) != NUM_CLASSES:
    raise ValueError(
        f"ObjectNet metadata in {d} gives {len(folders)} classes, expected {NUM_CLASSES}.")
  return ObjectNetMapping(folders, tuple(ids_of_folder[f] for f in folders))


def images_dir(objectnet_dir: str | os.PathLike) -> Path:
  """``objectnet-1.0`` or its ``images`` subfolder -> the folder of class folders."""
  if not str(objectnet_dir):
    raise ObjectNetMissingError("config.data.objectnet_dir is not set. " + INSTALL_HINT)
  root = Path(objectnet_dir).expanduser()
  for candidate in (root / "images", root):
    if candidate.is_dir() and any((candidate / f).is_dir() for f in load_mapping().folders):
      return candidate
  raise ObjectNetMissingError(f"No ObjectNet class folders under {root} (or {root / 'images'}). "
                              + INSTALL_HINT)


def list_images(objectnet_dir: str | os.PathLike,
                mapping: ObjectNetMapping | None = None) -> tuple[list[Path], np.ndarray]:
  """(paths, labels in 0..112) of the scored images, in ImageFolder order.

  ImageFolder order: class folders sorted, files sorted within each folder;
  folders outside the 113 are skipped.
  """
  mapping = mapping or load_mapping()
  root = images_dir(objectnet_dir)
  paths, labels = [], []
  for label, folder in enumerate(mapping.folders):
    folder_dir = root / folder
    if not folder_dir.is_dir():
      continue  # A partial copy still scores what it has; __init__ logs the count.
    for name in sorted(os.listdir(folder_dir)):
      if name.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(folder_dir / name)
        labels.append(label)
  if not paths:
    raise ObjectNetMissingError(f"No ObjectNet images under {root}. " + INSTALL_HINT)
  return paths, np.asarray(labels, np.int32)


def crop_border(img: Image.Image, border: int = BORDER) -> Image.Image:
  """The authors' crop(): drop `border` pixels on every side."""
  width, height = img.size
  return img.crop((border, border, width - border, height - border))


def load_image(path: str | os.PathLike, border: int = 0) -> Image.Image:
  """An ObjectNet image as RGB, `border` pixels cropped on every side (BORDER when
  config.data.objectnet_border_crop is on; 0, the released numbers' input, by default)."""
  with Image.open(path) as img:
    img = img.convert("RGB")
  return crop_border(img, border) if border else img
