"""The paper's 72 released CLIP ViT-B/32 fine-tunes, imported as this project's ingredients.

The model-soups release v0.0.2 ships `model_0.pt` ... `model_71.pt` (model_0 is the linear-probe
initialization). Each is a plain `torch.save` of the state dict of the official `ModelWrapper`
(model-soups d5398f1, utils.py), so `torch.load(weights_only=True)` reads it:

  model.<OpenAI CLIP ViT-B/32 keys>   the image tower `model.visual.*`, plus what ModelWrapper
                                      keeps of the text side (it deletes `model.transformer`):
                                      TEXT_KEYS below
  classification_head.weight [1000, 512], classification_head.bias [1000]

and its forward pass is `head(normalize(encode_image(x)))`, which is `CLIPImageClassifier`.
`import_released` turns a folder of them into `models/model_<k>/ingredient` of a workdir (with
the file's sha256 as provenance), so that the experiment's evaluate, soups and report stages
run on them unchanged (configs/clip_vit_b32_imagenet.py:released). Every key of a file is either
converted or one of TEXT_KEYS, which are dropped by name; anything else is an error, and a bad
file writes nothing. `scripts/import_official.py` is the command.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from soup import atomic_io, checkpoints
from soup.layout import IMPORT, INITIALIZATION, member_name, member_names
from soup.models import convert
from soup.models.clip import CLIPConfig
from soup.recipes import Name

RELEASE = "model-soups v0.0.2"
FILE_NAME = re.compile(r"model_(\d+)\.pt")
WRAPPER_PREFIX = "model."
HEAD_WEIGHT, HEAD_BIAS = "classification_head.weight", "classification_head.bias"
# What ModelWrapper keeps of CLIP's text side; an image classifier never reads it.
TEXT_KEYS = tuple(WRAPPER_PREFIX + k for k in (
    "token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
    "text_projection", "logit_scale"))
IMPORT_FILE = IMPORT  # In the workdir: what the last import did, file by file.


class ReleasedCheckpointError(ValueError):
  """A file or folder is not what the release holds; the message names it and the fix."""


# --- One file ----------------------------------------------------------------------------


def sha256_of(path: str | os.PathLike) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The flat {key: array} a released file holds, read with weights_only=True (no code runs)."""
  import torch
  path = Path(path)
  name = path.name
  if convert._is_torchscript_archive(str(path)):
    raise ReleasedCheckpointError(
        f"{name} is a TorchScript archive: reading it would run the code inside it. The "
        "released checkpoints are plain state dicts; re-download the file.")
  try:
    # mmap: tensors are read from the file as the conversion touches them (zip format only,
    # which every torch.save since PyTorch 1.6 writes).
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
  except pickle.UnpicklingError as e:
    code = re.search(r"GLOBAL (\S+)", str(e))
    if code:
      raise ReleasedCheckpointError(
          f"{name} needs unpickling of Python code ({code.group(1)}), which weights_only=True "
          "refuses. The released checkpoints are plain state dicts of tensors; this file is not "
          "one: re-download it, and never load it with weights_only=False.") from e
    raise ReleasedCheckpointError(f"{name} is corrupted ({_last_line(e)}); re-download it.") from e
  except (RuntimeError, OSError, EOFError, ValueError) as e:
    raise ReleasedCheckpointError(
        f"{name} is truncated or not a torch.save file ({path.stat().st_size:,} bytes; "
        f"{_first_line(e)}); re-download it (an interrupted download leaves such a file).") from e
  if not isinstance(obj, Mapping):
    raise ReleasedCheckpointError(f"{name} holds a {type(obj).__name__}, not a state dict.")
  out = {}
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise ReleasedCheckpointError(f"{name}: key {key!r} holds a {type(value).__name__}, not a "
                                    "tensor; this is not a released checkpoint.")
    if value.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly.
      value = value.float()
    out[str(key)] = value.numpy()
  return out


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _last_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]


