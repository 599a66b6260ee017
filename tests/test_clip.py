"""CLIP in Flax against open_clip itself, and the tokenizer against open_clip's.

The reference is the PyTorch implementation (open_clip, in requirements-test.txt):
random ViT-B/32 and ViT-B/16-quickgelu with every parameter perturbed, saved as
safetensors and converted, so the comparison checks the converter's transposes and
the model's math together. Tiny state dicts in OpenAI's names and layouts (torch
Linear [out, in], Conv [out, in, kh, kw], fused in_proj) test the rest quickly.
"""

import gzip
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from soup.models import clip, convert, zeroshot
from soup.models.imagenet_classnames import IMAGENET_CLASSNAMES
from tests.conftest import HEAD_WIDTH, TINY_CLIP, make_state_dict

pytestmark = pytest.mark.slow  # The pipeline or several processes: -m 'not slow' skips it.

# --------------------------------------------------------------------------- fixtures


def make_inputs(seed=1, batch=3):
  rng = np.random.default_rng(seed)
  size = TINY_CLIP["image"]
  images = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
  # Like clip.tokenize output: SOT, a few ids, EOT (the largest id), zero padding.
  sot, eot = TINY_CLIP["vocab"] - 2, TINY_CLIP["vocab"] - 1
  text = np.zeros((batch, TINY_CLIP["context"]), np.int32)
  for row, length in enumerate([5, 9, TINY_CLIP["context"] - 2][:batch]):
    text[row, 0] = sot
    text[row, 1:1 + length] = rng.integers(1, sot, length)
    text[row, 1 + length] = eot
  return images, text


def normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def assert_close(actual, expected):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=1e-5, atol=1e-5)


