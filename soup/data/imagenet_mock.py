"""Tiny stand-ins for the ImageNet experiment's inputs, for tests and smoke runs.

ImageNet, its shifts and the pretrained weights are far too large for a test
(and not downloadable here), so the `smoke` argument of the ImageNet configs
runs the same code on:

* the five TFDS datasets (imagenet2012 train/validation, imagenet_v2,
  imagenet_sketch, imagenet_r, imagenet_a) prepared for real, as array_record,
  by the catalog's own builders (same names, versions, features and splits)
  with only their examples replaced by a few small random JPEGs;
* an ObjectNet folder with a few PNGs (with the 1-pixel frame of the release)
  in scored and unscored class folders;
* the held-out list, made from the mock train split by the real procedure;
* tiny random weights in the real file formats: an OpenAI-layout CLIP state
  dict (.safetensors), a big_vision ViT (.npz), and a tiny CLIP BPE file.

  python -m soup.data.imagenet_mock --out=/tmp/soup_imagenet_mock

writes all of it (a few seconds) where the smoke configs look by default.
"""

from __future__ import annotations

import argparse
import gzip
import math
from pathlib import Path

import numpy as np

DEFAULT_ROOT = Path("/tmp/soup_imagenet_mock")
# Vision tower of soup.models.clip.CONFIGS["tiny"]; the text tower keeps CLIP's
# 77-token context so that the 80 real prompt templates fit, and a vocabulary
# matching TINY_MERGES (512 byte tokens + merges + 2 special tokens).
TINY_MERGES = ("t h", "th e</w>", "o f</w>", "p h", "ph o", "t o</w>", "pho to</w>", "a </w>")
TINY_CLIP = dict(image=32, patch=8, width=32, layers=2, embed=16, text_width=32, text_layers=2,
                 context=77, vocab=512 + len(TINY_MERGES) + 2)
TINY_VIT = dict(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64)


def _random_image(rng: np.random.Generator, min_size: int = 24, max_size: int = 48):
  """A small RGB image of random size: a few colored blocks (JPEG-friendly)."""
  from PIL import Image
  w, h = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
  coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
  return Image.fromarray(coarse).resize((w, h), Image.NEAREST)


def photo_like_image(rng: np.random.Generator, size: tuple[int, int] = (500, 375)):
  """An RGB image of ImageNet's typical size whose JPEG costs what a photo's costs to decode:
  a smooth random color field, stripes and pixel noise (benchmarks; tests use _random_image)."""
  from PIL import Image
  w, h = size
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
  img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
  for _ in range(3):
    freq, angle = rng.uniform(0.02, 0.3), rng.uniform(0, np.pi)
    img = img + 20 * np.sin(freq * (np.cos(angle) * x + np.sin(angle) * y))[..., None]
  img = img + rng.normal(0, 18, img.shape)
  return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


# The mock's train images of a class are numbered like these real ones (then 20000 + k):
# n01675722_4108.JPEG sorts after n01675722_10026.JPEG in ImageFolder's (string) order.
TRAIN_NUMBERS = (4108, 10026, 957, 12)


def train_file_names(labels: np.ndarray) -> list[str]:
  """ImageNet-style train file names, <wnid>_<number>.JPEG, numbered by TRAIN_NUMBERS within
  each class: their string order (ImageFolder's) is neither their numeric order nor the
  order of the records in TFDS."""
  from soup.data.tfds_source import imagenet_wnids
  wnids, seen, names = imagenet_wnids(), {}, []
  for c in labels:
    k = seen[int(c)] = seen.get(int(c), -1) + 1
    number = TRAIN_NUMBERS[k] if k < len(TRAIN_NUMBERS) else 20000 + k
    names.append(f"{wnids[int(c)]}_{number}.JPEG")
  return names


