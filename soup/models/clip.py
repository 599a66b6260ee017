"""CLIP (Radford et al. 2021) in Flax linen, laid out like OpenAI's / open_clip's PyTorch model.

Model soups fine-tunes CLIP's image tower with a linear head that starts from the
zero-shot classifier built with the text tower, so both towers are needed. The module
names mirror the PyTorch state dict (``visual.transformer.resblocks.3.attn.in_proj_weight``
becomes ``visual/transformer/resblocks_3/attn/in_proj/kernel``) so that the converter in
``soup.models.convert`` is a readable one-to-one mapping:

  visual/{conv1/kernel, class_embedding, positional_embedding, ln_pre,
          transformer/resblocks_{i}/{ln_1, attn/{in_proj, out_proj}, ln_2,
                                     mlp/{c_fc, c_proj}},
          ln_post, proj}
  text/{token_embedding/embedding, positional_embedding, transformer/...,
        ln_final, text_projection}
  logit_scale

Numerics follow PyTorch: LayerNorm epsilon 1e-5 with two-pass variance, attention as
one fused ``in_proj`` (q, k, v stacked along the output axis in that order), softmax in
float32, ``quick_gelu`` (x * sigmoid(1.702 x), what OpenAI trained with) or exact GELU
(what most open_clip-trained models use) in the MLP. Images are NHWC, already resized
and normalized with ``OPENAI_MEAN`` / ``OPENAI_STD`` (the model does not normalize).
Parameters are float32; ``dtype`` sets the computation dtype (e.g. ``jnp.bfloat16``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# Per-channel RGB statistics that every OpenAI / open_clip CLIP was trained with.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# PyTorch's nn.LayerNorm default, which CLIP uses; flax's default (1e-6) would drift.
LAYER_NORM_EPS = 1e-5

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Shapes of a CLIP ViT model. Frozen (hashable) so it can be a flax module field.

  ``*_mlp_dim`` default to 4x the width, as in every OpenAI model. ``act`` is the MLP
  activation: OpenAI's weights need ``"quick_gelu"``; open_clip models trained from
  scratch (e.g. LAION ones without ``-quickgelu`` in their name) need ``"gelu"``. The
  weights cannot tell the two apart, so it is a choice the user makes. ``remat``
  recomputes each block's activations in the backward pass instead of keeping them
  (same params and gradients, one more forward pass of compute).
  """

  embed_dim: int
  image_size: int
  patch_size: int
  vision_width: int
  vision_layers: int
  vision_heads: int
  context_length: int
  vocab_size: int
  text_width: int
  text_layers: int
  text_heads: int
  vision_mlp_dim: Optional[int] = None
  text_mlp_dim: Optional[int] = None
  act: str = "quick_gelu"
  remat: bool = False

  def __post_init__(self):
    if self.act not in ACTIVATIONS:
      raise ValueError(f"act must be one of {ACTIVATIONS}, got {self.act!r}")
    for tower, width, heads in (("vision", self.vision_width, self.vision_heads),
                                ("text", self.text_width, self.text_heads)):
      if heads < 1 or width % heads:
        raise ValueError(f"{tower}_width={width} is not divisible into {heads} heads")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not a multiple of "
                       f"patch_size={self.patch_size}")

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  def replace(self, **changes) -> "CLIPConfig":
    return dataclasses.replace(self, **changes)


