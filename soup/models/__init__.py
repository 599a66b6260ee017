"""The models a config may name (config.model.name), each declared once, and `build`.

An entry says how to build the flax module from config.model and which loader
of soup/models/pretrained.py reads its released weights. A model's module is
imported when it is built: the config check reads this registry and must stay
quick.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """One model.

  Attributes:
    build: (config.model less its name, num_classes) -> a flax module mapping preprocessed
      images to logits.
    pretrained_loader: the function of soup/models/pretrained.py that reads its weights
      (config -> backbone params). Named, not held: pretrained.py reads this registry.
  """
  build: Callable[[dict, int], Any]
  pretrained_loader: str


def _build_vit(cfg: dict, num_classes: int):
  from soup.models.vit import ViT
  return ViT(num_classes=num_classes, **cfg)


def _build_clip(cfg: dict, num_classes: int):
  # config.model: variant ("ViT-B/32", "ViT-B/16", "ViT-L/14", "tiny") + CLIPConfig overrides.
  from soup.models import clip
  variant = cfg.pop("variant")
  return clip.CLIPImageClassifier(config=clip.get_config(variant, **cfg), num_classes=num_classes)


def _build_bert(cfg: dict, num_classes: int):
  # config.model: checkpoint (a Hugging Face BERT folder; its config.json gives the shapes, the
  # other keys override BertConfig fields) or all BertConfig fields, and pooling.
  from soup.models import bert
  pooling = cfg.pop("pooling", "cls_pooler")
  checkpoint = cfg.pop("checkpoint", None)
  config = (dataclasses.replace(bert.read_config(checkpoint), **cfg) if checkpoint
            else bert.BertConfig(**cfg))
  return bert.BertClassifier(config=config, num_classes=num_classes, pooling=pooling)


MODELS: dict[str, ModelEntry] = {
    "vit": ModelEntry(_build_vit, pretrained_loader="load_vit_backbone"),
    "clip": ModelEntry(_build_clip, pretrained_loader="load_clip_image_tower"),
    "bert": ModelEntry(_build_bert, pretrained_loader="load_bert_encoder"),
}


class UnknownModelError(ValueError):
  """config.model.name names no registered model."""


def get(name: str) -> ModelEntry:
  """The entry of config.model.name; an unknown name is refused with the registered ones."""
  if name not in MODELS:
    raise UnknownModelError(f"config.model.name={name!r} is unknown; use one of "
                            f"{', '.join(MODELS)}.")
  return MODELS[name]


def build(model_config, num_classes: int):
  """Returns a flax module mapping preprocessed images to logits.

  Every model supports `apply(..., return_features=True)` for the pooled
  representation (the linear probe's input) and names its classifier `head`.
  """
  cfg = dict(model_config)
  return get(cfg.pop("name")).build(cfg, num_classes)
