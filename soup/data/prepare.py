"""Prepares TFDS fashion_mnist offline: `python -m soup.data.prepare [--data_dir=DIR]`."""

import argparse

from soup.data import fashion_mnist_tfds


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data_dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--idx_dir", default=str(fashion_mnist_tfds.DEBIAN_DIR))
  args = parser.parse_args(argv)
  path = fashion_mnist_tfds.prepare(args.data_dir, args.idx_dir)
  fashion_mnist_tfds.load_arrays(args.data_dir)  # Builds the in-memory cache once.
  print(f"fashion_mnist ready in {path}")


if __name__ == "__main__":
  main()
