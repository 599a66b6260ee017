"""BERT (Devlin et al. 2019) in Flax linen, loading Hugging Face BERT checkpoints.

Soups of text classifiers fine-tune a pretrained BERT encoder (e.g. sentence-transformers'
all-MiniLM-L6-v2) with a linear `head`, as the image models are. A text batch is ONE int32
array `tokens` of shape (B, 2, L): tokens[:, 0] the input ids, tokens[:, 1] the token type
ids, and the attention mask is `ids != pad_token_id`; so the trainer and the evaluator,
which pass one array per batch, run text unchanged. A padded batch row of all zeros gives
finite logits.

Parameter tree of `BertClassifier` (`load_hf_checkpoint` fills `bert`):
  bert/embeddings/{word_embeddings, position_embeddings, token_type_embeddings, LayerNorm},
  bert/layer_{i}/{query, key, value, attention_output, attention_norm, intermediate, output,
                  output_norm},
  bert/pooler, head.
Hugging Face's `encoder.layer.{i}.attention.self.query` is `bert/layer_{i}/query` (the
others in `_LAYER_KEYS`), `pooler.dense` is `bert/pooler`, and `embeddings.*` keep their names.

Numerics follow transformers' BertModel: post-LayerNorm layers, LayerNorm with the
checkpoint's epsilon (1e-12) and two-pass variance, exact (erf) GELU, float32 throughout.
There is no dropout: fine-tuning here runs deterministically, without BERT's dropout 0.1.
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False)}  # HF's "gelu" is exact erf.
POOLINGS = ("cls_pooler", "mean")

# The Hugging Face module (under encoder.layer.{i}) of each BertLayer submodule.
_LAYER_KEYS = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attention_output": "attention.output.dense", "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense", "output": "output.dense",
    "output_norm": "output.LayerNorm"}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Shapes of a BERT encoder. Frozen (hashable) so it can be a flax module field."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float
  pad_token_id: int = 0
  hidden_act: str = "gelu"

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use one of "
                       f"{sorted(ACTIVATIONS)}.")
    if self.num_heads < 1 or self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible into "
                       f"{self.num_heads} heads.")

  @classmethod
  def from_hf(cls, hf: dict) -> "BertConfig":
    """From the fields of a Hugging Face config.json (defaults as transformers' BertConfig)."""
    if hf.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"position_embedding_type={hf['position_embedding_type']!r} is not "
                       "supported; only 'absolute' position embeddings are implemented.")
    return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
               num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
               intermediate_size=hf["intermediate_size"],
               max_position_embeddings=hf.get("max_position_embeddings", 512),
               type_vocab_size=hf.get("type_vocab_size", 2),
               layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
               pad_token_id=hf.get("pad_token_id", 0) or 0,
               hidden_act=hf.get("hidden_act", "gelu"))


def _dense(features: int, name: str) -> nn.Dense:
  return nn.Dense(features, kernel_init=nn.initializers.normal(0.02), name=name)


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
  # Two-pass variance, as torch: with epsilon 1e-12 the fast E[x²]-E[x]² form drifts.
  return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, name=name)


