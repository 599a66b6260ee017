#!/usr/bin/env python
"""Makes the ImageNet held-out list (ImageNet2p) from the prepared TFDS imagenet2012.

  python scripts/make_imagenet_heldout.py --data_dir=$TFDS_DATA_DIR \
      --official_mask=imagenet_98_idxs.npy     # The paper's own split (recommended).
  python scripts/make_imagenet_heldout.py --data_dir=$TFDS_DATA_DIR   # Seeded, ours.

Reads the 1,281,167 train labels (and, with --official_mask, file names; images
skipped; a few minutes, I/O bound). --official_mask maps the official mask
(imagenet_98_idxs.npy from github.com/mlfoundations/model-soups, one 0/1 value
per image in ImageFolder order, 1 = held out) onto TFDS indices through each
record's file_name; without it, 26 images per class are picked by the seeded
procedure. Either way (see soup/data/imagenet_heldout.py) it writes
soup/data/imagenet2012_heldout.npz, recording which list it is. Commit that
file: every run, machine and sweep member then holds out the same 26,000
images. Refuses to overwrite a different existing list unless --force.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soup.data import imagenet_heldout, tfds_source  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data_dir holding imagenet2012 "
                           "(default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--out", default=str(imagenet_heldout.DEFAULT_FILE))
  parser.add_argument("--per_class", type=int, default=imagenet_heldout.PER_CLASS)
  parser.add_argument("--seed", type=int, default=imagenet_heldout.SEED)
  parser.add_argument("--official_mask", default="",
                      help="the official imagenet_98_idxs.npy; its held-out images are used "
                           "(its count per class, 26, replaces --per_class)")
  parser.add_argument("--force", action="store_true", help="overwrite a different existing list")
  args = parser.parse_args(argv)
  data_dir = args.data_dir or tfds_source.default_data_dir()
  if args.official_mask and not Path(args.official_mask).is_file():
    print(f"--official_mask={args.official_mask} is not a file; download imagenet_98_idxs.npy "
          "from https://github.com/mlfoundations/model-soups.", file=sys.stderr)
    return 1
  out = Path(args.out)
  previous = imagenet_heldout.load(out) if out.exists() else None
  tmp = out.with_name(out.name + ".new.npz")
  try:
    held = imagenet_heldout.make_from_tfds(data_dir, tmp, args.per_class, args.seed,
                                           official_mask=args.official_mask or None)
  except (tfds_source.DatasetMissingError, imagenet_heldout.HeldOutError) as e:
    print(e, file=sys.stderr)
    return 1
  if previous is not None and not args.force and not (
      previous.indices.shape == held.indices.shape and (previous.indices == held.indices).all()):
    tmp.unlink()
    print(f"{out} exists and differs from the list made now (other data or seed); "
          "pass --force to replace it.", file=sys.stderr)
    return 1
  tmp.replace(out)
  made = "the official mask" if held.source == "official" else f"seed {held.seed}"
  print(f"{out}: {len(held.indices)} held-out images ({held.per_class} per class, {held.source}: "
        f"{made}) of {held.num_train} in TFDS imagenet2012 {held.tfds_version}; "
        f"{held.num_train - len(held.indices)} left for fine-tuning.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