def _openai_config(embed_dim, patch_size, vision_width, vision_layers, text_width):
  # OpenAI uses 64-wide heads in both towers and a 12-layer, 77-token text tower.
  return CLIPConfig(
      embed_dim=embed_dim, image_size=224, patch_size=patch_size,
      vision_width=vision_width, vision_layers=vision_layers,
      vision_heads=vision_width // 64, context_length=77, vocab_size=49408,
      text_width=text_width, text_layers=12, text_heads=text_width // 64)


def _open_clip_config(embed_dim, vision: dict, text: dict, act: str = "gelu"):
  """A CLIPConfig from the numbers of an open_clip model_configs/*.json.

  open_clip sizes heads by head_width (image) or heads (text), and the MLP as
  int(width * mlp_ratio) (open_clip/transformer.py, ResidualAttentionBlock).
  """
  return CLIPConfig(
      embed_dim=embed_dim, image_size=vision["image_size"], patch_size=vision["patch_size"],
      vision_width=vision["width"], vision_layers=vision["layers"],
      vision_heads=vision["width"] // vision["head_width"],
      vision_mlp_dim=int(vision["width"] * vision["mlp_ratio"]),
      context_length=text["context_length"], vocab_size=text["vocab_size"],
      text_width=text["width"], text_layers=text["layers"], text_heads=text["heads"],
      text_mlp_dim=int(text["width"] * text.get("mlp_ratio", 4.0)), act=act)


# The giants, vendored from open_clip src/open_clip/model_configs/ViT-bigG-14.json and
# ViT-g-14.json (commit 89fb801). Trained by LAION with nn.GELU (no -quickgelu suffix).
OPEN_CLIP_GIANTS = {
    "ViT-bigG/14": (1280, dict(image_size=224, layers=48, width=1664, head_width=104,
                               mlp_ratio=4.9231, patch_size=14),
                    dict(context_length=77, vocab_size=49408, width=1280, heads=20, layers=32)),
    "ViT-g/14": (1024, dict(image_size=224, layers=40, width=1408, head_width=88,
                            mlp_ratio=4.3637, patch_size=14),
                 dict(context_length=77, vocab_size=49408, width=1024, heads=16, layers=24)),
}

CONFIGS = {
    "ViT-B/32": _openai_config(512, 32, 768, 12, 512),
    "ViT-B/16": _openai_config(512, 16, 768, 12, 512),
    "ViT-L/14": _openai_config(768, 14, 1024, 24, 768),
    **{name: _open_clip_config(*numbers) for name, numbers in OPEN_CLIP_GIANTS.items()},
    # For tests: runs in milliseconds on a CPU.
    "tiny": CLIPConfig(
        embed_dim=16, image_size=32, patch_size=8, vision_width=32, vision_layers=2,
        vision_heads=2, context_length=16, vocab_size=100, text_width=32,
        text_layers=2, text_heads=2),
}


def get_config(name: str, **overrides) -> CLIPConfig:
  """A named config ("ViT-B/32" or "ViT-B-32", "ViT-B/16", "ViT-L/14", "ViT-g/14",
  "ViT-bigG/14", "tiny")."""
  key = name
  if key not in CONFIGS and key.count("-") == 2:  # open_clip spelling: "ViT-B-32".
    head, _, tail = key.rpartition("-")
    key = f"{head}/{tail}"
  if key not in CONFIGS:
    raise KeyError(f"unknown CLIP config {name!r}; known: {sorted(CONFIGS)}")
  return CONFIGS[key].replace(**overrides)


def quick_gelu(x):
  """OpenAI's GELU approximation, x * sigmoid(1.702 x); its weights were trained with it."""
  return x * jax.nn.sigmoid(1.702 * x)


def _activation(name: str):
  if name == "quick_gelu":
    return quick_gelu
  if name == "gelu":
    return lambda x: nn.gelu(x, approximate=False)  # torch.nn.GELU() is the exact erf form.
  raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def _layer_norm(name: str, dtype) -> nn.LayerNorm:
  # Two-pass variance, like PyTorch: CLIP's residual stream has large outlier features
  # where E[x^2] - E[x]^2 loses precision.
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=dtype, name=name)


def l2_normalize(x, axis: int = -1):
  """x / ||x||, computed in float32 (the features feed logits scaled by ~100)."""
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


class SelfAttention(nn.Module):
  """``torch.nn.MultiheadAttention`` as CLIP uses it: fused q/k/v ``in_proj``, ``out_proj``."""

  num_heads: int
  causal: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, t, width = x.shape
    head_dim = width // self.num_heads
    init = nn.initializers.normal(stddev=width**-0.5)
    qkv = nn.Dense(3 * width, dtype=self.dtype, kernel_init=init, name="in_proj")(x)
    q, k, v = jnp.split(qkv.reshape(b, t, 3, self.num_heads, head_dim), 3, axis=2)
    q, k, v = (y[:, :, 0] for y in (q, k, v))  # Each [b, t, heads, head_dim].
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
    if self.causal:
      mask = jnp.tril(jnp.ones((t, t), dtype=bool))
      logits = jnp.where(mask, logits, -jnp.inf)  # The diagonal keeps every row finite.
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, width)
    return nn.Dense(width, dtype=self.dtype, kernel_init=init, name="out_proj")(out)