def _prepare(name: str, data_dir: Path, split_labels: dict[str, np.ndarray], seed: int,
             config: str | None = None, file_names: dict[str, list[str]] | None = None,
             photo_splits: tuple[str, ...] = ()) -> None:
  """Prepares catalog dataset `name` in data_dir with random images of the given labels
  (file names f"{split}_{i}.JPEG" unless given)."""
  file_names = file_names or {}
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()
  base = tfds.builder_cls(name)

  class Mock(base, skip_registration=True):
    """The catalog's builder, with tiny random examples instead of downloaded ones."""

    name = base.name

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing is downloaded.
      return [tfds.core.SplitGenerator(name=s, gen_kwargs=dict(split=s)) for s in split_labels]

    def _generate_examples(self, split):
      rng = np.random.default_rng([seed, *split.encode()])
      for i, label in enumerate(split_labels[split]):
        image = photo_like_image(rng) if split in photo_splits else _random_image(rng)
        yield f"{split}_{i}", {"image": image, "label": int(label),
                               "file_name": (file_names[split][i] if split in file_names
                                             else f"{split}_{i}.JPEG")}

  kwargs = dict(config=config) if config else {}
  builder = Mock(data_dir=str(data_dir), file_format="array_record", **kwargs)
  if not builder.is_prepared():
    builder.download_and_prepare()


def write_datasets(root: str | Path = DEFAULT_ROOT, *, train_per_class: int = 2,
                   heldout_per_class: int = 1, eval_examples: int = 21, seed: int = 0,
                   photo_eval: bool = False) -> dict:
  """Writes the mock TFDS datasets, ObjectNet folder and held-out list under root.

  Returns {"data_dir", "objectnet_dir", "heldout_file"}. Eval splits hold
  `eval_examples` images (21 by default: batches of 8 end with a partial one);
  photo_eval makes the five streamed TFDS test splits photo-like 500x375 images
  (benchmarks of decoding), else all images are small.
  """
  from PIL import Image

  from soup.data import imagenet, imagenet_heldout, objectnet

  root = Path(root)
  data_dir = root / "tfds"
  rng = np.random.default_rng(seed)
  train = np.repeat(np.arange(imagenet.NUM_CLASSES), train_per_class)
  photos = ("test",) if photo_eval else ()
  _prepare("imagenet2012", data_dir, {
      "train": train, "validation": rng.integers(0, imagenet.NUM_CLASSES, eval_examples)}, seed,
      file_names={"train": train_file_names(train)},
      photo_splits=("validation",) if photo_eval else ())
  _prepare("imagenet_v2", data_dir, {"test": rng.integers(0, 1000, eval_examples)}, seed,
           config="matched-frequency", photo_splits=photos)
  _prepare("imagenet_sketch", data_dir, {"test": rng.integers(0, 1000, eval_examples)}, seed,
           photo_splits=photos)
  _prepare("imagenet_r", data_dir,
           {"test": rng.choice(imagenet.IMAGENET_R_CLASSES, eval_examples)}, seed,
           photo_splits=photos)
  _prepare("imagenet_a", data_dir,
           {"test": rng.choice(imagenet.IMAGENET_A_CLASSES, eval_examples)}, seed,
           photo_splits=photos)

  # ObjectNet: 3 scored folders with 3 images each, one unscored folder, one non-image file.
  images = root / "objectnet-1.0" / "images"
  mapping = objectnet.load_mapping()
  for folder in (*mapping.folders[:2], mapping.folders[-1], "not_in_imagenet"):
    (images / folder).mkdir(parents=True, exist_ok=True)
    for i in range(3):
      img = np.asarray(_random_image(rng, 40, 56)).copy()
      img[[0, -1]], img[:, [0, -1]] = (255, 0, 0), (255, 0, 0)  # The release's red frame.
      Image.fromarray(img).save(images / folder / f"{i:02d}.png")
    (images / folder / "notes.txt").write_text("not an image")

  heldout_file = root / "imagenet2012_heldout.npz"
  if not heldout_file.exists():
    imagenet_heldout.make_from_tfds(str(data_dir), heldout_file, per_class=heldout_per_class)
  return {"data_dir": str(data_dir), "objectnet_dir": str(root / "objectnet-1.0"),
          "heldout_file": str(heldout_file)}


# --- Tiny weights in the real file formats ----------------------------------


