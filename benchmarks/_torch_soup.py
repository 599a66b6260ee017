"""The official code's uniform soup, timed; runs under a separate venv with torch.

Not part of the soup package and never imported by it: benchmarks/averaging.py
runs it from the repository root as `TORCH_PYTHON -m benchmarks._torch_soup MODE JSON`
and reads the JSON object it prints last. Only torch and numpy are needed (and
benchmarks.common, which uses the standard library only).

Modes:
  convert {"pairs": [[npz, pt], ...]}  .npz state dicts -> torch.save'd .pt files.
  soup {"paths": [...], "repeats": R, "cold": bool}
      The loop of mlfoundations/model-soups main.py (uniform soup):
        state_dict = torch.load(model_path)
        uniform_soup = {k: v * (1./N) + uniform_soup[k] ...}
"""

from __future__ import annotations

import json
import os
import sys
import time

from benchmarks import common


def official_uniform_soup(torch, model_paths):
  num_models = len(model_paths)
  for j, model_path in enumerate(model_paths):
    state_dict = torch.load(model_path)
    if j == 0:
      uniform_soup = {k: v * (1. / num_models) for k, v in state_dict.items()}
    else:
      uniform_soup = {k: v * (1. / num_models) + uniform_soup[k] for k, v in state_dict.items()}
  return uniform_soup


def main():
  if len(sys.argv) != 3 or sys.argv[1] not in ("convert", "soup"):
    print(__doc__)
    sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
  mode, args = sys.argv[1], json.loads(sys.argv[2])
  import numpy as np
  import torch
  if mode == "convert":
    for npz, pt in args["pairs"]:
      with np.load(npz) as z:
        torch.save({k: torch.from_numpy(np.ascontiguousarray(z[k])) for k in z.files}, pt)
      os.remove(npz)
    print(json.dumps({"converted": len(args["pairs"])}))
    return
  assert mode == "soup", mode
  paths = args["paths"]
  rss_base, _ = common.rss_mib()
  times, peaks, checksum = [], [], None
  for _ in range(args["repeats"]):
    if args.get("cold") and not common.drop_caches():
      print(json.dumps({"error": "drop_caches refused"}))
      return
    common.reset_peak_rss()
    t = time.perf_counter()
    soup = official_uniform_soup(torch, paths)
    times.append(time.perf_counter() - t)
    peaks.append(common.rss_mib()[1])
    checksum = float(sum(float(v.double().sum()) for v in soup.values()))
    del soup
  print(json.dumps({"times": times, "peak_mib": max(peaks), "rss_base_mib": rss_base,
                    "checksum": checksum, "torch": torch.__version__,
                    "threads": torch.get_num_threads()}))


if __name__ == "__main__":
  main()