def convert_checkpoint(state_dict: Mapping[str, Any], cfg: CLIPConfig, num_classes: int,
                       what: str) -> tuple[dict, list[str]]:
  """(CLIPImageClassifier params, the dropped keys) of a released state dict.

  Shapes come from `cfg` (the configured model), so a missing or misshapen key fails here with
  its name; every key must be converted or be one of TEXT_KEYS.
  """
  sd = dict(state_dict)
  missing_text = [k for k in TEXT_KEYS if k not in sd]
  if missing_text:
    raise ReleasedCheckpointError(f"{what}: missing key {missing_text[0]!r} (the released "
                                  "layout keeps it); this is not a released checkpoint.")
  r = convert._StateDictReader(sd, what)
  try:
    visual = _convert_image_tower(r, cfg, WRAPPER_PREFIX + "visual")
    weight_shape = r.shape(HEAD_WEIGHT)
    if len(weight_shape) != 2 or weight_shape[0] != num_classes:
      raise ReleasedCheckpointError(
          f"{what}: {HEAD_WEIGHT} is {list(weight_shape)}, a head for "
          f"{weight_shape[0] if weight_shape else '?'} classes; this experiment's model has "
          f"{num_classes} ([{num_classes}, {cfg.embed_dim}]). It is not a fine-tune of this task.")
    head = convert._convert_linear(r, "classification_head", cfg.embed_dim, num_classes)
  except ReleasedCheckpointError:
    raise
  except (KeyError, ValueError) as e:  # convert's reader: the message names the key.
    raise ReleasedCheckpointError(str(e.args[0] if e.args else e)) from e
  unexpected = [k for k in r.unused() if k not in TEXT_KEYS]
  if unexpected:
    shown = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
    raise ReleasedCheckpointError(
        f"{what}: {len(unexpected)} unexpected key(s) the released layout does not have: {shown}. "
        "Another architecture or a full CLIP (with its text transformer) is not a released "
        "fine-tune.")
  return {"visual": visual, "head": head}, sorted(r.unused())


def _convert_image_tower(r, cfg: CLIPConfig, prefix: str) -> dict:
  """The image tower under `prefix` (OpenAI layout, as soup.models.convert reads it)."""
  vw, p = cfg.vision_width, cfg.patch_size
  return {
      # torch conv weight [out, in, kh, kw] -> flax [kh, kw, in, out].
      "conv1": {"kernel": r.take(f"{prefix}.conv1.weight", (vw, 3, p, p)).transpose(2, 3, 1, 0)},
      "class_embedding": r.take(f"{prefix}.class_embedding", (vw,)),
      "positional_embedding": r.take(f"{prefix}.positional_embedding", (cfg.grid_size**2 + 1, vw)),
      "ln_pre": convert._convert_layer_norm(r, f"{prefix}.ln_pre", vw),
      "transformer": convert._convert_transformer(r, f"{prefix}.transformer", cfg.vision_layers,
                                                  vw, cfg.vision_mlp_dim or 4 * vw),
      "ln_post": convert._convert_layer_norm(r, f"{prefix}.ln_post", vw),
      "proj": r.take(f"{prefix}.proj", (vw, cfg.embed_dim)),
  }


def stored_dtypes(state_dict: Mapping[str, np.ndarray]) -> list[str]:
  return sorted({str(np.asarray(v).dtype) for v in state_dict.values()})


# --- A folder --------------------------------------------------------------------------


@dataclasses.dataclass
class ImportSummary:
  """What one import did. `ok`: every expected file is imported (now or before)."""

  expected: list[str]
  imported: list[str] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)   # Already imported and verified.
  failed: dict[str, str] = dataclasses.field(default_factory=dict)  # File name -> reason.
  missing: list[str] = dataclasses.field(default_factory=list)   # Expected, no file.
  ignored: list[str] = dataclasses.field(default_factory=list)   # Not named model_<k>.pt.
  dropped_keys: list[str] = dataclasses.field(default_factory=list)
  files: dict[str, dict] = dataclasses.field(default_factory=dict)  # Model -> source provenance.

  @property
  def ok(self) -> bool:
    return not self.failed and not self.missing

  def text(self) -> str:
    lines = [f"imported {len(self.imported)}, already imported and verified {len(self.skipped)}, "
             f"failed {len(self.failed)}, missing {len(self.missing)} "
             f"(of {len(self.expected)}: {INITIALIZATION}..{member_name(len(self.expected) - 1)})"]
    if self.dropped_keys:
      lines.append(f"dropped from every file (text side, unused by the image classifier): "
                   f"{', '.join(self.dropped_keys)}")
    lines += [f"FAILED {name}: {reason}" for name, reason in self.failed.items()]
    if self.missing:
      lines.append(f"MISSING (no file): {', '.join(f'{n}.pt' for n in self.missing)}; download "
                   "them into the folder and rerun: what is imported is kept.")
    if self.ignored:
      lines.append(f"ignored (not named model_<k>.pt): {', '.join(self.ignored)}")
    return "\n".join(lines)


def expected_shapes(cfg: CLIPConfig, num_classes: int):
  import jax
  import jax.numpy as jnp

  from soup.models.clip import CLIPImageClassifier
  model = CLIPImageClassifier(config=cfg, num_classes=num_classes)
  x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def _already_imported(target: Path, sha256: str) -> bool:
  """An ingredient made from exactly this file whose bytes still match their fingerprints."""
  if not checkpoints.is_ingredient(target):
    return False
  try:
    meta = checkpoints.ingredient_metadata(target)["metadata"]
    if meta.get("source", {}).get("sha256") != sha256:
      return False
    checkpoints.load_ingredient(target, verify=True)
  except checkpoints.CheckpointError:
    return False
  return True