class MLP(nn.Module):
  mlp_dim: int
  act: str = "quick_gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    init = nn.initializers.normal(stddev=width**-0.5)
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=init, name="c_fc")(x)
    x = _activation(self.act)(x)
    return nn.Dense(width, dtype=self.dtype, kernel_init=init, name="c_proj")(x)


class ResidualAttentionBlock(nn.Module):
  """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

  num_heads: int
  mlp_dim: int
  act: str = "quick_gelu"
  causal: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x + SelfAttention(self.num_heads, self.causal, self.dtype, name="attn")(
        _layer_norm("ln_1", self.dtype)(x))
    return x + MLP(self.mlp_dim, self.act, self.dtype, name="mlp")(
        _layer_norm("ln_2", self.dtype)(x))


class Transformer(nn.Module):
  layers: int
  num_heads: int
  mlp_dim: int
  act: str = "quick_gelu"
  causal: bool = False
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
    for i in range(self.layers):
      x = block(self.num_heads, self.mlp_dim, self.act, self.causal, self.dtype,
                name=f"resblocks_{i}")(x)
    return x


class VisionTransformer(nn.Module):
  """CLIP's image tower: [B, H, W, 3] normalized images -> [B, embed_dim] (not normalized)."""

  config: CLIPConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    cfg = self.config
    width, p = cfg.vision_width, cfg.patch_size
    if images.shape[1:3] != (cfg.image_size, cfg.image_size):
      raise ValueError(f"expected {cfg.image_size}x{cfg.image_size} images (NHWC), "
                       f"got shape {images.shape}")
    scale = width**-0.5
    x = nn.Conv(width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                dtype=self.dtype, name="conv1")(images.astype(self.dtype))
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)  # Row-major over the patch grid, as torch's flatten(2).
    cls = self.param("class_embedding", nn.initializers.normal(stddev=scale), (width,))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, c)), x], axis=1)
    pos = self.param("positional_embedding", nn.initializers.normal(stddev=scale),
                     (h * w + 1, width))
    x = x + pos.astype(x.dtype)
    x = _layer_norm("ln_pre", self.dtype)(x)
    x = Transformer(cfg.vision_layers, cfg.vision_heads, cfg.vision_mlp_dim or 4 * width,
                    cfg.act, causal=False, dtype=self.dtype, remat=cfg.remat,
                    name="transformer")(x)
    x = _layer_norm("ln_post", self.dtype)(x[:, 0])
    proj = self.param("proj", nn.initializers.normal(stddev=scale), (width, cfg.embed_dim))
    return x @ proj.astype(x.dtype)


class TextTransformer(nn.Module):
  """CLIP's text tower: [B, L] token ids (L <= context_length) -> [B, embed_dim].

  The causal mask means the feature read at the end-of-text token (the largest id in
  each row, as in OpenAI's ``text.argmax(-1)``) only depends on the tokens before it,
  so sequences shorter than ``context_length`` give the same features as padded ones.
  """

  config: CLIPConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, text):
    cfg = self.config
    width = cfg.text_width
    seq_len = text.shape[-1]
    if seq_len > cfg.context_length:
      raise ValueError(f"text has {seq_len} tokens, more than context_length="
                       f"{cfg.context_length}")
    x = nn.Embed(cfg.vocab_size, width, embedding_init=nn.initializers.normal(0.02),
                 name="token_embedding")(text).astype(self.dtype)
    pos = self.param("positional_embedding", nn.initializers.normal(0.01),
                     (cfg.context_length, width))
    x = x + pos[:seq_len].astype(x.dtype)
    x = Transformer(cfg.text_layers, cfg.text_heads, cfg.text_mlp_dim or 4 * width,
                    cfg.act, causal=True, dtype=self.dtype, remat=cfg.remat,
                    name="transformer")(x)
    x = _layer_norm("ln_final", self.dtype)(x)
    x = x[jnp.arange(x.shape[0]), jnp.argmax(text, axis=-1)]
    proj = self.param("text_projection", nn.initializers.normal(stddev=width**-0.5),
                      (width, cfg.embed_dim))
    return x @ proj.astype(x.dtype)


