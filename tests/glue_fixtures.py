"""Tiny GLUE-layout data, a tiny WordPiece tokenizer and a tiny random BERT checkpoint,
written by the tests themselves so a clone without ../shared tests the whole text path.

The toy tasks carry a learnable signal (sentiment words decide SST-2's and CoLA's label;
RTE's pairs are entailed when the hypothesis repeats a premise word).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

POSITIVE = ["good", "great", "fine", "nice", "happy", "bright"]
NEGATIVE = ["bad", "awful", "poor", "sad", "dull", "grim"]
FILLER = ["the", "a", "movie", "film", "was", "is", "very", "quite", "plot", "acting", "cat",
          "dog", "sat", "on", "mat", "it", "story", "truly"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _sentence(rng, label: int) -> str:
  words = list(rng.choice(FILLER, size=rng.integers(2, 9)))
  words.insert(int(rng.integers(0, len(words) + 1)),
               str(rng.choice(POSITIVE if label else NEGATIVE)))
  return " ".join(words)


def write_glue(root: Path, train: int = 160, dev: int = 48, seed: int = 0) -> Path:
  """SST-2, RTE and CoLA in GLUE's layout (headers as GLUE's; CoLA without one)."""
  rng = np.random.default_rng(seed)
  for task in ("SST-2", "RTE", "CoLA"):
    (root / task).mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("dev", dev)):
      labels = rng.integers(0, 2, n)
      if task == "SST-2":
        lines = ["sentence\tlabel"] + [f"{_sentence(rng, y)}\t{y}" for y in labels]
      elif task == "CoLA":
        lines = [f"src{i % 3}\t{y}\t\t{_sentence(rng, y)}" for i, y in enumerate(labels)]
      else:
        lines = ["index\tsentence1\tsentence2\tlabel"]
        for i, y in enumerate(labels):
          premise = _sentence(rng, 1)
          hypothesis = (" ".join(premise.split()[:2]) if y == 0
                        else " ".join(rng.choice(FILLER, size=3)))
          lines.append(f"{i}\t{premise}\t{hypothesis}\t"
                       f"{'entailment' if y == 0 else 'not_entailment'}")
      (root / task / f"{split}.tsv").write_text("\n".join(lines) + "\n")
  return root


def write_tokenizer(path: Path) -> int:
  """A BERT-style uncased WordPiece tokenizer.json over the toy words; returns its size."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
  vocab = {w: i for i, w in enumerate(SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER)))}
  tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
  tokenizer.save(str(path))
  return len(vocab)


def write_bert_checkpoint(folder: Path, vocab_size: int, *, hidden: int = 16, layers: int = 1,
                          heads: int = 2, intermediate: int = 32, positions: int = 40,
                          seed: int = 0) -> Path:
  """A random BERT in Hugging Face's layout: config.json and model.safetensors."""
  import jax
  import jax.numpy as jnp
  from flax import traverse_util
  from safetensors.numpy import save_file

  from soup.models import bert
  folder.mkdir(parents=True, exist_ok=True)
  hf = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": vocab_size,
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": intermediate, "max_position_embeddings": positions,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0,
        "position_embedding_type": "absolute", "initializer_range": 0.02}
  (folder / "config.json").write_text(json.dumps(hf, indent=1))
  config = bert.BertConfig.from_hf(hf)
  dummy = jnp.zeros((1, 4), jnp.int32)
  params = bert.BertEncoder(config).init(jax.random.key(seed), dummy, dummy, dummy == 0)["params"]
  state = {}
  for path, value in traverse_util.flatten_dict(params).items():
    value = np.asarray(value, np.float32)
    # Random LayerNorm and bias values too, so the converter's mapping of every key is tested.
    if path[-1] in ("scale", "bias"):
      value = value + np.random.default_rng(len(state)).normal(0, 0.1, value.shape).astype(
          np.float32)
    state[bert._hf_key(path)] = np.ascontiguousarray(value.T if path[-1] == "kernel" else value)
  save_file(state, str(folder / "model.safetensors"))
  return folder


def write_all(root: Path) -> dict[str, str]:
  """Data, tokenizer and checkpoint under root; the overrides that point a config at them."""
  glue_dir = write_glue(root / "glue")
  checkpoint = root / "tiny_bert"
  checkpoint.mkdir(parents=True, exist_ok=True)
  vocab = write_tokenizer(checkpoint / "tokenizer.json")
  write_bert_checkpoint(checkpoint, vocab)
  return {"data.glue_dir": str(glue_dir), "data.tokenizer": str(checkpoint / "tokenizer.json"),
          "model.checkpoint": str(checkpoint), "init.path": str(checkpoint)}
