"""Zero-shot classification heads from CLIP's text tower, and CLIP's BPE tokenizer.

Model soups starts every fine-tuning run from CLIP with a linear head whose rows are
the zero-shot class embeddings: for each class, the text embeddings of 80 prompts
("a bad photo of a {}." ...) are L2-normalized, averaged, normalized again and scaled
by the model's temperature ``exp(logit_scale)``; the bias is zero. That is
``zeroshot_classifier`` in the paper's zeroshot.py (which hard-codes the scale as 100,
``exp(logit_scale)`` of OpenAI's models), reproduced by ``zeroshot_head``.

The tokenizer needs OpenAI's merges file ``bpe_simple_vocab_16e6.txt.gz`` (it ships
inside the ``clip`` and ``open_clip`` Python packages); it cannot be downloaded here, so
``tokenize`` takes its path, and ``zeroshot_head`` works on token ids so that it can be
used and tested without the file.
"""

from __future__ import annotations

import functools
import gzip
import html
import os
import re
from typing import Callable, Optional, Sequence

import numpy as np

# OpenAI's 80 ImageNet prompt templates (``imagenet_templates`` in the CLIP repository's
# "Prompt_Engineering_for_ImageNet" notebook), in their original order.
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)
assert len(IMAGENET_TEMPLATES) == 80


# --------------------------------------------------------------------------- head


