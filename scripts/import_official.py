#!/usr/bin/env python
r"""Imports the paper's released checkpoints (model_0.pt ... model_71.pt) into a workdir.

  python scripts/import_official.py --dir=~/model-soups-v0.0.2 --workdir=workdirs/clip_released
  python -m soup.main --config=configs/clip_vit_b32_imagenet.py:released \
      --workdir=workdirs/clip_released                    # evaluate, soups, report
  python -m soup.compare_official --workdir=workdirs/clip_released

Each file is read with torch.load(weights_only=True), its image tower and head converted, its
text keys dropped (named in the output), and saved as the Orbax ingredient
models/model_<k>/ingredient with the file's sha256 (soup/models/official.py). Rerunning skips
what is imported and verified, so a folder still downloading can be imported in parts.

--config defaults to configs/clip_vit_b32_imagenet.py:released; give soup.main the same config
and overrides (--config.data.heldout_file=... etc.): the workdir refuses another config.
Exit status: 0 every model imported; 1 some file is bad or missing (the rest is imported, the
bad ones are named with the reason, nothing of them is written); 2 a user error (no such
folder, a workdir of another config, a bad config).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import configs  # noqa: E402

DEFAULT_CONFIG = f"{ROOT / 'configs' / 'clip_vit_b32_imagenet.py'}:released"
_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Config the workdir is for (soup.main must get the same).",
    lock_config=True)
_DIR = flags.DEFINE_string("dir", None, "Folder holding the released model_<k>.pt files.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir to import into (created if needed).")
flags.mark_flags_as_required(["dir", "workdir"])
USAGE_ERROR = 2


def fail(message) -> None:
  print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
  sys.exit(USAGE_ERROR)


def main(argv) -> int:
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  from soup import validate
  from soup.models import official
  from soup.workdir import WorkdirMismatchError
  config = _CONFIG.value
  module = configs.module_of(flags.FLAGS["config"].config_filename.split(":")[0])
  try:
    validate.check(config, module.get_sweep, (), Path(_WORKDIR.value))
    summary = official.import_released(_DIR.value, _WORKDIR.value, config, module.get_sweep)
  except (validate.ConfigError, official.ReleasedCheckpointError, WorkdirMismatchError) as e:
    fail(e)
  print(summary.text())
  return 0 if summary.ok else 1


if __name__ == "__main__":
  app.run(main)
