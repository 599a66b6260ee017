"""Load pretrained weights into this repo's Flax models.

* CLIP: OpenAI / open_clip PyTorch state dicts (``visual.conv1.weight`` ...) become the
  param tree of ``soup.models.clip.CLIP``; the architecture is read off the shapes.
* ViT: big_vision ``.npz`` checkpoints (flat ``'/'``-joined keys) become the param tree of
  ``soup.models.vit.ViT``, optionally without the head and with the position embeddings
  resized to another image size.

Files are read without ever unpickling arbitrary objects: ``.safetensors`` through
``safetensors.numpy``, ``.npz`` with ``allow_pickle=False``, and PyTorch files only through
``torch.load(..., weights_only=True)``. Every lookup goes through one place so a missing
key or a wrong shape fails with an error that names the key.
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

import numpy as np
from flax import traverse_util

from soup import trees

if TYPE_CHECKING:
  from soup.models.clip import CLIPConfig

PathLike = Union[str, os.PathLike]

# Entries of OpenAI's TorchScript state dict that are metadata, not weights.
_CLIP_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")


# --------------------------------------------------------------------------- loading


def load_state_dict(path: PathLike) -> dict[str, np.ndarray]:
  """Reads a flat ``{name: array}`` dict from ``.safetensors``, ``.npz`` or ``.pt/.pth/.bin``.

  PyTorch files need torch (imported only here) and are loaded with
  ``weights_only=True``; a training checkpoint's ``state_dict`` entry is used and a DDP
  ``module.`` prefix is removed. OpenAI's released ``ViT-*.pt`` files are TorchScript
  archives, which cannot be read safely: convert them to safetensors first.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".safetensors":
    from safetensors.numpy import load_file
    try:
      return dict(load_file(path))
    except Exception as e:  # Corrupt header, unknown dtype, truncated file ...
      raise ValueError(f"could not read safetensors file {path}: {e}") from e
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as npz:
      return {k: npz[k] for k in npz.files}
  if suffix in (".pt", ".pth", ".bin"):
    return _load_torch(path)
  raise ValueError(f"unsupported checkpoint format {suffix!r} for {path}; expected "
                   ".safetensors, .npz, .pt, .pth or .bin")


def _is_torchscript_archive(path: str) -> bool:
  # torch.jit.save writes a zip with the module's Python source under code/ and a
  # constants.pkl; torch.save's zips hold only data.pkl and data/.
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as zf:
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def _load_torch(path: str) -> dict[str, np.ndarray]:
  if _is_torchscript_archive(path):
    raise ValueError(
        f"{path} is a TorchScript archive (OpenAI's released CLIP .pt files are), which "
        "cannot be loaded without executing its code. Convert it once, on a machine with "
        "torch and open_clip: `model, _, _ = open_clip.create_model_and_transforms("
        "'ViT-B-32', pretrained='openai')`, then `safetensors.torch.save_file("
        "model.state_dict(), 'ViT-B-32.safetensors')`, and load the .safetensors file.")
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch, which is not installed; install "
                      "torch or convert the file to .safetensors elsewhere") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, Mapping) and "state_dict" in obj:  # open_clip training checkpoint.
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
  out = {}
  for key, value in obj.items():
    if key.startswith("module."):  # Saved from DistributedDataParallel.
      key = key[len("module."):]
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      if value.dtype == torch.bfloat16:  # numpy has no bfloat16.
        value = value.float()
      value = value.numpy()
    out[key] = np.asarray(value)
  return out