class BertLayer(nn.Module):
  """Post-LN transformer layer: x = LN(x + attn(x)), then x = LN(x + mlp(x))."""
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    b, length, width = x.shape
    heads = lambda y: y.reshape(b, length, c.num_heads, width // c.num_heads)
    q, k, v = (heads(_dense(width, name)(x)) for name in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(width // c.num_heads)
    # Padding keys get the most negative float, as transformers' mask: exp() of it is 0.
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    y = _dense(width, "attention_output")(attended.reshape(b, length, width))
    x = _layer_norm(c, "attention_norm")(x + y)
    y = ACTIVATIONS[c.hidden_act](_dense(c.intermediate_size, "intermediate")(x))
    return _layer_norm(c, "output_norm")(x + _dense(width, "output")(y))


class BertEmbeddings(nn.Module):
  """Word + position + token type embeddings, then LayerNorm."""
  config: BertConfig

  @nn.compact
  def __call__(self, ids, token_types):
    c = self.config
    length = ids.shape[1]
    if length > c.max_position_embeddings:
      raise ValueError(f"sequences of {length} tokens are longer than the "
                       f"{c.max_position_embeddings} position embeddings.")
    embed = lambda rows, name: nn.Embed(rows, c.hidden_size, name=name,
                                        embedding_init=nn.initializers.normal(0.02))
    x = (embed(c.vocab_size, "word_embeddings")(ids)
         + embed(c.max_position_embeddings, "position_embeddings")(jnp.arange(length)[None])
         + embed(c.type_vocab_size, "token_type_embeddings")(token_types))
    return _layer_norm(c, "LayerNorm")(x)


class BertEncoder(nn.Module):
  """(ids, token types, mask) -> (hidden states (B, L, H), pooled (B, H)), as BertModel."""
  config: BertConfig

  @nn.compact
  def __call__(self, ids, token_types, mask):
    x = BertEmbeddings(self.config, name="embeddings")(ids, token_types)
    for i in range(self.config.num_layers):
      x = BertLayer(self.config, name=f"layer_{i}")(x, mask)
    # BERT's pooler: Dense + tanh on the [CLS] position.
    return x, jnp.tanh(_dense(self.config.hidden_size, "pooler")(x[:, 0]))


class BertClassifier(nn.Module):
  """BERT encoder (`bert`) + linear `head` on the pooled features; input tokens (B, 2, L).

  pooling: "cls_pooler", BERT's pooler output on [CLS] (as BertForSequenceClassification);
  "mean", the mean of the last hidden states over the non-padding tokens (what
  sentence-transformers' MiniLM was trained with). The pooler's params exist either way,
  so both poolings share one parameter tree. The head is zero-initialized (as ViT's): a
  linear probe or training sets it.
  """
  config: BertConfig
  num_classes: int
  pooling: str = "cls_pooler"

  @nn.compact
  def __call__(self, tokens, *, return_features: bool = False):
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling={self.pooling!r} must be one of {POOLINGS}.")
    if tokens.ndim != 3 or tokens.shape[1] != 2:
      raise ValueError(f"tokens must be (batch, 2, length): ids and token types; got "
                       f"{tokens.shape}.")
    ids, token_types = tokens[:, 0], tokens[:, 1]
    mask = ids != self.config.pad_token_id
    hidden, pooled = BertEncoder(self.config, name="bert")(ids, token_types, mask)
    if self.pooling == "mean":
      weights = mask[..., None].astype(hidden.dtype)
      # max(count, 1): a padded row (no valid token) gives zeros, not NaN.
      pooled = (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    if return_features:
      return pooled
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(pooled)


# --- Hugging Face checkpoints ------------------------------------------------


def _hf_key(path: tuple) -> str:
  """The Hugging Face state dict key of one `bert` param path."""
  *modules, leaf = path
  if modules[0].startswith("layer_"):
    modules = ["encoder", "layer", modules[0][len("layer_"):], _LAYER_KEYS[modules[1]]]
  elif modules[0] == "pooler":
    modules = ["pooler", "dense"]
  return ".".join([*modules, "bias" if leaf == "bias" else "weight"])


def _file(folder: str, name: str) -> str:
  path = os.path.join(os.path.expanduser(folder), name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{name} is missing from the BERT checkpoint folder {folder!r} "
                            "(a Hugging Face BERT folder has config.json and model.safetensors).")
  return path


def read_config(folder: str) -> BertConfig:
  """The BertConfig of a Hugging Face folder's config.json."""
  with open(_file(folder, "config.json")) as f:
    return BertConfig.from_hf(json.load(f))


def from_state_dict(state_dict: dict, config: BertConfig) -> dict:
  """The `bert` params of BertClassifier from a Hugging Face BERT state dict.

  Keys may carry a "bert." prefix (BertForSequenceClassification, BertForPreTraining);
  the known non-encoder keys are ignored, and logged. Torch Linear weights (out, in)
  become kernels (in, out). Missing or unexpected keys, and misshapen tensors, are a
  ValueError naming them.
  """
  kept, ignored = {}, []
  for key, value in state_dict.items():
    name = key[len("bert."):] if key.startswith("bert.") else key
    # The known non-encoder keys: a buffer, the MLM/NSP heads, a classification head.
    if name == "embeddings.position_ids" or name.startswith(("cls.", "classifier.")):
      ignored.append(key)
      continue
    # Checkpoints converted from TensorFlow BERT name LayerNorm's params gamma and beta.
    name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                        "LayerNorm.bias")
    kept[name] = value
  if ignored:
    logging.info("BERT checkpoint: ignored %d non-encoder keys: %s", len(ignored),
                 ", ".join(sorted(ignored)))
  dummy = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(BertEncoder(config).init, jax.random.PRNGKey(0), dummy, dummy,
                          dummy == 0)["params"]
  expected = {_hf_key(path): (path, leaf.shape)
              for path, leaf in traverse_util.flatten_dict(shapes).items()}
  missing, unexpected = sorted(set(expected) - set(kept)), sorted(set(kept) - set(expected))
  if missing or unexpected:
    raise ValueError(f"the checkpoint's keys do not fit its config.json (a BERT of "
                     f"{config.num_layers} layers): missing keys {missing}, unexpected keys "
                     f"{unexpected} (names without the 'bert.' prefix).")
  flat, wrong = {}, []
  for name, (path, shape) in expected.items():
    value = np.asarray(kept[name], np.float32)
    flat[path] = value.T if path[-1] == "kernel" else value
    if flat[path].shape != shape:  # Named in torch's layout, as the file has them.
      torch_shape = shape[::-1] if path[-1] == "kernel" else shape
      wrong.append(f"{name}: expected {tuple(torch_shape)}, found {value.shape}")
  if wrong:
    raise ValueError(f"checkpoint tensors of the wrong shape for its config: {'; '.join(wrong)}.")
  return traverse_util.unflatten_dict(flat)


def load_hf_checkpoint(folder: str) -> tuple[BertConfig, dict]:
  """(BertConfig, `bert` params) from a folder with config.json and model.safetensors."""
  from safetensors.numpy import load_file
  config = read_config(folder)
  return config, from_state_dict(load_file(_file(folder, "model.safetensors")), config)


def check_tokenizer(tokenizer_vocab_size: int, config: BertConfig) -> None:
  """Refuses a tokenizer whose ids can index past the word embedding (jax would clamp them)."""
  if tokenizer_vocab_size > config.vocab_size:
    raise ValueError(f"tokenizer.json has {tokenizer_vocab_size} tokens but the checkpoint's "
                     f"word embedding has {config.vocab_size} rows; the tokenizer and the "
                     "weights come from different models.")
