"""Averaging N ingredient checkpoints: the function the recipes call vs the I/O floors.

  python -m benchmarks.averaging                      # tiny ViT N=4,16,64 and ViT-B/32 N=4,16
  python -m benchmarks.averaging --sizes vitb32 --vitb32-n 16 --repeats 5
  python -m benchmarks.averaging --quick              # a smoke run (tiny, N=2,4)

For each model size and N, each measurement in a fresh subprocess (page cache warm
unless "cold"):
  floor (f.read)   reading every file of the N checkpoints with plain `f.read()`
  reused floor     per ingredient: its chunk files `readinto` one reused buffer, then one
                   float32 `mean += x` pass over it (the floor: read + one add)
  run path         soup.soups.weighted_average(paths, layout=Layout.of_run(mesh)), what the
                   uniform_soup recipe calls, on soup.main's default mesh (2 CPU devices; a
                   config without sharding rules averages in the host layout), checksums on
                   and off, on the ingredients as save_ingredient writes them (raw zarr
                   chunks, CRC-32C per MiB)
  8 devices        the same on 8 simulated CPU devices (skip: --no-devices-8)
  flat layout      weighted_average(paths, layout=Layout.flat(mesh)): the mean split over the
                   devices (2 and 8), each device adding its part, XLA's update
  official         the official code's loop (torch.load + running sum) in a separate venv
                   with torch (--torch-python); skipped when there is none
  peak             peak RSS of the worker during the calls above its RSS after imports,
                   as a multiple of one model's float32 bytes (VmHWM reset through
                   /proc/self/clear_refs; the max over the repeats, all in one process)
Cold page cache: `sync; echo 3 > /proc/sys/vm/drop_caches` before each cold call.
Each subprocess waits for no soup.main / pytest process and is rerun if other
processes took > 5% of the CPUs meanwhile (common.quiet_call); the share left is
reported per row, and `uptime`'s load before and after.

Targets: run path, verify <= 1.5x the reused floor (ViT-B/32, N=4 and 16, warm; 8 devices: 2x);
cold <= 1.2x a cold read of the same bytes; tiny-model cost per ingredient <= 10 ms;
peak <= 2.5x one model. Results: benchmarks/results/averaging.json.
Ingredients are random perturbations of one random tree with the real parameter
shapes of soup.models.vit.ViT (tiny: the default config; vitb32: patch 32, width 768,
depth 12, mlp 3072, 1000 classes), written under --workdir and deleted at the end
unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common

SIZES = {
    "tiny": dict(kwargs=dict(num_classes=10, patch_size=7, width=64, depth=4, num_heads=4,
                             mlp_dim=256), image=(28, 28, 1), ns=(4, 16, 64), repeats=5,
                 approx_params=205_066),
    "vitb32": dict(kwargs=dict(num_classes=1000, patch_size=32, width=768, depth=12,
                               num_heads=12, mlp_dim=3072), image=(224, 224, 3), ns=(4, 16),
                   repeats=3, approx_params=88_224_232),
}
METADATA_FILES = ("commit_success.txt", "ingredient.json", "manifest.ocdbt")


def files_under(paths, data_only: bool = False) -> list[str]:
  out = []
  for p in paths:
    if os.path.isfile(p):
      out.append(str(p))
      continue
    for root, _, names in sorted(os.walk(p)):
      out += [os.path.join(root, n) for n in sorted(names)
              if not data_only or not (n.startswith((".", "_")) or n in METADATA_FILES)]
  return out


def read_all(files) -> int:
  total = 0
  for f in files:
    with open(f, "rb") as fh:
      total += len(fh.read())
  return total


# --- Workers (fresh subprocesses) -------------------------------------------


def worker(mode: str, args: dict) -> dict:
  import numpy as np
  rss_base, _ = common.rss_mib()
  if mode == "floor":
    files = files_under(args["paths"])
    times, nbytes = [], 0
    for _ in range(args["repeats"]):
      if args.get("cold") and not common.drop_caches():
        return {"error": "drop_caches refused"}
      t = time.perf_counter()
      nbytes = read_all(files)
      times.append(time.perf_counter() - t)
    return {"times": times, "bytes": nbytes, "files": len(files)}

  if mode == "floor_reused":
    per_ingredient = [files_under([p], data_only=True) for p in args["paths"]]
    sizes = [sum(os.path.getsize(f) for f in fs) for fs in per_ingredient]
    buffer = np.empty(max(sizes) // 4 + 1, np.float32)
    mean = np.zeros(args["params"], np.float32)
    raw = memoryview(buffer.view(np.uint8))
    times = []
    for repeat in range(args["repeats"] + 1):  # The first, untimed, faults the buffers in.
      if args.get("cold") and not common.drop_caches():
        return {"error": "drop_caches refused"}
      t = time.perf_counter()
      for fs in per_ingredient:
        offset = 0
        for f in fs:
          with open(f, "rb", buffering=0) as fh:
            offset += fh.readinto(raw[offset:])
        np.add(mean, buffer[:args["params"]], out=mean)
      if repeat:
        times.append(time.perf_counter() - t)
    return {"times": times, "bytes": sum(sizes)}

  from soup.soups import average
  rss_base, _ = common.rss_mib()  # After importing jax, orbax and the soup package.
  if mode == "add":
    x = np.random.default_rng(0).standard_normal(args["params"], dtype=np.float32)
    mean = np.zeros_like(x)
    times = []
    for _ in range(args["repeats"]):
      t = time.perf_counter()
      np.add(mean, x, out=mean)
      times.append(time.perf_counter() - t)
    return {"times": times}

  if mode == "average":
    import jax

    from soup import mesh as mesh_lib
    paths, verify = args["paths"], args["verify"]
    assert jax.device_count() == args["devices"], jax.devices()
    mesh = mesh_lib.make_mesh()
    layout = (average.Layout.flat(mesh) if args["layout"] == "flat"
              else average.Layout.of_run(mesh))
    run = lambda p: average.weighted_average(p, layout=layout, verify=verify)  # noqa: E731
    run(paths[:1] * 2)  # Compiles / sets up, not timed.
    rss_warm, _ = common.rss_mib()
    times, peaks, checksum = [], [], None
    for _ in range(args["repeats"]):
      if args.get("cold") and not common.drop_caches():
        return {"error": "drop_caches refused"}
      common.reset_peak_rss()
      t = time.perf_counter()
      result = run(paths)
      times.append(time.perf_counter() - t)
      peaks.append(common.rss_mib()[1])
      checksum = float(sum(float(np.asarray(x, np.float64).sum()) for x in jax.tree.leaves(result)))
      del result
    return {"times": times, "peak_mib": max(peaks), "peaks_mib": peaks, "rss_base_mib": rss_base,
            "rss_warm_mib": rss_warm, "rss_end_mib": common.rss_mib()[0], "checksum": checksum}
  raise ValueError(mode)


# --- The parent ---------------------------------------------------------------


def param_shapes(size: str) -> dict:
  import jax
  import jax.numpy as jnp

  from soup import trees
  from soup.models.vit import ViT
  spec = SIZES[size]
  model = ViT(**spec["kwargs"])
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *spec["image"]))))
  return {k: tuple(v.shape) for k, v in trees.flatten_with_names(tree["params"]).items()}


def make_ingredients(size: str, n: int, workdir: Path, torch_python: str | None) -> dict:
  """Writes n ingredients (and .pt copies of the same weights for the official loop)."""
  import numpy as np

  from soup import checkpoints, trees as tree_lib
  manifest = workdir / "manifest.json"
  want = {"size": size, "n": n, "torch": bool(torch_python), "version": 3,
          "checkpoints.py": common.code_version()["soup/checkpoints.py"]}
  if manifest.exists() and json.loads(manifest.read_text()) == want:
    print(f"[{size}] reusing {n} ingredients in {workdir}", file=sys.stderr)
  else:
    if workdir.exists():
      shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    shapes = param_shapes(size)
    rng = np.random.default_rng(0)
    base = {k: rng.standard_normal(s, dtype=np.float32) * np.float32(0.02)
            for k, s in shapes.items()}
    noise = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    t = time.perf_counter()
    pairs = []
    for i in range(n):
      flat = {k: base[k] + np.float32(1e-3 * (i + 1)) * noise[k] for k in shapes}
      checkpoints.save_ingredient(workdir / f"ing_{i:03d}", tree_lib.unflatten(flat),
                                  {"index": i})
      if torch_python:
        np.savez(workdir / f"sd_{i:03d}.npz", **flat)
        pairs.append([str(workdir / f"sd_{i:03d}.npz"), str(workdir / f"sd_{i:03d}.pt")])
    if pairs:
      common.run_json([torch_python, "-m", "benchmarks._torch_soup", "convert",
                       json.dumps({"pairs": pairs})])
    print(f"[{size}] wrote {n} ingredients in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    manifest.write_text(json.dumps(want))
  nparams = sum(int(np.prod(s)) for s in param_shapes(size).values())
  return {"ingredients": [str(workdir / f"ing_{i:03d}") for i in range(n)],
          "pt": [str(workdir / f"sd_{i:03d}.pt") for i in range(n)] if torch_python else [],
          "params": nparams, "model_bytes": 4 * nparams}


QUIET = {"wait_s": 300.0, "retries": 2}


def _monitored(cmd: list[str], env: dict | None = None) -> dict:
  out, other = common.quiet_call(lambda: common.run_json(cmd, env, timeout=1800),
                                 QUIET["wait_s"], QUIET["retries"])
  if "error" in out:
    raise OSError(out["error"])
  out["other_frac"] = other
  return out


def child(mode: str, args: dict) -> dict:
  devices = args.get("devices", 2)  # soup.main's default on a CPU host.
  return _monitored([sys.executable, "-m", "benchmarks.averaging", "--worker", mode, "--args",
                     json.dumps(args)],
                    {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})


def torch_child(torch_python: str, args: dict) -> dict:
  return _monitored([torch_python, "-m", "benchmarks._torch_soup", "soup", json.dumps(args)])


def find_torch_python(explicit: str | None) -> tuple[str | None, str]:
  candidates = [explicit] if explicit else ["/tmp/torchvenv/bin/python"]
  for c in candidates:
    if c and os.path.exists(c):
      r = subprocess.run([c, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                         text=True)
      if r.returncode == 0:
        return c, r.stdout.strip()
  return None, ("no torch interpreter found (create one: python3 -m venv /tmp/torchvenv && "
                "/tmp/torchvenv/bin/pip install torch==2.13.0 numpy)")


def warm(paths) -> None:
  """Reads the files a measurement is about to read, so they are in the page cache."""
  read_all(files_under(paths))


VARIANTS = {  # name -> worker args: the run path first.
    "run_verify": {"layout": "run", "devices": 2, "verify": True},
    "run_noverify": {"layout": "run", "devices": 2, "verify": False},
    "dev8_verify": {"layout": "run", "devices": 8, "verify": True},
    "flat2_verify": {"layout": "flat", "devices": 2, "verify": True},
    "flat8_verify": {"layout": "flat", "devices": 8, "verify": True},
}


def bench_size(size: str, ns, repeats: int, workdir: Path, torch_python: str | None,
               cold: bool, devices_8: bool) -> dict:
  data = make_ingredients(size, max(ns), workdir / size, torch_python)
  p = data["params"]
  mb = data["model_bytes"] / 2**20
  add = child("add", {"params": p, "repeats": max(5, repeats)})
  variants = {k: v for k, v in VARIANTS.items() if devices_8 or v["devices"] != 8}
  rows = []
  for n in ns:
    paths, pts = data["ingredients"][:n], data["pt"][:n]
    load_before = common.uptime()
    warm(paths)
    floor = child("floor", {"paths": paths, "repeats": repeats})
    reused = child("floor_reused", {"paths": paths, "repeats": repeats, "params": p})
    runs = {k: child("average", {**v, "paths": paths, "repeats": repeats})
            for k, v in variants.items()}
    row = {"size": size, "n": n, "params": p, "model_mib": mb, "load_before": load_before,
           "floor_s": common.median(floor["times"]), "floor_bytes": floor["bytes"],
           "reused_floor_s": common.median(reused["times"]),
           "add_pass_s": common.median(add["times"]),
           "raw": {"floor": floor["times"], "reused_floor": reused["times"]},
           "other_cpu_frac": max(x["other_frac"] for x in (floor, reused, add, *runs.values()))}
    for k, r in runs.items():
      row[f"{k}_s"] = common.median(r["times"])
      row[f"{k}_peak_mib"] = r["peak_mib"] - r["rss_base_mib"]
      row[f"{k}_peak_over_warm_mib"] = r["peak_mib"] - r["rss_warm_mib"]
      row["raw"][k] = r["times"]
    if torch_python:
      warm(pts)
      tc = torch_child(torch_python, {"paths": pts, "repeats": repeats})
      row.update(official_s=common.median(tc["times"]),
                 official_peak_mib=tc["peak_mib"] - tc["rss_base_mib"])
      row["raw"]["official"] = tc["times"]
      row["other_cpu_frac"] = max(row["other_cpu_frac"], tc["other_frac"])
    row["load_after"] = common.uptime()
    print(f"[{size}] N={n}: reused floor {row['reused_floor_s']:.3f}s run path (verify) "
          f"{row['run_verify_s']:.3f}s load {load_before} -> {row['load_after']}",
          file=sys.stderr)
    rows.append(row)
  cold_rows, cold_note = [], None
  if cold:
    if not common.drop_caches():
      cold_note = "drop_caches refused in this sandbox: cold-cache runs skipped"
    else:
      for n in ns:
        paths = data["ingredients"][:n]
        fl = child("floor", {"paths": paths, "repeats": 1, "cold": True})
        fr = child("floor_reused", {"paths": paths, "repeats": 1, "cold": True, "params": p})
        sv = child("average", {**VARIANTS["run_verify"], "paths": paths, "repeats": 1,
                               "cold": True})
        cold_rows.append({"size": size, "n": n, "floor_s": common.median(fl["times"]),
                          "reused_floor_s": common.median(fr["times"]),
                          "run_verify_s": common.median(sv["times"]),
                          "other_cpu_frac": max(fl["other_frac"], fr["other_frac"],
                                                sv["other_frac"])})
  return {"rows": rows, "cold_rows": cold_rows, "cold_note": cold_note, "add_pass": add}


def report(all_rows, cold_rows) -> str:
  out = ["Warm page cache, medians; seconds (x: over the reused floor = readinto one reused "
         "buffer + one float32 add pass per ingredient). run path: weighted_average in the "
         "run's layout (the host's, no sharding rules) on soup.main's default 2-device mesh; "
         "8 dev: the same on 8 simulated devices; flat: the flat device layout. others' CPU: "
         "share of the CPUs other processes used during the row's measurements.", ""]
  headers = ["model", "N", "floor (f.read)", "reused floor", "run path verify", "x",
             "run path no-verify", "x", "8 dev verify", "x", "flat, 2 dev", "x",
             "flat, 8 dev", "x",
             "official (torch)", "load avg", "others' CPU"]
  rows = []
  for r in all_rows:
    cells = [r["size"], r["n"], r["floor_s"], r["reused_floor_s"]]
    for k in ("run_verify", "run_noverify", "dev8_verify", "flat2_verify", "flat8_verify"):
      v = r.get(f"{k}_s")
      cells += [v if v is not None else "n/a",
                v / r["reused_floor_s"] if v is not None else "n/a"]
    rows.append(cells + [r.get("official_s", "n/a"), r["load_before"],
                         f"{100 * r['other_cpu_frac']:.0f}%"])
  out.append(common.table(headers, rows))
  out += ["", "Peak RSS during the call above the worker's RSS after imports, as a multiple of "
          "one model's float32 size (max over the repeats, all in one process); 'after warm-up' "
          "subtracts instead the RSS after a first 2-ingredient call.", ""]
  headers = ["model", "N", "model MiB", "run path verify", "run path, after warm-up",
             "8 dev verify", "flat, 2 dev", "flat, 8 dev", "official"]
  rows = []
  for r in all_rows:
    m = r["model_mib"]
    x = lambda key: r[key] / m if r.get(key) is not None else "n/a"  # noqa: E731
    rows.append([r["size"], r["n"], m, x("run_verify_peak_mib"),
                 x("run_verify_peak_over_warm_mib"), x("dev8_verify_peak_mib"),
                 x("flat2_verify_peak_mib"), x("flat8_verify_peak_mib"), x("official_peak_mib")])
  out.append(common.table(headers, rows))
  if cold_rows:
    out += ["", "Cold page cache (drop_caches before each call), one call each; seconds.", ""]
    headers = ["model", "N", "cold f.read", "cold reused floor", "run path verify",
               "verify / cold f.read", "verify / cold reused floor", "others' CPU"]
    out.append(common.table(headers, [
        [r["size"], r["n"], r["floor_s"], r["reused_floor_s"], r["run_verify_s"],
         r["run_verify_s"] / r["floor_s"], r["run_verify_s"] / r["reused_floor_s"],
         f"{100 * r['other_cpu_frac']:.0f}%"] for r in cold_rows]))
  return "\n".join(out)


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  ap.add_argument("--args", help=argparse.SUPPRESS)
  ap.add_argument("--sizes", default="tiny,vitb32")
  ap.add_argument("--tiny-n", default="4,16,64")
  ap.add_argument("--vitb32-n", default="4,16")
  ap.add_argument("--repeats", type=int, default=0, help="0: 5 for tiny, 3 for vitb32")
  ap.add_argument("--no-cold", action="store_true")
  ap.add_argument("--no-devices-8", action="store_true", help="skip the 8-device variant")
  ap.add_argument("--torch-python", default=None, help="python of a venv with torch "
                  "(default /tmp/torchvenv/bin/python); the official baseline is skipped "
                  "without one")
  ap.add_argument("--workdir", default="/tmp/soup_bench_averaging")
  ap.add_argument("--keep", action="store_true", help="keep the ingredients for a rerun")
  ap.add_argument("--quick", action="store_true", help="smoke: tiny, N=2,4, 1 repeat, no cold")
  ap.add_argument("--quiet-wait-s", type=float, default=300, help="before each measurement, wait "
                  "up to this long for no soup.main / pytest process")
  ap.add_argument("--retries", type=int, default=2, help="reruns of a measurement during which "
                  "other processes used > 5%% of the CPUs")
  ap.add_argument("--out", default="averaging")
  a = ap.parse_args()
  if a.worker:
    print(json.dumps(worker(a.worker, json.loads(a.args))))
    return
  if a.quick:
    a.sizes, a.tiny_n, a.repeats, a.no_cold = "tiny", "2,4", 1, True
  QUIET.update(wait_s=a.quiet_wait_s, retries=a.retries)
  busy = common.busy_processes()
  torch_python, torch_info = find_torch_python(a.torch_python)
  print(f"official baseline: {torch_python or 'skipped'} ({torch_info})", file=sys.stderr)
  workdir = Path(a.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  sizes = a.sizes.split(",")
  # The ingredients, .pt copies (+ one .npz while converting).
  copies = 1 + 2.1 * bool(torch_python)
  need = sum(SIZES[s]["approx_params"] * 4 * copies * max(int(x) for x in
             getattr(a, f"{s}_n").split(",")) for s in sizes)
  free = shutil.disk_usage(workdir).free
  if need > 0.8 * free:
    sys.exit(f"Not enough disk under {workdir}: ~{need / 2**30:.1f} GiB needed, "
             f"{free / 2**30:.1f} GiB free.")
  results = {"targets": {"run_verify_over_reused_floor_max": 1.5,
                         "dev8_verify_over_reused_floor_goal": 2.0,
                         "cold_run_over_cold_read_max": 1.2, "tiny_ms_per_ingredient_max": 10,
                         "peak_over_model_max": 2.5},
             "torch": torch_info if torch_python else None,
             "busy_at_start": busy, "load_at_start": common.uptime(), "sizes": {}}
  all_rows, all_cold = [], []
  try:
    for s in sizes:
      ns = [int(x) for x in getattr(a, f"{s}_n").split(",")]
      repeats = a.repeats or SIZES[s]["repeats"]
      t = time.perf_counter()
      r = bench_size(s, ns, repeats, workdir, torch_python, not a.no_cold, not a.no_devices_8)
      r["wall_s"] = time.perf_counter() - t
      results["sizes"][s] = r
      all_rows += r["rows"]
      all_cold += r["cold_rows"]
      if not a.keep:
        shutil.rmtree(workdir / s, ignore_errors=True)
  finally:
    if not a.keep:
      shutil.rmtree(workdir, ignore_errors=True)
  text = report(all_rows, all_cold)
  notes = [r["cold_note"] for r in results["sizes"].values() if r["cold_note"]]
  if notes:
    text += "\n\n" + "\n".join(notes)
  print(text)
  results["busy_at_end"] = common.busy_processes()
  results["load_at_end"] = common.uptime()
  print("\nwrote", common.write_results(a.out, results), file=sys.stderr)


if __name__ == "__main__":
  main()