def _normalize(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def zeroshot_head(
    encode_text_fn: Callable[[np.ndarray], np.ndarray],
    tokenized_classnames_per_template,
    *,
    logit_scale: float,
    batch_size: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Builds the zero-shot linear head ``(kernel [embed_dim, classes], bias [classes])``.

  Args:
    encode_text_fn: maps token ids [n, L] to text features [n, embed_dim], e.g.
      ``jax.jit(lambda t: clip.encode_text(model, params, t))``.
    tokenized_classnames_per_template: int ids [num_templates, num_classes, L]; row
      ``[t, c]`` is template ``t`` filled with class name ``c`` and tokenized.
    logit_scale: the model's *log* temperature, i.e. ``params['logit_scale']`` as
      stored in the checkpoint; the head is scaled by ``exp(logit_scale)`` (100 for
      OpenAI's models) so its logits match CLIP's.
    batch_size: at most this many texts per ``encode_text_fn`` call (default: one call
      per template). The last chunk is padded to the same size so a jitted function
      compiles only once.

  Features are normalized per prompt, averaged over templates and normalized again,
  all in float64 to keep the mean exact; kernel and bias are returned as float32.
  """
  ids = np.asarray(tokenized_classnames_per_template)
  if ids.ndim != 3:
    raise ValueError("tokenized_classnames_per_template must be [num_templates, "
                     f"num_classes, context_length], got shape {ids.shape}")
  num_templates, num_classes, _ = ids.shape
  if num_templates == 0 or num_classes == 0:
    raise ValueError(f"need at least one template and one class, got shape {ids.shape}")
  chunk = batch_size or num_classes
  total = None
  for t in range(num_templates):
    parts = []
    for start in range(0, num_classes, chunk):
      rows = ids[t, start:start + chunk]
      n = len(rows)
      if n < chunk and batch_size:  # Pad with copies of a real row, then drop them.
        rows = np.concatenate([rows, np.repeat(rows[:1], chunk - n, axis=0)])
      parts.append(np.asarray(encode_text_fn(rows), np.float64)[:n])
    features = np.concatenate(parts)
    if features.shape[0] != num_classes or features.ndim != 2:
      raise ValueError(f"encode_text_fn returned shape {features.shape} for "
                       f"{num_classes} texts; expected [{num_classes}, embed_dim]")
    features = _normalize(features)
    total = features if total is None else total + features
  class_embeddings = _normalize(total / num_templates)  # [classes, embed_dim]
  kernel = (np.exp(np.float64(logit_scale)) * class_embeddings).T.astype(np.float32)
  return kernel, np.zeros(num_classes, np.float32)


def tokenize_prompts(classnames: Sequence[str], templates: Sequence[str], *, bpe_path,
                     context_length: int = 77) -> np.ndarray:
  """Token ids [num_templates, num_classes, context_length] for ``zeroshot_head``."""
  texts = [template.format(name) for template in templates for name in classnames]
  ids = tokenize(texts, bpe_path=bpe_path, context_length=context_length)
  return ids.reshape(len(templates), len(classnames), context_length)


def build_zeroshot_head(model, params, classnames: Sequence[str],
                        templates: Sequence[str] = IMAGENET_TEMPLATES, *, bpe_path,
                        batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """The zero-shot head of a ``soup.models.clip.CLIP`` for ``classnames``.

  ``params`` are the full CLIP params (e.g. from ``convert.clip_from_state_dict``).
  """
  import jax

  from soup.models import clip

  encode = jax.jit(lambda text: clip.encode_text(model, params, text))
  ids = tokenize_prompts(classnames, templates, bpe_path=bpe_path,
                         context_length=model.config.context_length)
  return zeroshot_head(encode, ids, logit_scale=float(params["logit_scale"]),
                       batch_size=batch_size)


# --------------------------------------------------------------------------- tokenizer

try:  # OpenAI's pattern uses Unicode classes (\p{L}, \p{N}) that only `regex` knows.
  import regex as _regex
except ImportError:  # pragma: no cover - depends on the environment.
  _regex = None

if _regex is not None:
  _TOKEN_PATTERN = _regex.compile(
      r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
      r"""[^\s\p{L}\p{N}]+""", _regex.IGNORECASE)
else:
  # Same pattern in `re` terms: letters are [^\W\d_], digits \d, and the last class is
  # "neither space, letter nor number" (underscore included). It differs from the
  # original only for numeric characters that are not decimal digits (e.g. "²", "Ⅻ"),
  # which `re` counts as letters; ImageNet class names and prompts contain none.
  _TOKEN_PATTERN = re.compile(
      r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|"""
      r"""(?:[^\s\w]|_)+""", re.IGNORECASE)

SOT_TOKEN, EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"
# OpenAI keeps the first 49152 - 256 - 2 merges, so that bytes (256), their end-of-word
# forms (256), merges and the 2 special tokens make the 49408-entry vocabulary.
_NUM_MERGES = 49152 - 256 - 2


@functools.lru_cache(maxsize=None)
def _byte_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from bytes to printable characters.

  BPE runs on strings; printable bytes map to themselves and the others (spaces,
  control bytes...) to unused code points from 256 on, so no byte becomes whitespace.
  """
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  mapping = {b: chr(b) for b in printable}
  extra = 0
  for b in range(256):
    if b not in mapping:
      mapping[b] = chr(256 + extra)
      extra += 1
  return mapping


def _clean(text: str) -> str:
  """OpenAI's basic_clean + whitespace_clean + lower-casing.

  OpenAI also runs ``ftfy.fix_text`` (repairs mojibake); it is used when installed and
  makes no difference for well-formed text such as class names.
  """
  try:
    import ftfy
    text = ftfy.fix_text(text)
  except ImportError:
    pass
  text = html.unescape(html.unescape(text)).strip()
  return re.sub(r"\s+", " ", text).strip().lower()


class SimpleTokenizer:
  """CLIP's byte-level BPE tokenizer (OpenAI's ``simple_tokenizer``), given the merges file."""

  def __init__(self, bpe_path):
    bpe_path = os.fspath(bpe_path)
    if not os.path.isfile(bpe_path):
      raise FileNotFoundError(
          f"CLIP BPE vocabulary not found at {bpe_path!r}. It is the file "
          "bpe_simple_vocab_16e6.txt.gz shipped inside OpenAI's `clip` package and "
          "`open_clip` (open_clip/bpe_simple_vocab_16e6.txt.gz); copy it here and pass "
          "its path as bpe_path.")
    with open(bpe_path, "rb") as f:
      data = f.read()
    if data[:2] == b"\x1f\x8b":  # gzip magic; the file may also be stored unpacked.
      data = gzip.decompress(data)
    lines = data.decode("utf-8").split("\n")[1:_NUM_MERGES + 1]  # Line 0 is a header.
    merges = [tuple(line.split()) for line in lines if line.strip()]
    if any(len(m) != 2 for m in merges):
      raise ValueError(f"{bpe_path} is not a BPE merges file (expected 'a b' per line)")
    self.byte_encoder = _byte_to_unicode()
    self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
    vocab = list(self.byte_encoder.values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += [SOT_TOKEN, EOT_TOKEN]
    self.encoder = {token: i for i, token in enumerate(vocab)}
    self.decoder = {i: token for token, i in self.encoder.items()}
    self.bpe_ranks = {m: i for i, m in enumerate(merges)}
    self.sot_token = self.encoder[SOT_TOKEN]
    self.eot_token = self.encoder[EOT_TOKEN]
    self._cache = {SOT_TOKEN: SOT_TOKEN, EOT_TOKEN: EOT_TOKEN}

  @property
  def vocab_size(self) -> int:
    return len(self.encoder)

  def bpe(self, token: str) -> str:
    """Space-separated BPE units of one pre-token; the last unit ends with ``</w>``."""
    if token in self._cache:
      return self._cache[token]
    word = list(token[:-1]) + [token[-1] + "</w>"]
    while len(word) > 1:
      # Merge the adjacent pair with the lowest rank everywhere it occurs, until no
      # adjacent pair is a known merge.
      pairs = set(zip(word, word[1:]))
      best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
      if best not in self.bpe_ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    result = " ".join(word)
    self._cache[token] = result
    return result

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` without the start/end tokens."""
    ids = []
    for token in _TOKEN_PATTERN.findall(_clean(text)):
      token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
      ids.extend(self.encoder[unit] for unit in self.bpe(token).split(" "))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of token ids (special tokens included as text); for debugging."""
    # "</w>" and the special tokens are printable ASCII, which the byte map keeps as is.
    text = "".join(self.decoder[int(i)] for i in ids)
    raw = bytearray(self.byte_decoder[c] for c in text)
    return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()


@functools.lru_cache(maxsize=4)
def _tokenizer(bpe_path: str) -> SimpleTokenizer:
  return SimpleTokenizer(bpe_path)


def tokenize(texts, *, bpe_path, context_length: int = 77,
             truncate: bool = False) -> np.ndarray:
  """Token ids [len(texts), context_length] (int32), like ``clip.tokenize``.

  Each row is ``<|startoftext|> ... <|endoftext|>`` padded with zeros. A text longer
  than the context raises unless ``truncate``, which keeps the end-of-text token last
  (CLIP pools the feature at that token, so it must be present).
  """
  if isinstance(texts, str):
    texts = [texts]
  tok = _tokenizer(os.fspath(bpe_path))
  out = np.zeros((len(texts), context_length), np.int32)
  for row, text in enumerate(texts):
    ids = [tok.sot_token] + tok.encode(text) + [tok.eot_token]
    if len(ids) > context_length:
      if not truncate:
        raise ValueError(f"{text!r} is {len(ids)} tokens long, more than "
                         f"context_length={context_length}")
      ids = ids[:context_length - 1] + [tok.eot_token]
    out[row, :len(ids)] = ids
  return out