class CLIP(nn.Module):
  """Both towers and the learned temperature.

  ``apply(variables, images, text)`` returns ``(logits_per_image, logits_per_text)`` like
  the PyTorch model; use ``method=CLIP.encode_image`` / ``CLIP.encode_text`` (or the
  module-level helpers below) for unnormalized features of one modality.
  """

  config: CLIPConfig
  dtype: Any = jnp.float32

  def setup(self):
    self.visual = VisionTransformer(self.config, self.dtype)
    self.text = TextTransformer(self.config, self.dtype)
    # Stored in log space as in the PyTorch model; init is CLIP's temperature 0.07.
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)),
                                  ())

  def encode_image(self, images):
    return self.visual(images)

  def encode_text(self, text):
    return self.text(text)

  def __call__(self, images, text):
    image_features = l2_normalize(self.encode_image(images))
    text_features = l2_normalize(self.encode_text(text))
    logits_per_image = jnp.exp(self.logit_scale) * image_features @ text_features.T
    return logits_per_image, logits_per_image.T


def encode_image(model: CLIP, params, images):
  """Unnormalized image features [B, embed_dim] for a batch of NHWC images."""
  return model.apply({"params": params}, images, method=CLIP.encode_image)


def encode_text(model: CLIP, params, text):
  """Unnormalized text features [B, embed_dim] for a batch of token ids [B, L]."""
  return model.apply({"params": params}, text, method=CLIP.encode_text)


class CLIPImageClassifier(nn.Module):
  """Image tower + L2-normalized features + linear ``head``: what model soups fine-tunes.

  Mirrors ``ModelWrapper`` in the paper's code: ``logits = head(normalize(encode_image(x)))``.
  Params are ``{'visual': <CLIP image tower>, 'head': {'kernel': [embed_dim, classes],
  'bias': [classes]}}`` so ``classifier_params`` can assemble them from converted CLIP
  weights and a zero-shot head. Used like ``ViT``: ``apply({'params': p}, images)`` gives
  logits, ``return_features=True`` the normalized features the head reads.
  The head is zero-initialized (as ``ViT``'s) because it is meant to be replaced by the
  zero-shot head, or trained from zero by a linear probe.
  """

  config: CLIPConfig
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, return_features: bool = False):
    features = l2_normalize(VisionTransformer(self.config, self.dtype, name="visual")(images))
    if return_features:
      return features
    return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    name="head")(features)


def classifier_params(clip_params, head_kernel, head_bias=None):
  """Params of a ``CLIPImageClassifier`` from full CLIP params and a head.

  ``head_kernel`` is [embed_dim, num_classes] (e.g. from ``zeroshot.zeroshot_head``);
  a missing bias is zeros. The image tower is shared, not copied.
  """
  head_kernel = jnp.asarray(head_kernel, jnp.float32)
  if head_kernel.ndim != 2:
    raise ValueError(f"head_kernel must be [embed_dim, num_classes], got {head_kernel.shape}")
  embed_dim = clip_params["visual"]["proj"].shape[-1]
  if head_kernel.shape[0] != embed_dim:
    raise ValueError(f"head_kernel has {head_kernel.shape[0]} input features but the image "
                     f"tower outputs {embed_dim}")
  if head_bias is None:
    head_bias = jnp.zeros(head_kernel.shape[1], jnp.float32)
  head_bias = jnp.asarray(head_bias, jnp.float32)
  if head_bias.shape != head_kernel.shape[1:]:
    raise ValueError(f"head_bias must have shape {head_kernel.shape[1:]}, got {head_bias.shape}")
  return {"visual": clip_params["visual"], "head": {"kernel": head_kernel, "bias": head_bias}}
