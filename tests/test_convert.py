"""Checkpoint loading: file formats, big_vision ViT .npz, and error messages."""

import importlib.util
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soup.models import convert, vit as vit_module
from soup.models.vit import ViT
from tests.conftest import HEAD_WIDTH, make_state_dict

VIT_KW = dict(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64)


def vit_params(seed=0, image=32, **kw):
  """A ViT and random params for it (eval_shape + numpy: no compilation, fast)."""
  model = ViT(**{**VIT_KW, "num_classes": 10, **kw})
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, image, image, 3)))["params"]
  # Random everywhere: ViT's zero-initialized cls and head would hide mix-ups.
  rng = np.random.default_rng(seed)
  return model, jax.tree.map(
      lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


# --------------------------------------------------------------------------- CLIP errors


def test_missing_key_is_named():
  sd = make_state_dict()
  del sd["visual.transformer.resblocks.1.mlp.c_proj.bias"]
  with pytest.raises(KeyError, match=r"visual\.transformer\.resblocks\.1\.mlp\.c_proj\.bias"):
    convert.clip_from_state_dict(sd, head_width=HEAD_WIDTH)


def test_bad_shape_is_named():
  sd = make_state_dict()
  sd["transformer.resblocks.0.attn.in_proj_weight"] = np.zeros((96, 31), np.float32)
  with pytest.raises(ValueError, match=r"transformer\.resblocks\.0\.attn\.in_proj_weight.*"
                                       r"\(96, 31\).*\(96, 32\)"):
    convert.clip_from_state_dict(sd, head_width=HEAD_WIDTH)


def test_unexpected_keys_are_rejected_but_metadata_ignored():
  sd = make_state_dict()
  sd.update(input_resolution=np.array(32), context_length=np.array(16),
            vocab_size=np.array(100))
  convert.clip_from_state_dict(sd, head_width=HEAD_WIDTH)  # OpenAI JIT metadata: fine.
  sd["visual.transformer.resblocks.0.ls_1.gamma"] = np.ones(32, np.float32)
  with pytest.raises(ValueError, match=r"unexpected key.*ls_1\.gamma"):
    convert.clip_from_state_dict(sd, head_width=HEAD_WIDTH)


def test_gap_in_block_numbers_is_named():
  sd = {k: v for k, v in make_state_dict(layers=3).items()
        if not k.startswith("visual.transformer.resblocks.1.")}
  with pytest.raises(KeyError, match=r"block\(s\) \[1\] missing under 'visual"):
    convert.clip_from_state_dict(sd, head_width=HEAD_WIDTH)


def test_head_width_must_divide_width():
  with pytest.raises(ValueError, match="head_width=64"):
    convert.clip_from_state_dict(make_state_dict())  # Tiny towers are only 32 wide.


def test_resnet_clip_is_rejected():
  sd = make_state_dict()
  sd["visual.layer1.0.conv1.weight"] = np.zeros((1,), np.float32)
  with pytest.raises(ValueError, match="ResNet"):
    convert.clip_from_state_dict(sd, head_width=HEAD_WIDTH)


def test_config_reads_openai_shapes():
  # Shapes only (zeros), at ViT-B/32 scale but with 2 layers to stay fast.
  sd = make_state_dict(width=768, patch=32, image=224, embed=512, text_width=512,
                       context=77, vocab=49408, layers=1, text_layers=1)
  cfg = convert.clip_config_from_state_dict(sd)
  assert (cfg.vision_width, cfg.vision_heads, cfg.patch_size, cfg.image_size) == (768, 12, 32, 224)
  assert (cfg.text_width, cfg.text_heads, cfg.context_length, cfg.vocab_size) == (512, 8, 77, 49408)
  assert (cfg.embed_dim, cfg.vision_mlp_dim, cfg.text_mlp_dim) == (512, 3072, 2048)


# --------------------------------------------------------------------------- file formats


def test_load_npz_and_unknown_suffix(tmp_path):
  sd = make_state_dict()
  np.savez(tmp_path / "clip.npz", **sd)
  loaded = convert.load_state_dict(tmp_path / "clip.npz")
  assert loaded.keys() == sd.keys()
  np.testing.assert_array_equal(loaded["visual.proj"], sd["visual.proj"])
  (tmp_path / "clip.ckpt").write_bytes(b"")
  with pytest.raises(ValueError, match="unsupported checkpoint format '.ckpt'"):
    convert.load_state_dict(tmp_path / "clip.ckpt")
  with pytest.raises(FileNotFoundError):
    convert.load_state_dict(tmp_path / "absent.safetensors")


def test_torchscript_archive_gets_a_clear_error(tmp_path):
  path = tmp_path / "ViT-B-32.pt"
  with zipfile.ZipFile(path, "w") as zf:  # The layout torch.jit.save writes.
    zf.writestr("ViT-B-32/data.pkl", b"")
    zf.writestr("ViT-B-32/constants.pkl", b"")
    zf.writestr("ViT-B-32/code/__torch__/model.py", b"")
  with pytest.raises(ValueError, match="TorchScript.*safetensors"):
    convert.load_state_dict(path)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch installed")
def test_torch_file_without_torch(tmp_path):
  path = tmp_path / "model.bin"
  path.write_bytes(b"not a zip")
  with pytest.raises(ImportError, match="needs PyTorch"):
    convert.load_state_dict(path)


# --------------------------------------------------------------------------- big_vision ViT


def test_vit_npz_round_trip(tmp_path):
  model, params = vit_params(representation_size=24)
  np.savez(tmp_path / "vit.npz", **convert.flatten_params(params))
  loaded = convert.vit_from_big_vision_npz(tmp_path / "vit.npz")
  assert_trees_equal(loaded, params)
  images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  apply = jax.jit(model.apply)
  np.testing.assert_array_equal(apply({"params": loaded}, images),
                                apply({"params": params}, images))


def test_vit_npz_prefixes_and_reference_check():
  model, params = vit_params()
  flat = {f"params/{k}": v for k, v in convert.flatten_params(params).items()}
  flat["opt/mu/head/kernel"] = np.zeros(3)  # Optimizer state in a train checkpoint.
  reference = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  loaded = convert.vit_from_big_vision_npz(flat, reference_params=reference["params"])
  assert_trees_equal(loaded, params)


def test_vit_drop_head():
  model, params = vit_params(representation_size=24)
  loaded = convert.vit_from_big_vision_npz(convert.flatten_params(params), drop_head=True)
  assert "head" not in loaded and "pre_logits" not in loaded
  kept = convert.vit_from_big_vision_npz(convert.flatten_params(params), drop_head=True,
                                         drop_pre_logits=False)
  assert "head" not in kept and "pre_logits" in kept
  # The headless tree fits a model with another label set once a head is added.
  new_model = ViT(**VIT_KW, num_classes=3, representation_size=24)
  new_head = {"kernel": np.zeros((24, 3), np.float32), "bias": np.zeros(3, np.float32)}
  logits = jax.jit(new_model.apply)({"params": {**kept, "head": new_head}},
                                    np.zeros((1, 32, 32, 3)))
  assert logits.shape == (1, 3)


def test_vit_pos_embedding_resize():
  _, params = vit_params()
  flat = convert.flatten_params(params)
  same = convert.vit_from_big_vision_npz(flat, image_size=32)
  np.testing.assert_array_equal(same["pos_embedding"], params["pos_embedding"])

  bigger = convert.vit_from_big_vision_npz(flat, image_size=48)  # 4x4 -> 6x6 patches.
  assert bigger["pos_embedding"].shape == (1, 6 * 6, 32)
  # Align-corners bilinear: the grid's corner rows are kept.
  np.testing.assert_array_equal(bigger["pos_embedding"][:, 0], params["pos_embedding"][:, 0])
  np.testing.assert_array_equal(bigger["pos_embedding"][:, -1], params["pos_embedding"][:, -1])
  model = ViT(**VIT_KW, num_classes=10)
  assert jax.jit(model.apply)({"params": bigger}, np.zeros((2, 48, 48, 3))).shape == (2, 10)


def test_resize_is_bilinear():
  # Bilinear resampling that maps corners to corners keeps a linear ramp linear.
  old, new = 4, 7
  i, j = np.meshgrid(np.arange(old), np.arange(old), indexing="ij")
  ramp = np.stack([i, j, 2 * i - j + 1], -1).reshape(1, old * old, 3).astype(np.float64)
  cls = np.full((1, 1, 3), 9.0)
  out = convert.resize_pos_embedding(np.concatenate([cls, ramp], 1), new, num_prefix_tokens=1)
  ni, nj = np.meshgrid(np.arange(new), np.arange(new), indexing="ij")
  si, sj = ni * (old - 1) / (new - 1), nj * (old - 1) / (new - 1)
  expected = np.stack([si, sj, 2 * si - sj + 1], -1).reshape(1, new * new, 3)
  np.testing.assert_allclose(out[:, 1:], expected, atol=1e-12)
  np.testing.assert_array_equal(out[:, :1], cls)
  assert convert.resize_pos_embedding(ramp, (2, 3)).shape == (1, 6, 3)


def test_class_token_row_layouts():
  # This repo's ViT follows big_vision: position embeddings for the patches only,
  # then [cls]. A checkpoint with a [cls] row (original vision_transformer layout)
  # has that row folded into cls, which computes the same thing.
  _, params = vit_params()
  flat = convert.flatten_params(params)
  assert flat["pos_embedding"].shape == (1, 16, 32)
  cls_row = np.random.default_rng(0).normal(size=(1, 1, 32)).astype(np.float32)
  with_row = {**flat, "pos_embedding": np.concatenate([cls_row, flat["pos_embedding"]], 1)}
  folded = convert.vit_from_big_vision_npz(with_row)
  np.testing.assert_array_equal(folded["pos_embedding"], params["pos_embedding"])
  np.testing.assert_allclose(folded["cls"], params["cls"] + cls_row)
  # And the other way, for a model that adds them after [cls]: a zero row.
  padded = convert.vit_from_big_vision_npz(flat, cls_in_pos_embedding=True)
  assert padded["pos_embedding"].shape == (1, 17, 32)
  np.testing.assert_array_equal(padded["pos_embedding"][:, 0], 0)
  np.testing.assert_array_equal(padded["pos_embedding"][:, 1:], flat["pos_embedding"])


def test_original_vision_transformer_names():
  # google-research/vision_transformer .npz files: pre-linen module numbers and
  # Transformer/posembed_input/pos_embedding.
  _, params = vit_params()
  assert_trees_equal(convert.vit_from_big_vision_npz(augreg_layout(params)), params)


# --------------------------------------------------------------------------- timm parity
# timm's own reader of Google's ViT .npz files (VisionTransformer.load_pretrained, i.e.
# vision_transformer._load_weights) is the reference: it reads the project's npz
# (big_vision layout) and the original AugReg layout, and the logits must agree.

TIMM_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_tanh"}


def timm_vit(no_embed_class, activation):
  timm_vit_module = pytest.importorskip("timm.models.vision_transformer")
  return timm_vit_module.VisionTransformer(
      img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
      num_classes=10, no_embed_class=no_embed_class, act_layer=TIMM_ACT[activation]).eval()


def timm_logits(model, images):
  import torch
  with torch.no_grad():
    return model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()  # NCHW.


def augreg_layout(params, cls_row=None):
  """The original vision_transformer (AugReg) npz: pre-linen module numbers and
  Transformer/posembed_input/pos_embedding, with a [cls] row at its front if given."""
  renames = {"/LayerNorm_1/": "/LayerNorm_2/",
             "/MultiHeadDotProductAttention_0/": "/MultiHeadDotProductAttention_1/",
             "/MlpBlock_0/": "/MlpBlock_3/"}
  flat = {}
  for key, value in convert.flatten_params(params).items():
    for new_name, old_name in renames.items():
      key = key.replace(new_name, old_name)
    if key == "pos_embedding":
      key = "Transformer/posembed_input/pos_embedding"
      if cls_row is not None:
        value = np.concatenate([cls_row, value], axis=1)
    flat[key] = value
  return flat


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
def test_timm_reads_the_project_npz_to_the_same_logits(tmp_path, activation):
  model, params = vit_params(activation=activation)
  np.savez(tmp_path / "vit.npz", **convert.flatten_params(params))
  reference = timm_vit(no_embed_class=True, activation=activation)  # big_vision's layout.
  reference.load_pretrained(str(tmp_path / "vit.npz"))
  images = np.random.default_rng(1).standard_normal((3, 32, 32, 3)).astype(np.float32)
  expected = timm_logits(reference, images)
  loaded = convert.vit_from_big_vision_npz(tmp_path / "vit.npz")
  np.testing.assert_allclose(model.apply({"params": loaded}, images), expected,
                             rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_timm_reads_the_augreg_layout_to_the_same_logits(tmp_path):
  model, params = vit_params(seed=2, activation="gelu_tanh")
  # LayerNorm scales near 1 (not 0.1): MLP inputs of order 1, where the GELU forms differ.
  params = convert.vit_from_big_vision_npz({
      k: v + 1 if k.endswith("/scale") else v for k, v in convert.flatten_params(params).items()})
  cls_row = np.random.default_rng(3).normal(size=(1, 1, 32)).astype(np.float32) * 0.1
  np.savez(tmp_path / "augreg.npz", **augreg_layout(params, cls_row))
  reference = timm_vit(no_embed_class=False, activation="gelu_tanh")
  reference.load_pretrained(str(tmp_path / "augreg.npz"))
  images = np.random.default_rng(4).standard_normal((3, 32, 32, 3)).astype(np.float32)
  expected = timm_logits(reference, images)
  loaded = convert.vit_from_big_vision_npz(tmp_path / "augreg.npz")  # [cls] row folded.
  actual = model.apply({"params": loaded}, images)
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  # The activation matters at this precision: exact GELU misses big_vision's tanh form.
  exact = ViT(**{**VIT_KW, "num_classes": 10, "activation": "gelu"}).apply(
      {"params": loaded}, images)
  assert np.abs(exact - expected).max() > 10 * 1e-5 * np.abs(expected).max()


def test_vit_activation_switch():
  model, params = vit_params()
  x = np.random.default_rng(5).standard_normal((2, 32, 32, 3)).astype(np.float32)
  tanh = ViT(**{**VIT_KW, "num_classes": 10, "activation": "gelu_tanh"})
  assert not np.allclose(model.apply({"params": params}, x), tanh.apply({"params": params}, x))
  np.testing.assert_allclose(vit_module.ACTIVATIONS["gelu_tanh"](x[0, 0]),
                             0.5 * x[0, 0] * (1 + np.tanh(np.sqrt(2 / np.pi)
                                                          * (x[0, 0] + 0.044715 * x[0, 0] ** 3))),
                             rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="activation must be one of"):
    ViT(**{**VIT_KW, "num_classes": 10, "activation": "relu"}).init(jax.random.PRNGKey(0), x)


def test_vit_errors_name_the_key():
  model, params = vit_params()
  flat = convert.flatten_params(params)
  reference = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                             jnp.zeros((1, 32, 32, 3)))["params"]
  missing = {k: v for k, v in flat.items() if k != "Transformer/encoder_norm/scale"}
  with pytest.raises(KeyError, match="Transformer/encoder_norm/scale"):
    convert.vit_from_big_vision_npz(missing, reference_params=reference)
  bad = {**flat, "head/kernel": np.zeros((32, 11), np.float32)}
  with pytest.raises(ValueError, match=r"'head/kernel' has shape \(32, 11\), expected \(32, 10\)"):
    convert.vit_from_big_vision_npz(bad, reference_params=reference)
  extra = {**flat, "Transformer/encoderblock_9/LayerNorm_0/scale": np.zeros(32)}
  with pytest.raises(ValueError, match="unexpected key.*encoderblock_9"):
    convert.vit_from_big_vision_npz(extra, reference_params=reference)
  no_embedding = {k: v for k, v in flat.items() if not k.startswith("embedding/")}
  with pytest.raises(KeyError, match="'embedding'"):
    convert.vit_from_big_vision_npz(no_embedding)
  with pytest.raises(ValueError, match="not a multiple of the patch size"):
    convert.vit_from_big_vision_npz(flat, image_size=36)


def test_conv_stem_adds_only_its_own_params_and_is_used():
  """stem_channels > 0 (the Fashion-MNIST hybrid) adds stem/{kernel,bias} and nothing else;
  the plain ViT's tree, which the converters target, is unchanged without it."""
  kwargs = dict(num_classes=3, patch_size=7, width=16, depth=1, num_heads=2, mlp_dim=32)
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
  plain = ViT(**kwargs).init(jax.random.key(1), x)["params"]
  hybrid_model = ViT(stem_channels=4, **kwargs)
  hybrid = hybrid_model.init(jax.random.key(1), x)["params"]
  assert set(hybrid) - set(plain) == {"stem"}
  assert hybrid["stem"]["kernel"].shape == (3, 3, 1, 4)
  assert hybrid["embedding"]["kernel"].shape == (7, 7, 4, 16)
  features = lambda p: hybrid_model.apply({"params": p}, x, return_features=True)
  moved = jax.tree.map(lambda a: a, hybrid)
  moved["stem"] = {"kernel": hybrid["stem"]["kernel"] * 2, "bias": hybrid["stem"]["bias"] + 1}
  assert not np.allclose(features(hybrid), features(moved))
