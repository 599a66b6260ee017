#!/usr/bin/env python
"""Makes the ImageNet held-out list (ImageNet2p) from the prepared TFDS imagenet2012.

  python scripts/make_imagenet_heldout.py --data_dir=$TFDS_DATA_DIR

Reads the 1,281,167 train labels (images skipped; a few minutes, I/O bound),
picks 26 images per class by the seeded procedure of
soup/data/imagenet_heldout.py and writes soup/data/imagenet2012_heldout.npz.
Commit that file: every run, machine and sweep member then holds out the same
26,000 images. Refuses to overwrite a different existing list unless --force.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soup.data import imagenet, imagenet_heldout  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data_dir holding imagenet2012 "
                           "(default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--out", default=str(imagenet_heldout.DEFAULT_FILE))
  parser.add_argument("--per_class", type=int, default=imagenet_heldout.PER_CLASS)
  parser.add_argument("--seed", type=int, default=imagenet_heldout.SEED)
  parser.add_argument("--force", action="store_true", help="overwrite a different existing list")
  args = parser.parse_args(argv)
  data_dir = args.data_dir or imagenet.default_data_dir()
  out = Path(args.out)
  previous = imagenet_heldout.load(out) if out.exists() else None
  tmp = out.with_name(out.name + ".new.npz")
  try:
    held = imagenet_heldout.make_from_tfds(data_dir, tmp, args.per_class, args.seed)
  except (imagenet.DatasetMissingError, imagenet_heldout.HeldOutError) as e:
    print(e, file=sys.stderr)
    return 1
  if previous is not None and not args.force and not (
      previous.indices.shape == held.indices.shape and (previous.indices == held.indices).all()):
    tmp.unlink()
    print(f"{out} exists and differs from the list made now (other data or seed); "
          "pass --force to replace it.", file=sys.stderr)
    return 1
  tmp.replace(out)
  print(f"{out}: {len(held.indices)} held-out images ({held.per_class} per class, seed {held.seed}) "
        f"of {held.num_train} in TFDS imagenet2012 {held.tfds_version}; "
        f"{held.num_train - len(held.indices)} left for fine-tuning.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
