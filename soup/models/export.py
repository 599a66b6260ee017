r"""Publishes an upstream model as a big_vision-style .npz, with its provenance.

    python -m soup.models.export --workdir=WORKDIR --out=soup/models/weights/fashion_mnist_vit.npz

reads WORKDIR/upstream/ingredient (written by the `pretrain` stage) and writes
OUT (flat 'a/b/kernel' arrays, head included; `pretrained.load_vit_backbone`
drops it) and OUT with .json: the sha256 of OUT, the config that trained it
(WORKDIR/config.json) and the command, so the file can be re-made and checked.
This is how the default experiment's pretrained start was made
(scripts/pretrain_upstream.sh): pretrained once, as CLIP was, then loaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

from soup import atomic_io, checkpoints, layout
from soup.models import convert


def sha256(path: Path) -> str:
  return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def export(workdir: Path, out: Path, command: str = "") -> dict:
  """Writes out (.npz) and out.with_suffix('.json'); returns the provenance written."""
  workdir, out = Path(workdir), Path(out)
  source = workdir / layout.UPSTREAM_INGREDIENT
  if not checkpoints.is_ingredient(source):
    raise FileNotFoundError(f"No upstream ingredient at {source}: run the pretrain stage first "
                            "(scripts/pretrain_upstream.sh).")
  flat = convert.flatten_params(checkpoints.load_ingredient(source))
  out.parent.mkdir(parents=True, exist_ok=True)
  atomic_io.atomic_write(out, lambda f: np.savez(f, **flat), binary=True)
  config = json.loads((workdir / layout.CONFIG).read_text())
  provenance = {
      "file": out.name, "sha256": sha256(out),
      "parameters": int(sum(v.size for v in flat.values())),
      "shapes": {k: list(v.shape) for k, v in sorted(flat.items())},
      "command": command,
      "config": {k: config[k] for k in ("seed", "data", "model", "upstream") if k in config},
  }
  atomic_io.atomic_write(out.with_suffix(".json"),
                       lambda f: f.write(json.dumps(provenance, indent=1) + "\n"))
  return provenance


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, type=Path)
  parser.add_argument("--out", required=True, type=Path)
  parser.add_argument("--command", default="", help="The command that made workdir (recorded).")
  args = parser.parse_args(argv)
  info = export(args.workdir, args.out, args.command)
  print(f"wrote {args.out} ({info['parameters']:,} parameters, sha256 {info['sha256'][:12]}…)")


if __name__ == "__main__":
  main()