def _block(rng, prefix: str, width: int) -> dict:
  n = lambda *s, std=0.05: (std * rng.standard_normal(s)).astype(np.float32)
  mlp = 4 * width
  return {
      f"{prefix}.ln_1.weight": 1 + n(width), f"{prefix}.ln_1.bias": n(width),
      f"{prefix}.attn.in_proj_weight": n(3 * width, width, std=0.2),
      f"{prefix}.attn.in_proj_bias": n(3 * width),
      f"{prefix}.attn.out_proj.weight": n(width, width, std=0.2),
      f"{prefix}.attn.out_proj.bias": n(width),
      f"{prefix}.ln_2.weight": 1 + n(width), f"{prefix}.ln_2.bias": n(width),
      f"{prefix}.mlp.c_fc.weight": n(mlp, width, std=0.2), f"{prefix}.mlp.c_fc.bias": n(mlp),
      f"{prefix}.mlp.c_proj.weight": n(width, mlp, std=0.1), f"{prefix}.mlp.c_proj.bias": n(width),
  }


def tiny_clip_state_dict(seed: int = 0, **overrides) -> dict[str, np.ndarray]:
  """A random CLIP ViT state dict with OpenAI's key names and layouts (TINY_CLIP shapes)."""
  c = {**TINY_CLIP, **overrides}
  rng = np.random.default_rng(seed)
  n = lambda *s, std=0.05: (std * rng.standard_normal(s)).astype(np.float32)
  w, tw, grid = c["width"], c["text_width"], c["image"] // c["patch"]
  sd = {
      "visual.conv1.weight": n(w, 3, c["patch"], c["patch"], std=0.05),
      "visual.class_embedding": n(w), "visual.positional_embedding": n(grid * grid + 1, w),
      "visual.ln_pre.weight": 1 + n(w), "visual.ln_pre.bias": n(w),
      "visual.ln_post.weight": 1 + n(w), "visual.ln_post.bias": n(w),
      "visual.proj": n(w, c["embed"], std=0.2),
      "token_embedding.weight": n(c["vocab"], tw, std=0.02),
      "positional_embedding": n(c["context"], tw, std=0.01),
      "ln_final.weight": 1 + n(tw), "ln_final.bias": n(tw),
      "text_projection": n(tw, c["embed"], std=0.2),
      "logit_scale": np.array(math.log(1 / 0.07), np.float32),
  }
  for i in range(c["layers"]):
    sd.update(_block(rng, f"visual.transformer.resblocks.{i}", w))
  for i in range(c["text_layers"]):
    sd.update(_block(rng, f"transformer.resblocks.{i}", tw))
  return sd


def write_tiny_clip(path: str | Path, seed: int = 0) -> str:
  """tiny_clip_state_dict as .safetensors (the format open_clip publishes)."""
  from safetensors.numpy import save_file
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  save_file(tiny_clip_state_dict(seed), str(path))
  return str(path)


def write_tiny_bpe(path: str | Path) -> str:
  """A CLIP merges file (header line, then merges in rank order), gzipped like OpenAI's."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(gzip.compress(("#version: 0.2\n" + "\n".join(TINY_MERGES) + "\n").encode()))
  return str(path)


def write_tiny_vit(path: str | Path, image_size: int = 48, num_classes: int = 7,
                   seed: int = 0) -> str:
  """A random ViT (TINY_VIT) in big_vision's .npz layout ('/'-joined keys) with a head for
  `num_classes` and position embeddings for image_size: loading for another image size
  and label set must drop the head and resize them."""
  import jax
  import jax.numpy as jnp

  from soup.models import convert
  from soup.models.vit import ViT

  model = ViT(num_classes=num_classes, **TINY_VIT)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, image_size, image_size, 3)))["params"]
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, **convert.flatten_params(params))
  return str(path)


def write_all(root: str | Path = DEFAULT_ROOT) -> dict:
  """Everything the smoke configs read, at the paths they expect under root."""
  root = Path(root)
  out = write_datasets(root)
  out["clip_path"] = write_tiny_clip(root / "tiny_clip.safetensors")
  out["bpe_path"] = write_tiny_bpe(root / "tiny_bpe.txt.gz")
  out["vit_path"] = write_tiny_vit(root / "tiny_vit.npz")
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=str(DEFAULT_ROOT))
  args = parser.parse_args(argv)
  for key, value in write_all(args.out).items():
    print(f"{key}: {value}")


if __name__ == "__main__":
  main()