class _StateDictReader:
  """Looks up arrays with errors that name the key; remembers which keys were used."""

  def __init__(self, state_dict: Mapping[str, Any], what: str):
    self.state_dict = state_dict
    self.what = what
    self.used: set[str] = set()

  def __contains__(self, key):
    return key in self.state_dict

  def shape(self, key) -> tuple[int, ...]:
    return tuple(np.shape(self._get(key)))

  def _get(self, key):
    if key not in self.state_dict:
      raise KeyError(f"{self.what}: missing key {key!r}")
    return self.state_dict[key]

  def take(self, key, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 array at ``key``, which must have exactly ``shape``."""
    value = np.asarray(self._get(key))
    if value.shape != tuple(shape):
      raise ValueError(f"{self.what}: key {key!r} has shape {value.shape}, "
                       f"expected {tuple(shape)}")
    self.used.add(key)
    return value.astype(np.float32)

  def unused(self) -> list[str]:
    return sorted(set(self.state_dict) - self.used)


# --------------------------------------------------------------------------- CLIP


def _count_blocks(keys, prefix: str) -> int:
  """Number of ``{prefix}{i}.`` blocks, checking they are numbered 0..n-1."""
  pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
  ids = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
  if not ids:
    raise KeyError(f"CLIP state dict: no keys start with {prefix!r}0.")
  if ids != set(range(len(ids))):
    missing = sorted(set(range(max(ids) + 1)) - ids)
    raise KeyError(f"CLIP state dict: block(s) {missing} missing under {prefix!r}")
  return len(ids)


def _convert_layer_norm(r: _StateDictReader, prefix: str, width: int) -> dict:
  return {"scale": r.take(f"{prefix}.weight", (width,)),
          "bias": r.take(f"{prefix}.bias", (width,))}


def _convert_linear(r: _StateDictReader, prefix: str, d_in: int, d_out: int) -> dict:
  # torch.nn.Linear stores weight as [out, in]; flax Dense kernels are [in, out].
  return {"kernel": r.take(f"{prefix}.weight", (d_out, d_in)).T,
          "bias": r.take(f"{prefix}.bias", (d_out,))}


def _convert_transformer(r: _StateDictReader, prefix: str, layers: int, width: int,
                         mlp_dim: int) -> dict:
  blocks = {}
  for i in range(layers):
    p = f"{prefix}.resblocks.{i}"
    blocks[f"resblocks_{i}"] = {
        "ln_1": _convert_layer_norm(r, f"{p}.ln_1", width),
        "attn": {
            # in_proj_weight is [3 * width, width] with q, k, v stacked along dim 0,
            # which SelfAttention splits in the same order.
            "in_proj": {"kernel": r.take(f"{p}.attn.in_proj_weight", (3 * width, width)).T,
                        "bias": r.take(f"{p}.attn.in_proj_bias", (3 * width,))},
            "out_proj": _convert_linear(r, f"{p}.attn.out_proj", width, width),
        },
        "ln_2": _convert_layer_norm(r, f"{p}.ln_2", width),
        "mlp": {"c_fc": _convert_linear(r, f"{p}.mlp.c_fc", width, mlp_dim),
                "c_proj": _convert_linear(r, f"{p}.mlp.c_proj", mlp_dim, width)},
    }
  return blocks


def _heads(width: int, head_width: int, tower: str) -> int:
  if width % head_width or width < head_width:
    raise ValueError(f"{tower} width {width} is not a multiple of head_width={head_width}; "
                     "pass the head_width the model was trained with")
  return width // head_width


def clip_config_from_state_dict(state_dict: Mapping[str, Any], *, act: str = "quick_gelu",
                                head_width: int = 64,
                                text_head_width: Optional[int] = None) -> CLIPConfig:
  """Infers a ``CLIPConfig`` from the shapes in an OpenAI / open_clip ViT state dict.

  The number of attention heads is not visible in the weights, hence
  ``heads = width // head_width``. OpenAI's towers all use 64-dim heads; open_clip's
  giants do not in the image tower (ViT-bigG-14: 104, ViT-g-14: 88) while their text
  towers keep 64: pass ``text_head_width`` when it differs (default: ``head_width``).
  """
  from soup.models.clip import CLIPConfig  # Only a CLIP checkpoint needs CLIP's code.
  r = _StateDictReader(state_dict, "CLIP state dict")
  if "visual.layer1.0.conv1.weight" in r or "visual.attnpool.c_proj.weight" in r:
    raise ValueError("CLIP state dict: this is a ResNet CLIP; only ViT image towers are "
                     "supported")
  if "visual.trunk.patch_embed.proj.weight" in r:
    raise ValueError("CLIP state dict: this is an open_clip timm-tower model; only "
                     "OpenAI-style ViT image towers are supported")
  vision_width, in_channels, patch, patch_w = r.shape("visual.conv1.weight")
  if in_channels != 3 or patch != patch_w:
    raise ValueError("CLIP state dict: 'visual.conv1.weight' should be [width, 3, p, p], "
                     f"got {r.shape('visual.conv1.weight')}")
  num_pos = r.shape("visual.positional_embedding")[0]
  grid = int(round((num_pos - 1) ** 0.5))
  if grid * grid + 1 != num_pos:
    raise ValueError(f"CLIP state dict: 'visual.positional_embedding' has {num_pos} rows, "
                     "expected a square patch grid plus one class token")
  embed_dim = r.shape("visual.proj")[1]
  text_width = r.shape("ln_final.weight")[0]
  keys = list(state_dict)
  vision_layers = _count_blocks(keys, "visual.transformer.resblocks.")
  text_layers = _count_blocks(keys, "transformer.resblocks.")
  return CLIPConfig(
      embed_dim=embed_dim,
      image_size=grid * patch,
      patch_size=patch,
      vision_width=vision_width,
      vision_layers=vision_layers,
      vision_heads=_heads(vision_width, head_width, "vision"),
      context_length=r.shape("positional_embedding")[0],
      vocab_size=r.shape("token_embedding.weight")[0],
      text_width=text_width,
      text_layers=text_layers,
      text_heads=_heads(text_width, text_head_width or head_width, "text"),
      vision_mlp_dim=r.shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0],
      text_mlp_dim=r.shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
      act=act,
  )


def clip_from_state_dict(state_dict: Mapping[str, Any], *, act: str = "quick_gelu",
                         head_width: int = 64,
                         text_head_width: Optional[int] = None) -> tuple[CLIPConfig, dict]:
  """Converts an OpenAI / open_clip ViT CLIP state dict to ``(config, params)``.

  ``params`` fits ``soup.models.clip.CLIP(config)``; its ``'visual'`` subtree also fits
  ``CLIPImageClassifier``. ``act`` must match how the weights were trained (see
  ``CLIPConfig``; open_clip's LAION giants use ``"gelu"``). Every weight must be consumed:
  leftover keys mean an architecture
  variant (layer scale, attention pooling, ...) this model does not implement, and
  silently ignoring them would give wrong features, so they raise.
  """
  cfg = clip_config_from_state_dict(state_dict, act=act, head_width=head_width,
                                    text_head_width=text_head_width)
  r = _StateDictReader(state_dict, "CLIP state dict")
  vw, tw, p = cfg.vision_width, cfg.text_width, cfg.patch_size
  visual = {
      # torch conv weight [out, in, kh, kw] -> flax [kh, kw, in, out].
      "conv1": {"kernel": r.take("visual.conv1.weight", (vw, 3, p, p)).transpose(2, 3, 1, 0)},
      "class_embedding": r.take("visual.class_embedding", (vw,)),
      "positional_embedding": r.take("visual.positional_embedding",
                                     (cfg.grid_size**2 + 1, vw)),
      "ln_pre": _convert_layer_norm(r, "visual.ln_pre", vw),
      "transformer": _convert_transformer(r, "visual.transformer", cfg.vision_layers, vw,
                                          cfg.vision_mlp_dim),
      "ln_post": _convert_layer_norm(r, "visual.ln_post", vw),
      "proj": r.take("visual.proj", (vw, cfg.embed_dim)),
  }
  text = {
      "token_embedding": {"embedding": r.take("token_embedding.weight",
                                              (cfg.vocab_size, tw))},
      "positional_embedding": r.take("positional_embedding", (cfg.context_length, tw)),
      "transformer": _convert_transformer(r, "transformer", cfg.text_layers, tw,
                                          cfg.text_mlp_dim),
      "ln_final": _convert_layer_norm(r, "ln_final", tw),
      "text_projection": r.take("text_projection", (tw, cfg.embed_dim)),
  }
  # A 0-d tensor in PyTorch; accept a 1-element array too.
  logit_scale = np.asarray(r._get("logit_scale"), np.float32)
  if logit_scale.size != 1:
    raise ValueError(f"CLIP state dict: key 'logit_scale' has shape {logit_scale.shape}, "
                     "expected a scalar")
  r.used.add("logit_scale")
  leftover = [k for k in r.unused() if k not in _CLIP_METADATA_KEYS]
  if leftover:
    shown = ", ".join(leftover[:10]) + (" ..." if len(leftover) > 10 else "")
    raise ValueError(f"CLIP state dict: {len(leftover)} unexpected key(s) this model does "
                     f"not use: {shown}")
  params = {"visual": visual, "text": text, "logit_scale": logit_scale.reshape(())}
  return cfg, params


# --------------------------------------------------------------------------- big_vision ViT


def _unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict:
  prefixes = {key.rsplit(sep, 1)[0] for key in flat if sep in key}
  clash = sorted(prefixes & set(flat))
  if clash:
    raise ValueError(f"checkpoint key {clash[0]!r} is an array and a folder of others")
  return traverse_util.unflatten_dict({k: np.asarray(v) for k, v in flat.items()}, sep=sep)


def flatten_params(tree: Mapping[str, Any], sep: str = "/") -> dict[str, np.ndarray]:
  """``{'a': {'b': x}}`` -> ``{'a/b': x}`` as numpy arrays (the .npz layout)."""
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep=sep).items()}


def _natural_key(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _renumber_pre_linen(tree):
  """Pre-linen flax numbered submodules globally (``LayerNorm_0, MultiHeadDotProductAttention_1,
  LayerNorm_2, MlpBlock_3``); linen numbers them per type (``LayerNorm_0, ..._0, LayerNorm_1,
  MlpBlock_0``). Same rule as ``flax.training.checkpoints.convert_pre_linen``, and a no-op on
  linen trees. Needed for the original google-research/vision_transformer .npz files."""
  if not isinstance(tree, dict):
    return tree
  out, counts = {}, {}
  for name in sorted(tree, key=_natural_key):
    m = re.fullmatch(r"(.+)_(\d+)", name)
    new_name = name
    if m:
      module = m.group(1)
      new_name = f"{module}_{counts.get(module, 0)}"
      counts[module] = counts.get(module, 0) + 1
    out[new_name] = _renumber_pre_linen(tree[name])
  return out


def resize_pos_embedding(posemb: np.ndarray, new_grid: Union[int, tuple[int, int]],
                         num_prefix_tokens: int = 0) -> np.ndarray:
  """Resizes [1, prefix + h*w, c] position embeddings to another patch grid.

  The grid part is resampled with bilinear interpolation (``scipy.ndimage.zoom`` with
  ``order=1``, exactly as big_vision's ``resample_posemb``), which is how a ViT is
  fine-tuned at another resolution; the ``num_prefix_tokens`` leading rows (a class
  token's) are kept as they are. Returns the input unchanged when the grid matches.
  """
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f"pos_embedding must be [1, tokens, width], got {posemb.shape}")
  new_h, new_w = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  old = int(round(len(grid) ** 0.5))
  if old * old != len(grid):
    raise ValueError(f"pos_embedding has {len(grid)} grid tokens (after {num_prefix_tokens} "
                     "prefix tokens), which is not a square grid")
  if (old, old) == (new_h, new_w):
    return posemb
  import scipy.ndimage
  grid = grid.reshape(old, old, -1)
  zoomed = scipy.ndimage.zoom(grid, (new_h / old, new_w / old, 1), order=1)
  zoomed = zoomed.reshape(1, new_h * new_w, -1).astype(posemb.dtype)
  return np.concatenate([prefix, zoomed], axis=1)


def vit_from_big_vision_npz(
    path_or_dict: Union[PathLike, Mapping[str, Any]],
    *,
    drop_head: bool = False,
    drop_pre_logits: Optional[bool] = None,
    image_size: Optional[Union[int, tuple[int, int]]] = None,
    cls_in_pos_embedding: bool = False,
    reference_params: Optional[Mapping[str, Any]] = None,
) -> dict:
  """Param tree for ``soup.models.vit.ViT`` from a big_vision-style ViT ``.npz``.

  Args:
    path_or_dict: an ``.npz`` path or an already loaded flat ``{'a/b/kernel': array}``
      dict. A ``params/`` (big_vision train state) or ``opt/target/`` (old flax
      optimizer) prefix is stripped, and the original vision_transformer layout
      (``Transformer/posembed_input``, pre-linen module numbers) is renamed.
    drop_head: remove ``head``, e.g. to fine-tune on another label set.
    drop_pre_logits: remove ``pre_logits`` too; defaults to ``drop_head``.
    image_size: resize ``pos_embedding`` for this input size (int or (h, w)); the
      patch size is read from ``embedding/kernel``.
    cls_in_pos_embedding: whether the target model adds position embeddings *after*
      prepending the class token (so ``pos_embedding`` has a row for it), as the original
      vision_transformer code does. This repo's ``ViT`` follows big_vision, which adds
      them before, so its ``pos_embedding`` has no such row (the default). Converting
      between the two is exact: a zero row is prepended, or the class row is folded
      into ``cls`` (what big_vision does with old checkpoints).
    reference_params: optional tree (arrays or ``jax.ShapeDtypeStruct``, e.g. from
      ``jax.eval_shape(model.init, ...)['params']``) the result must match key-for-key
      and shape-for-shape; mismatches raise errors naming the key.
  """
  tree = _vit_tree(path_or_dict)
  if drop_pre_logits is None:
    drop_pre_logits = drop_head
  if drop_head:
    tree.pop("head", None)
  if drop_pre_logits:
    tree.pop("pre_logits", None)

  tree["pos_embedding"] = _fit_pos_embedding(tree, image_size, cls_in_pos_embedding)

  if reference_params is not None:
    check_params_match(tree, reference_params, what="ViT checkpoint")
  return tree


def _vit_tree(path_or_dict: Union[PathLike, Mapping[str, Any]]) -> dict:
  """The checkpoint as a nested tree in this repo's layout (train-state prefixes stripped, the
  original vision_transformer names renamed), with pos_embedding at the top."""
  if isinstance(path_or_dict, Mapping):
    flat = dict(path_or_dict)
  else:
    flat = load_state_dict(path_or_dict)
  if not any(k.startswith("embedding/") for k in flat):
    # A whole train state: keep only the model parameters, drop optimizer state.
    for prefix in ("params/", "opt/target/"):
      selected = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
      if selected:
        flat = selected
        break
  tree = _unflatten(flat)
  encoder = tree.get("Transformer", {})
  if "posembed_input" in encoder:
    # Original vision_transformer checkpoint. Only these get renumbered: on other trees
    # renumbering would also paper over a missing block (encoderblock_0, _2 -> _0, _1).
    tree = _renumber_pre_linen(tree)
    encoder = tree["Transformer"]
    tree["pos_embedding"] = encoder.pop("posembed_input")["pos_embedding"]
  elif "pos_embedding" in encoder:
    tree["pos_embedding"] = encoder.pop("pos_embedding")
  for key in ("embedding", "pos_embedding", "Transformer"):
    if key not in tree:
      raise KeyError(f"ViT checkpoint: missing key {key!r} (top-level keys: {sorted(tree)})")
  return tree


def _fit_pos_embedding(tree: dict, image_size, cls_in_pos_embedding: bool) -> np.ndarray:
  """pos_embedding resized for image_size, with the class row added or folded into `cls` (in
  place) to match where the target model adds it."""
  posemb = np.asarray(tree["pos_embedding"])
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f"ViT checkpoint: key 'pos_embedding' has shape {posemb.shape}, "
                     "expected [1, tokens, width]")
  tokens = posemb.shape[1]
  has_cls_row = int(round((tokens - 1) ** 0.5)) ** 2 == tokens - 1 and tokens > 1
  if has_cls_row and "cls" not in tree:
    raise ValueError(f"ViT checkpoint: 'pos_embedding' has {tokens} rows (a class-token row "
                     "plus a square grid) but there is no 'cls' parameter")
  if image_size is not None:
    kernel = tree["embedding"].get("kernel")
    if kernel is None or np.ndim(kernel) != 4:
      raise KeyError("ViT checkpoint: missing key 'embedding/kernel' of shape [p, p, 3, width]")
    ph, pw = np.shape(kernel)[:2]
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if h % ph or w % pw:
      raise ValueError(f"image_size {image_size} is not a multiple of the patch size {ph}x{pw}")
    posemb = resize_pos_embedding(posemb, (h // ph, w // pw), int(has_cls_row))
  if "cls" in tree:
    if cls_in_pos_embedding and not has_cls_row:
      posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
    elif not cls_in_pos_embedding and has_cls_row:
      tree["cls"] = np.asarray(tree["cls"]) + posemb[:, :1]
      posemb = posemb[:, 1:]
  return posemb


def check_params_match(params: Mapping[str, Any], reference: Mapping[str, Any], *,
                       what: str = "params") -> None:
  """Raises if ``params`` and ``reference`` differ in keys or leaf shapes.

  KeyError for a key missing from ``params``, ValueError for unexpected keys or a
  shape mismatch; all name the '/'-joined key (soup.trees.check_compatible).
  """
  trees.check_compatible(reference, params, "the model", what, dtypes=False)
