"""Model construction from `config.model`."""

from __future__ import annotations


def build(model_config, num_classes: int):
  """Returns a flax module mapping preprocessed images to logits.

  Every model supports `apply(..., return_features=True)` for the pooled
  representation (the linear probe's input) and names its classifier `head`.
  """
  cfg = dict(model_config)
  name = cfg.pop("name")
  if name == "vit":
    from soup.models.vit import ViT
    return ViT(num_classes=num_classes, **cfg)
  if name == "clip":
    # config.model: variant ("ViT-B/32", "ViT-B/16", "ViT-L/14", "tiny") + CLIPConfig overrides.
    from soup.models import clip
    variant = cfg.pop("variant")
    return clip.CLIPImageClassifier(config=clip.get_config(variant, **cfg), num_classes=num_classes)
  raise ValueError(f"Unknown model name {name!r}: use 'vit' or 'clip'.")
