"""Vision Transformer with big_vision's parameter names.

Parameter tree (as in big_vision/models/vit.py, so its .npz checkpoints load):
  stem/{kernel,bias} (only with stem_channels > 0), embedding/{kernel,bias}, cls, pos_embedding,
  Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0,
  LayerNorm_1, MlpBlock_0/{Dense_0,Dense_1}}, Transformer/encoder_norm,
  pre_logits (optional), head.

MLP activation (`activation`): big_vision's MlpBlock calls flax `nn.gelu(x)`
(big_vision/models/vit.py, commit 0127fb6), whose default is approximate=True,
the tanh form; google-research/vision_transformer does the same. Checkpoints
trained there (the AugReg ViTs) want "gelu_tanh": exact GELU moves random-weight
logits by about 1e-3. "gelu" (exact erf, torch.nn.GELU's and timm's default)
stays the class default, for models trained here from scratch.

`stem_channels > 0` adds one 3x3 convolution (stride 1) and the activation before
the patch embedding, a small hybrid ViT (the ViT paper's hybrids put a ResNet
there): on Fashion-MNIST it gave 87.3% test against 86.0% for the plain patch
embedding at equal upstream training (experiments/README.md). Off by default, so
big_vision and CLIP checkpoints load as before.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),   # Exact (erf).
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),  # big_vision's nn.gelu(x).
}


def activation_fn(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"config.model.activation must be one of {sorted(ACTIVATIONS)}, "
                     f"got {name!r}.")
  return ACTIVATIONS[name]


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Any = jnp.float32
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(stddev=1e-6))(x)
    x = activation_fn(self.activation)(x)
    return nn.Dense(d, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                    bias_init=nn.initializers.normal(stddev=1e-6))(x)


class Encoder1DBlock(nn.Module):
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform())(y, y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype)(x)
    return x + MlpBlock(self.mlp_dim, dtype=self.dtype, activation=self.activation)(y)


class Encoder(nn.Module):
  depth: int
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = Encoder1DBlock(self.mlp_dim, self.num_heads, self.dtype, self.activation,
                         name=f"encoderblock_{i}")(x)
    return nn.LayerNorm(name="encoder_norm", dtype=self.dtype)(x)


class ViT(nn.Module):
  """ViT classifier. `num_classes=0` returns the pooled representation."""

  num_classes: int
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  mlp_dim: Optional[int] = None
  num_heads: int = 12
  pool_type: str = "tok"  # "tok" (class token) or "gap".
  representation_size: Optional[int] = None
  head_zeroinit: bool = True
  activation: str = "gelu"  # "gelu_tanh" for big_vision checkpoints (module docstring).
  stem_channels: int = 0  # > 0: a 3x3 conv stem before the patch embedding (hybrid ViT).
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image, *, return_features: bool = False):
    p = self.patch_size
    if self.stem_channels:
      image = activation_fn(self.activation)(
          nn.Conv(self.stem_channels, (3, 3), padding="SAME", name="stem", dtype=self.dtype)(image))
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", name="embedding",
                dtype=self.dtype)(image)
    n, h, w, c = x.shape
    x = jnp.reshape(x, [n, h * w, c])
    # As big_vision: position embeddings for the patches only, then the class token.
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=1 / c**0.5),
                     (1, h * w, c), jnp.float32)
    x = x + pos.astype(x.dtype)
    if self.pool_type == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c), jnp.float32)
      x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]).astype(x.dtype), x], axis=1)
    x = Encoder(self.depth, self.mlp_dim or 4 * self.width, self.num_heads, self.dtype,
                self.activation, name="Transformer")(x)
    x = x[:, 0] if self.pool_type == "tok" else jnp.mean(x, axis=1)
    if self.representation_size is not None:
      x = jnp.tanh(nn.Dense(self.representation_size, name="pre_logits", dtype=self.dtype)(x))
    if return_features or not self.num_classes:
      return x
    init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
    return nn.Dense(self.num_classes, name="head", kernel_init=init, dtype=self.dtype)(x)