def assert_relative(actual, expected, tol=1e-5):
  """Largest deviation within `tol` of the largest reference value."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  error = np.abs(actual - expected).max() / np.abs(expected).max()
  assert error <= tol, f"relative error {error:.2e} > {tol:.0e}"


# --------------------------------------------------------------------------- open_clip parity
# As HF transformers tests its Flax ports: the reference implementation itself, random
# weights with every parameter perturbed (so LayerNorm scales are not 1, biases not 0),
# written to safetensors and read back by the project's converter.

OPEN_CLIP_MODELS = {"ViT-B-32": "gelu", "ViT-B-16-quickgelu": "quick_gelu"}
CAPTIONS = ["a photo of a cat.", "a diagram of the &amp; operator", "x" * 5]


@pytest.fixture(scope="module", params=list(OPEN_CLIP_MODELS))
def open_clip_outputs(request, tmp_path_factory):
  torch = pytest.importorskip("torch")
  open_clip = pytest.importorskip("open_clip")
  import safetensors.torch
  name = request.param
  torch.manual_seed(0)
  reference = open_clip.create_model(name, pretrained=None).eval()
  with torch.no_grad():
    for p in reference.parameters():
      p.add_(0.02 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("open_clip") / f"{name}.safetensors"
  safetensors.torch.save_file(reference.state_dict(), str(path))

  images = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
  text = open_clip.tokenize(CAPTIONS)
  with torch.no_grad():
    image_t = torch.from_numpy(images.transpose(0, 3, 1, 2))  # NCHW.
    image_features, text_features, scale = reference(image_t, text)[:3]
    expected = dict(image=reference.encode_image(image_t).numpy(),
                    text=reference.encode_text(text).numpy(),
                    logits=(scale * image_features @ text_features.T).numpy())

  cfg, params = convert.clip_from_state_dict(convert.load_state_dict(path),
                                             act=OPEN_CLIP_MODELS[name])
  model = clip.CLIP(cfg)

  @jax.jit
  def outputs(params, images, text):
    return dict(image=clip.encode_image(model, params, images),
                text=clip.encode_text(model, params, text),
                logits=model.apply({"params": params}, images, text)[0])

  return name, cfg, expected, jax.device_get(outputs(params, images, text.numpy()))


def test_open_clip_features_and_logits(open_clip_outputs):
  name, cfg, expected, actual = open_clip_outputs
  assert (cfg.patch_size, cfg.image_size, cfg.context_length) == (
      32 if name == "ViT-B-32" else 16, 224, 77)
  for key in ("image", "text", "logits"):
    assert_relative(actual[key], expected[key])


# Tricky strings: HTML entities (double-escaped too), accents, CJK, emoji, contractions,
# numbers, odd whitespace, and text longer than the 77-token context.
TRICKY_TEXTS = [
    "A photo of a CAT.", "fish &amp; chips &lt;b&gt;bold&lt;/b&gt; &amp;amp; &#39;quoted&#39;",
    "café naïve Ångström façade Ærøskøbing", "猫の写真です。 一只猫 고양이", "🐱 👍🏽 🇯🇵 ❤️",
    "it's DON'T we'll 3d-printed 2024 cat_toy!!", "  tabs\tand\nnewlines   ",
    "mojibake: cafÃ©", "a photo of a very " + "long " * 120 + "cat",
]


def test_tokenizer_matches_open_clip():
  open_clip = pytest.importorskip("open_clip")
  bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
  expected = open_clip.tokenize(TRICKY_TEXTS).numpy()  # Truncates, keeping EOT last.
  ours = zeroshot.tokenize(TRICKY_TEXTS, bpe_path=bpe, context_length=77, truncate=True)
  assert ours.dtype == np.int32
  for text, row, ref in zip(TRICKY_TEXTS, ours, expected):
    np.testing.assert_array_equal(row, ref, err_msg=repr(text))
  assert expected[-1, -1] == zeroshot._tokenizer(str(bpe)).eot_token  # Really over-long.


# --------------------------------------------------------------------------- tiny CLIP


@pytest.fixture(scope="module")
def converted():
  sd = make_state_dict()
  cfg, params = convert.clip_from_state_dict(sd, head_width=HEAD_WIDTH)
  return sd, cfg, params


def test_config_inferred_from_shapes(converted):
  _, cfg, _ = converted
  assert cfg == clip.get_config("tiny").replace(vision_mlp_dim=128, text_mlp_dim=128)


def test_safetensors_round_trip(converted, tmp_path):
  sd, cfg, params = converted
  path = tmp_path / "clip.safetensors"
  safetensors.numpy.save_file(sd, str(path))
  cfg2, params2 = convert.clip_from_state_dict(convert.load_state_dict(path),
                                               head_width=HEAD_WIDTH)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_short_text_equals_padded_text(converted):
  # The causal mask makes the EOT feature independent of what follows it.
  _, cfg, params = converted
  model = clip.CLIP(cfg)
  _, text = make_inputs(batch=2)  # Longest row ends at index 10.
  np.testing.assert_allclose(clip.encode_text(model, params, text[:, :11]),
                             clip.encode_text(model, params, text), rtol=1e-6, atol=1e-6)


def test_image_classifier(converted):
  _, cfg, params = converted
  rng = np.random.default_rng(5)
  kernel = rng.standard_normal((cfg.embed_dim, 7)).astype(np.float32)
  bias = rng.standard_normal(7).astype(np.float32)
  model = clip.CLIPImageClassifier(cfg, num_classes=7)
  cls_params = clip.classifier_params(params, kernel, bias)
  # Same tree structure as a fresh init, so the trainer can use either.
  init = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  assert jax.tree.structure(init["params"]) == jax.tree.structure(cls_params)
  images, _ = make_inputs()
  features_ref = normalize(clip.encode_image(clip.CLIP(cfg), params, images))
  assert_close(model.apply({"params": cls_params}, images, return_features=True), features_ref)
  assert_close(model.apply({"params": cls_params}, images), features_ref @ kernel + bias)
  with pytest.raises(ValueError, match="input features"):
    clip.classifier_params(params, kernel[:5])


def test_bfloat16_compute_is_close(converted):
  _, cfg, params = converted
  images, text = make_inputs()
  full = clip.encode_image(clip.CLIP(cfg), params, images)
  half = clip.encode_image(clip.CLIP(cfg, dtype=jnp.bfloat16), params, images)
  np.testing.assert_allclose(np.asarray(half, np.float32), full, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("name,params_count", [("ViT-B/32", 151_277_313),
                                               ("ViT-B/16", 149_620_737),
                                               ("ViT-L/14", 427_616_513)])
def test_named_configs_have_openai_parameter_counts(name, params_count):
  cfg = clip.get_config(name)
  shapes = jax.eval_shape(clip.CLIP(cfg).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 224, 224, 3)), jnp.zeros((1, 77), jnp.int32))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == params_count


def test_get_config_accepts_open_clip_names():
  assert clip.get_config("ViT-B-16") == clip.get_config("ViT-B/16")
  with pytest.raises(KeyError, match="unknown CLIP config"):
    clip.get_config("ViT-H/14")


def test_wrong_image_size_is_rejected(converted):
  _, cfg, params = converted
  with pytest.raises(ValueError, match="32x32"):
    clip.encode_image(clip.CLIP(cfg), params, np.zeros((1, 40, 40, 3), np.float32))


# --------------------------------------------------------------------------- zero-shot


def test_templates():
  assert len(zeroshot.IMAGENET_TEMPLATES) == 80
  assert len(set(zeroshot.IMAGENET_TEMPLATES)) == 80
  assert all(t.count("{}") == 1 for t in zeroshot.IMAGENET_TEMPLATES)
  assert zeroshot.IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
  assert zeroshot.IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."


def test_zeroshot_head_matches_numpy():
  rng = np.random.default_rng(0)
  num_templates, num_classes, length, dim = 4, 5, 6, 8
  ids = rng.integers(0, 50, (num_templates, num_classes, length))
  table = rng.standard_normal((50, dim))
  encode = lambda t: table[np.asarray(t)].sum(1)  # Any deterministic text encoder.
  kernel, bias = zeroshot.zeroshot_head(encode, ids, logit_scale=np.log(100.0))

  emb = normalize(table[ids].sum(2))  # [templates, classes, dim]
  expected = 100.0 * normalize(emb.mean(0))
  assert kernel.shape == (dim, num_classes) and kernel.dtype == np.float32
  np.testing.assert_allclose(kernel, expected.T, rtol=1e-6)
  np.testing.assert_array_equal(bias, np.zeros(num_classes))

  calls = []
  def counting_encode(t):
    calls.append(len(t))
    return encode(t)
  batched, _ = zeroshot.zeroshot_head(counting_encode, ids, logit_scale=np.log(100.0),
                                      batch_size=2)
  np.testing.assert_allclose(batched, kernel, rtol=1e-6)
  assert set(calls) == {2}  # The last chunk of 1 is padded: one shape to compile.


def test_zeroshot_head_with_clip_text_tower(converted):
  _, cfg, params = converted
  model = clip.CLIP(cfg)
  _, text = make_inputs()
  ids = np.stack([text, np.roll(text, 1, axis=0)])  # 2 "templates" x 3 "classes".
  kernel, _ = zeroshot.zeroshot_head(jax.jit(lambda t: clip.encode_text(model, params, t)),
                                     ids, logit_scale=float(params["logit_scale"]))
  per_template = np.stack([normalize(clip.encode_text(model, params, t)) for t in ids])
  expected = 100 / 7 * normalize(per_template.mean(0))
  assert_close(kernel, expected.T)


def test_zeroshot_head_rejects_bad_shapes():
  with pytest.raises(ValueError, match="num_templates"):
    zeroshot.zeroshot_head(lambda t: t, np.zeros((3, 4)), logit_scale=0.0)
  with pytest.raises(ValueError, match="encode_text_fn returned"):
    zeroshot.zeroshot_head(lambda t: np.zeros((1, 2)), np.zeros((1, 3, 4), int),
                           logit_scale=0.0)


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture()
def bpe_file(tmp_path):
  # Header line, then merges in rank order (OpenAI's file format, gzipped).
  merges = ["c a", "ca t</w>", "o f</w>", "p h", "ph o", "t o</w>", "pho to</w>"]
  path = tmp_path / "bpe.txt.gz"
  path.write_bytes(gzip.compress(("#version: 0.2\n" + "\n".join(merges) + "\n").encode()))
  return path


def test_tokenizer_encodes_with_merges(bpe_file):
  tok = zeroshot.SimpleTokenizer(bpe_file)
  assert tok.vocab_size == 512 + 7 + 2
  sot, eot = tok.sot_token, tok.eot_token
  assert (sot, eot) == (519, 520)
  byte = lambda ch: tok.encoder[ch]
  word_end = lambda ch: tok.encoder[ch + "</w>"]
  # "a" is a whole word: its only unit carries the end-of-word mark.
  expected = [word_end("a"), tok.encoder["photo</w>"], tok.encoder["of</w>"], word_end("a"),
              tok.encoder["cat</w>"], word_end(".")]
  assert tok.encode("  A   photo of a CAT. ") == expected
  assert tok.encode("cats") == [tok.encoder["ca"], byte("t"), word_end("s")]
  assert tok.decode(expected) == "a photo of a cat ."

  ids = zeroshot.tokenize(["a photo of a cat.", "cat"], bpe_path=bpe_file, context_length=8)
  assert ids.dtype == np.int32 and ids.shape == (2, 8)
  np.testing.assert_array_equal(ids[0], [sot, *expected, eot])
  np.testing.assert_array_equal(ids[1], [sot, tok.encoder["cat</w>"], eot, 0, 0, 0, 0, 0])


def test_tokenizer_length_and_missing_file(bpe_file, tmp_path):
  with pytest.raises(ValueError, match="more than context_length"):
    zeroshot.tokenize("a photo of a cat.", bpe_path=bpe_file, context_length=4)
  ids = zeroshot.tokenize("a photo of a cat.", bpe_path=bpe_file, context_length=4,
                          truncate=True)
  assert ids[0, -1] == zeroshot._tokenizer(str(bpe_file)).eot_token
  with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6"):
    zeroshot.tokenize("cat", bpe_path=tmp_path / "missing.txt.gz")


def test_tokenize_prompts_layout(bpe_file):
  ids = zeroshot.tokenize_prompts(["cat", "of"], ["a {}.", "photo {}"], bpe_path=bpe_file,
                                  context_length=6)
  assert ids.shape == (2, 2, 6)
  np.testing.assert_array_equal(
      ids[1, 0], zeroshot.tokenize("photo cat", bpe_path=bpe_file, context_length=6)[0])


def test_pre_tokenizer_pattern():
  # OpenAI's pattern: letters runs, single digits, runs of other symbols, contractions.
  assert zeroshot._TOKEN_PATTERN.findall("it's a 3d-printed cat_toy!! 2024") == [
      "it", "'s", "a", "3", "d", "-", "printed", "cat", "_", "toy", "!!", "2", "0", "2", "4"]


def test_imagenet_classnames():
  assert len(IMAGENET_CLASSNAMES) == 1000
  # Spot checks at well-known ImageNet-1k label indices.
  anchors = {0: "tench", 104: "wallaby", 151: "Chihuahua", 281: "tabby cat", 340: "zebra",
             388: "giant panda", 398: "abacus", 657: "missile", 744: "missile",
             836: "sunglasses", 837: "sunglasses", 916: "website", 999: "toilet paper"}
  assert {i: IMAGENET_CLASSNAMES[i] for i in anchors} == anchors
  assert all(name == name.strip() and name for name in IMAGENET_CLASSNAMES)