def import_released(folder: str | os.PathLike, workdir: str | os.PathLike, config,
                    sweep_fn: Callable[[Any], list[dict]],
                    log: Callable[[str], None] = print) -> ImportSummary:
  """Imports the folder's model_<k>.pt into `workdir` as config's models; resumable.

  The workdir is set up as soup.main would (config guard, frozen sweep), so
  `python -m soup.main --config=<the same config> --workdir=W` runs evaluate, soups and report
  on it. A file already imported and verified is skipped; a bad file is named with the reason
  and nothing of it is written; missing numbers are named, and the rest is imported.
  """
  from soup.data.imagenet import NUM_CLASSES
  from soup.models import pretrained
  from soup.workdir import Workdir
  folder = Path(folder).expanduser()
  if not folder.is_dir():
    raise ReleasedCheckpointError(f"--dir={folder}: no such folder. Download the release's "
                                  "model_<k>.pt files into it first (README).")
  if config.model.name != "clip":
    raise ReleasedCheckpointError(f"the released checkpoints are CLIP models; config.model.name "
                                  f"is {config.model.name!r}.")
  cfg = pretrained.clip_config(config.model)
  wd = Workdir(workdir)
  wd.check_config(config)
  members = wd.freeze_sweep(sweep_fn(config))
  names = [INITIALIZATION, *member_names(len(members))]
  summary = ImportSummary(expected=names)
  files = {}
  for entry in sorted(folder.iterdir()):
    match = FILE_NAME.fullmatch(entry.name)
    if match is None or not entry.is_file():
      summary.ignored.append(entry.name)
      continue
    name = member_name(int(match.group(1)))
    if name not in names:
      summary.failed[entry.name] = (f"not one of the {len(names)} models this config expects "
                                    f"({INITIALIZATION}..{member_name(len(names) - 1)}); "
                                    "not imported.")
    elif name in files:
      summary.failed[entry.name] = f"a second file for {name} (also {files[name].name})."
    else:
      files[name] = entry
  summary.missing = [n for n in names if n not in files]
  shapes = expected_shapes(cfg, NUM_CLASSES)
  for k, name in enumerate(names):
    if name not in files:
      continue
    path = files[name]
    sha256 = sha256_of(path)
    source = {"file": str(path.absolute()), "name": path.name, "bytes": path.stat().st_size,
              "sha256": sha256, "release": RELEASE}
    target = wd.ingredient_dir(name)
    if _already_imported(target, sha256):
      summary.skipped.append(name)
      summary.files[name] = checkpoints.ingredient_metadata(target)["metadata"]["source"]
      continue
    try:
      state_dict = read_checkpoint(path)
      params, dropped = convert_checkpoint(state_dict, cfg, NUM_CLASSES, path.name)
      convert.check_params_match(params, shapes, what=path.name)
    except (ReleasedCheckpointError, KeyError, ValueError) as e:
      summary.failed[path.name] = str(e.args[0] if e.args else e)
      log(f"FAILED {path.name}: {summary.failed[path.name]}")
      continue
    source["dtype"] = ",".join(stored_dtypes(state_dict))
    del state_dict
    metadata = {"recipe": Name.INITIALIZATION if k == 0 else Name.INDIVIDUAL,
                "info": f"released {'LP initialization' if k == 0 else 'fine-tune'} ({RELEASE})",
                "source": source, "dropped_keys": dropped,
                **({"hparams": members[k - 1]} if k else {})}
    # ingredient.json is written last: a kill mid-save leaves no ingredient, redone on rerun.
    checkpoints.save_ingredient(target, params, metadata)
    summary.imported.append(name)
    summary.files[name] = source
    summary.dropped_keys = sorted(set(summary.dropped_keys) | set(dropped))
    log(f"imported {path.name} -> {target} (sha256 {sha256[:12]}, dropped {len(dropped)} "
        "text keys)")
  atomic_io.atomic_write_text(wd.root / IMPORT_FILE, json.dumps(
      {"release": RELEASE, "folder": str(folder.absolute()), "ok": summary.ok,
       **dataclasses.asdict(summary)}, indent=1))
  return summary


def released_state_dict(clip_state_dict: Mapping[str, Any], head_weight, head_bias) -> dict:
  """What a released file holds, from an OpenAI-layout CLIP state dict and a [classes, embed]
  head: ModelWrapper's keys, its text transformer deleted. For tests and benchmarks."""
  out = {WRAPPER_PREFIX + k: v for k, v in clip_state_dict.items()
         if not k.startswith("transformer.")}
  out.update({HEAD_WEIGHT: head_weight, HEAD_BIAS: head_bias})
  return out
