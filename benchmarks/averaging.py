"""Averaging N ingredient checkpoints: stream_average vs the I/O floor and the official loop.

  python benchmarks/averaging.py                      # tiny ViT N=4,16,64 and ViT-B/32 N=4,8,16
  python benchmarks/averaging.py --sizes tiny --repeats 3
  python benchmarks/averaging.py --quick              # a smoke run (tiny, N=2,4)

For each model size and N, each in a fresh subprocess (page cache warm unless
"cold"):
  stream      wall time of soup.soups.average.stream_average(paths, verify=True/False)
  floor       reading every file under the N checkpoint dirs with plain Python reads
  floor+adds  floor + N x (one numpy `a += b` pass over the model)
  official    the official code's loop (torch.load + running sum of state dicts), run in a
              separate venv with torch (--torch-python); .pt files hold the same weights
  peak        peak RSS of the worker during the call above its RSS after imports, vs one
              model's float32 bytes (VmHWM reset through /proc/self/clear_refs)
  uncompressed  stream_average on the same weights saved without Orbax's zstd compression
              (a proposed change to soup.checkpoints.save_ingredient; --no-uncompressed skips)
Cold page cache: `echo 3 > /proc/sys/vm/drop_caches` before each cold call (skipped,
and said so, where refused). Each subprocess waits for no soup.main / pytest process and
is rerun if other processes took > 5% of the CPUs meanwhile (common.quiet_call); the
share left is reported per row.

Targets (issue): stream within 1.5x of floor+adds; >= 3x faster than the official loop;
peak <= 3x one model for any N. Results: benchmarks/results/averaging.json.
Ingredients are random perturbations of one random tree with the real parameter
shapes of soup.models.vit.ViT (tiny: the default config; vitb32: patch 32, width 768,
depth 12, mlp 3072, 1000 classes). They are written under --workdir and deleted at the
end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the repo root on sys.path)

SIZES = {
    "tiny": dict(kwargs=dict(num_classes=10, patch_size=7, width=64, depth=4, num_heads=4,
                             mlp_dim=256), image=(28, 28, 1), ns=(4, 16, 64), repeats=5,
                 approx_params=205_066),
    "vitb32": dict(kwargs=dict(num_classes=1000, patch_size=32, width=768, depth=12,
                               num_heads=12, mlp_dim=3072), image=(224, 224, 3), ns=(4, 8, 16),
                   repeats=3, approx_params=88_224_232),
}


def drop_caches() -> bool:
  try:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
      f.write("3")
    return True
  except OSError:
    return False


def files_under(paths) -> list[str]:
  out = []
  for p in paths:
    if os.path.isfile(p):
      out.append(str(p))
      continue
    for root, _, names in sorted(os.walk(p)):
      out += [os.path.join(root, n) for n in sorted(names)]
  return out


def read_all(files) -> int:
  total = 0
  for f in files:
    with open(f, "rb") as fh:
      total += len(fh.read())
  return total


# --- Workers (fresh subprocesses) -------------------------------------------


def worker(mode: str, args: dict) -> dict:
  rss_base, _ = common.rss_mib()
  if mode == "floor":
    files = files_under(args["paths"])
    times, nbytes = [], 0
    for _ in range(args["repeats"]):
      if args.get("cold") and not drop_caches():
        return {"error": "drop_caches refused"}
      t = time.perf_counter()
      nbytes = read_all(files)
      times.append(time.perf_counter() - t)
    return {"times": times, "bytes": nbytes, "files": len(files)}

  import numpy as np
  from soup import checkpoints
  from soup.soups import average
  rss_base, _ = common.rss_mib()  # After importing jax, orbax and the soup package.

  if mode == "add":
    a = {k: np.array(v, np.float32) for k, v in
         checkpoints.flatten_with_names(checkpoints.load_ingredient(args["path"], False)).items()}
    b = {k: v.copy() for k, v in a.items()}
    times = []
    for _ in range(args["repeats"]):
      t = time.perf_counter()
      for k in a:
        a[k] += b[k]
      times.append(time.perf_counter() - t)
    return {"times": times}

  if mode == "stream":
    paths, verify = args["paths"], args["verify"]
    average.stream_average(paths[:1] * 2, verify=verify)  # Compiles the jitted updates.
    rss_warm, _ = common.rss_mib()  # After Orbax/tensorstore and XLA set themselves up.
    times, peaks, checksum = [], [], None
    for _ in range(args["repeats"]):
      if args.get("cold") and not drop_caches():
        return {"error": "drop_caches refused"}
      common.reset_peak_rss()
      t = time.perf_counter()
      soup = average.stream_average(paths, verify=verify)
      times.append(time.perf_counter() - t)
      peaks.append(common.rss_mib()[1])
      import jax
      checksum = float(sum(float(np.asarray(x, np.float64).sum()) for x in jax.tree.leaves(soup)))
      del soup
    return {"times": times, "peak_mib": max(peaks), "rss_base_mib": rss_base,
            "rss_warm_mib": rss_warm, "checksum": checksum}
  raise ValueError(mode)


# --- The parent ---------------------------------------------------------------


def param_shapes(size: str) -> dict:
  import jax
  import jax.numpy as jnp
  from soup import checkpoints
  from soup.models.vit import ViT
  spec = SIZES[size]
  model = ViT(**spec["kwargs"])
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *spec["image"]))))
  return {k: tuple(v.shape) for k, v in checkpoints.flatten_with_names(tree["params"]).items()}


def unflatten(flat: dict) -> dict:
  from flax import traverse_util
  return traverse_util.unflatten_dict(flat, sep="/")


def save_uncompressed(path: Path, params, metadata: dict) -> None:
  """soup.checkpoints.save_ingredient with Orbax's zstd compression off (the proposed fix).

  The same layout (OCDBT, zarr) and ingredient.json, so load_ingredient reads it unchanged.
  """
  import orbax.checkpoint as ocp
  from soup import checkpoints, results
  path = Path(path).absolute()
  if path.exists():
    shutil.rmtree(path)
  path.mkdir(parents=True)
  ckpt = ocp.PyTreeCheckpointer(use_compression=False)
  ckpt.save(path / "params", args=ocp.args.PyTreeSave(params))
  ckpt.close()
  info = {"fingerprints": checkpoints.fingerprint(params), "metadata": metadata}
  results.atomic_write_text(path / checkpoints.INGREDIENT_FILE, json.dumps(info, indent=1))


def make_ingredients(size: str, n: int, workdir: Path, torch_python: str | None,
                     uncompressed: bool) -> dict:
  """Writes n ingredients (Orbax) and, with torch, the same weights as .pt files."""
  import numpy as np
  from soup import checkpoints
  manifest = workdir / "manifest.json"
  # The fingerprint format lives in soup/checkpoints.py: a change there means rewriting.
  want = {"size": size, "n": n, "torch": bool(torch_python), "version": 1,
          "uncompressed": uncompressed,
          "checkpoints.py": common.code_version()["soup/checkpoints.py"]}
  if manifest.exists() and json.loads(manifest.read_text()) == want:
    print(f"[{size}] reusing {n} ingredients in {workdir}", file=sys.stderr)
  else:
    if workdir.exists():
      shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    shapes = param_shapes(size)
    rng = np.random.default_rng(0)
    base = {k: rng.standard_normal(s, dtype=np.float32) * np.float32(0.02) for k, s in shapes.items()}
    noise = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    t = time.perf_counter()
    pairs = []
    for i in range(n):
      flat = {k: base[k] + np.float32(1e-3 * (i + 1)) * noise[k] for k in shapes}
      checkpoints.save_ingredient(workdir / f"ing_{i:03d}", unflatten(flat), {"index": i})
      if uncompressed:
        save_uncompressed(workdir / f"unc_{i:03d}", unflatten(flat), {"index": i})
      if torch_python:
        np.savez(workdir / f"sd_{i:03d}.npz", **flat)
        pairs.append([str(workdir / f"sd_{i:03d}.npz"), str(workdir / f"sd_{i:03d}.pt")])
    if pairs:
      common.run_json([torch_python, str(Path(__file__).parent / "_torch_soup.py"), "convert",
                       json.dumps({"pairs": pairs})])
    print(f"[{size}] wrote {n} ingredients in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    manifest.write_text(json.dumps(want))
  nparams = sum(int(np.prod(s)) for s in param_shapes(size).values())
  return {"ingredients": [str(workdir / f"ing_{i:03d}") for i in range(n)],
          "pt": [str(workdir / f"sd_{i:03d}.pt") for i in range(n)] if torch_python else [],
          "uncompressed": [str(workdir / f"unc_{i:03d}") for i in range(n)] if uncompressed else [],
          "params": nparams, "model_bytes": 4 * nparams}


QUIET = {"wait_s": 300.0, "retries": 2}
WORKER_ENV: dict = {}  # e.g. {"MALLOC_ARENA_MAX": "1"} for the stream workers (--malloc-arena-max).


def _monitored(cmd: list[str], env: dict | None = None) -> dict:
  out, other = common.quiet_call(lambda: common.run_json(cmd, env=env), QUIET["wait_s"],
                                 QUIET["retries"])
  if "error" in out:
    raise OSError(out["error"])
  out["other_frac"] = other
  return out


def child(mode: str, args: dict) -> dict:
  return _monitored([sys.executable, __file__, "--worker", mode, "--args", json.dumps(args)],
                    WORKER_ENV if mode == "stream" else None)


def torch_child(torch_python: str, args: dict) -> dict:
  return _monitored([torch_python, str(Path(__file__).parent / "_torch_soup.py"), "soup",
                     json.dumps(args)])


def find_torch_python(explicit: str | None) -> tuple[str | None, str]:
  import subprocess
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


def bench_size(size: str, ns, repeats: int, cold_repeats: int, workdir: Path,
               torch_python: str | None, cold: bool, uncompressed: bool) -> dict:
  data = make_ingredients(size, max(ns), workdir / size, torch_python, uncompressed)
  mb = data["model_bytes"] / 2**20
  warm(data["ingredients"][:1])
  add = child("add", {"path": data["ingredients"][0], "repeats": max(5, repeats)})
  add_s = common.median(add["times"])
  rows = []
  for n in ns:
    paths, pts = data["ingredients"][:n], data["pt"][:n]
    warm(paths)
    floor = child("floor", {"paths": paths, "repeats": repeats})
    warm(paths)
    sv = child("stream", {"paths": paths, "verify": True, "repeats": repeats})
    warm(paths)
    sn = child("stream", {"paths": paths, "verify": False, "repeats": repeats})
    row = {"size": size, "n": n, "params": data["params"], "model_mib": mb,
           "floor_s": common.median(floor["times"]), "floor_bytes": floor["bytes"],
           "add_pass_s": add_s,
           "stream_verify_s": common.median(sv["times"]), "stream_noverify_s": common.median(sn["times"]),
           "stream_verify_peak_mib": sv["peak_mib"] - sv["rss_base_mib"],
           "stream_noverify_peak_mib": sn["peak_mib"] - sn["rss_base_mib"],
           "stream_verify_peak_over_warm_mib": sv["peak_mib"] - sv["rss_warm_mib"],
           "stream_rss_base_mib": sv["rss_base_mib"], "stream_peak_abs_mib": sv["peak_mib"],
           "raw": {"floor": floor["times"], "stream_verify": sv["times"],
                   "stream_noverify": sn["times"]},
           "other_cpu_frac": max(floor["other_frac"], sv["other_frac"], sn["other_frac"],
                                 add["other_frac"])}
    row["floor_plus_adds_s"] = row["floor_s"] + n * add_s
    if uncompressed:
      unc = data["uncompressed"][:n]
      warm(unc)
      uf = child("floor", {"paths": unc, "repeats": repeats})
      warm(unc)
      uv = child("stream", {"paths": unc, "verify": True, "repeats": repeats})
      warm(unc)
      un = child("stream", {"paths": unc, "verify": False, "repeats": repeats})
      row.update(unc_floor_s=common.median(uf["times"]), unc_floor_bytes=uf["bytes"],
                 unc_stream_verify_s=common.median(uv["times"]),
                 unc_stream_noverify_s=common.median(un["times"]),
                 unc_stream_verify_peak_mib=uv["peak_mib"] - uv["rss_base_mib"])
      row["unc_floor_plus_adds_s"] = row["unc_floor_s"] + n * add_s
      row["raw"].update(unc_floor=uf["times"], unc_stream_verify=uv["times"],
                        unc_stream_noverify=un["times"])
      row["other_cpu_frac"] = max(row["other_cpu_frac"], uf["other_frac"], uv["other_frac"],
                                  un["other_frac"])
    if torch_python:
      warm(pts)
      tc = torch_child(torch_python, {"paths": pts, "repeats": repeats})
      row.update(official_s=common.median(tc["times"]),
                 official_peak_mib=tc["peak_mib"] - tc["rss_base_mib"],
                 official_rel_checksum_diff=abs(tc["checksum"] - sv["checksum"]) /
                 max(abs(sv["checksum"]), 1e-30))
      row["raw"]["official"] = tc["times"]
      row["other_cpu_frac"] = max(row["other_cpu_frac"], tc["other_frac"])
    print(f"[{size}] N={n}: floor {row['floor_s']:.3f}s stream(verify) {row['stream_verify_s']:.3f}s "
          f"stream(no verify) {row['stream_noverify_s']:.3f}s official {row.get('official_s', 'n/a')}",
          file=sys.stderr)
    rows.append(row)
  cold_rows, cold_note = [], None
  if cold:
    if not drop_caches():
      cold_note = "drop_caches refused in this sandbox: cold-cache runs skipped"
    else:
      for n in ns:
        paths, pts = data["ingredients"][:n], data["pt"][:n]
        fl = child("floor", {"paths": paths, "repeats": cold_repeats, "cold": True})
        sv = child("stream", {"paths": paths, "verify": True, "repeats": cold_repeats, "cold": True})
        r = {"size": size, "n": n, "floor_s": common.median(fl["times"]),
             "stream_verify_s": common.median(sv["times"]),
             "other_cpu_frac": max(fl["other_frac"], sv["other_frac"])}
        if torch_python:
          tc = torch_child(torch_python, {"paths": pts, "repeats": cold_repeats, "cold": True})
          r["official_s"] = common.median(tc["times"])
          r["other_cpu_frac"] = max(r["other_cpu_frac"], tc["other_frac"])
        cold_rows.append(r)
  return {"rows": rows, "cold_rows": cold_rows, "cold_note": cold_note, "add_pass": add}


def report(all_rows, cold_rows) -> str:
  out = ["Warm page cache, medians; times in seconds. others' CPU: share of the CPUs other "
         "processes used during the row's measurements (the largest of its subprocesses).", ""]
  headers = ["model", "N", "floor (read)", "floor+adds", "stream verify", "stream no-verify",
             "official (torch)", "verify / floor+adds", "no-verify / floor+adds",
             "official / stream verify", "official / stream no-verify", "others' CPU"]
  rows = []
  for r in all_rows:
    off = r.get("official_s")
    rows.append([r["size"], r["n"], r["floor_s"], r["floor_plus_adds_s"], r["stream_verify_s"],
                 r["stream_noverify_s"], off if off is not None else "n/a",
                 r["stream_verify_s"] / r["floor_plus_adds_s"],
                 r["stream_noverify_s"] / r["floor_plus_adds_s"],
                 off / r["stream_verify_s"] if off else "n/a",
                 off / r["stream_noverify_s"] if off else "n/a",
                 f"{100 * r['other_cpu_frac']:.0f}%"])
  out.append(common.table(headers, rows))
  out += ["", "Peak RSS during the call above the worker's RSS after imports (MiB), and as a "
          "multiple of one model's float32 size; 'after warm-up' subtracts instead the RSS after "
          "a first 2-ingredient call (Orbax/tensorstore/XLA one-time setup).", ""]
  headers = ["model", "N", "model MiB", "stream verify", "x model", "stream no-verify", "x model",
             "stream verify, after warm-up", "x model", "official", "x model",
             "worker RSS after imports"]
  rows = []
  for r in all_rows:
    m = r["model_mib"]
    op = r.get("official_peak_mib")
    rows.append([r["size"], r["n"], m, r["stream_verify_peak_mib"], r["stream_verify_peak_mib"] / m,
                 r["stream_noverify_peak_mib"], r["stream_noverify_peak_mib"] / m,
                 r["stream_verify_peak_over_warm_mib"], r["stream_verify_peak_over_warm_mib"] / m,
                 op if op is not None else "n/a", op / m if op is not None else "n/a",
                 r["stream_rss_base_mib"]])
  out.append(common.table(headers, rows))
  unc = [r for r in all_rows if "unc_stream_verify_s" in r]
  if unc:
    out += ["", "Proposed fix, measured: the same ingredients saved without Orbax's zstd "
            "compression (PyTreeCheckpointer(use_compression=False)); warm cache, seconds.", ""]
    headers = ["model", "N", "floor (read)", "floor+adds", "stream verify", "stream no-verify",
               "verify / floor+adds", "no-verify / floor+adds", "official / stream verify",
               "peak x model (verify)", "compressed-stream verify / this"]
    out.append(common.table(headers, [
        [r["size"], r["n"], r["unc_floor_s"], r["unc_floor_plus_adds_s"], r["unc_stream_verify_s"],
         r["unc_stream_noverify_s"], r["unc_stream_verify_s"] / r["unc_floor_plus_adds_s"],
         r["unc_stream_noverify_s"] / r["unc_floor_plus_adds_s"],
         r["official_s"] / r["unc_stream_verify_s"] if "official_s" in r else "n/a",
         r["unc_stream_verify_peak_mib"] / r["model_mib"],
         r["stream_verify_s"] / r["unc_stream_verify_s"]] for r in unc]))
  if cold_rows:
    out += ["", "Cold page cache (drop_caches before each call); seconds.", ""]
    headers = ["model", "N", "floor (read)", "stream verify", "official (torch)",
               "verify / floor", "official / stream verify", "others' CPU"]
    out.append(common.table(headers, [
        [r["size"], r["n"], r["floor_s"], r["stream_verify_s"], r.get("official_s", "n/a"),
         r["stream_verify_s"] / r["floor_s"],
         r["official_s"] / r["stream_verify_s"] if "official_s" in r else "n/a",
         f"{100 * r['other_cpu_frac']:.0f}%"]
        for r in cold_rows]))
  return "\n".join(out)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  ap.add_argument("--args", help=argparse.SUPPRESS)
  ap.add_argument("--sizes", default="tiny,vitb32")
  ap.add_argument("--tiny-n", default="4,16,64")
  ap.add_argument("--vitb32-n", default="4,8,16")
  ap.add_argument("--repeats", type=int, default=0, help="0: 5 for tiny, 3 for vitb32")
  ap.add_argument("--cold-repeats", type=int, default=1)
  ap.add_argument("--no-cold", action="store_true")
  ap.add_argument("--no-uncompressed", action="store_true", help="skip the proposed-fix variant "
                  "(ingredients saved without zstd compression)")
  ap.add_argument("--torch-python", default=None, help="python of a venv with torch "
                  "(default /tmp/torchvenv/bin/python); the official baseline is skipped without one")
  ap.add_argument("--workdir", default="/tmp/soup_bench_averaging")
  ap.add_argument("--keep", action="store_true", help="keep the ingredients for a rerun")
  ap.add_argument("--malloc-arena-max", type=int, default=0, help="run the stream_average workers "
                  "with MALLOC_ARENA_MAX set (glibc; 0: unset)")
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
  if a.malloc_arena_max:
    WORKER_ENV["MALLOC_ARENA_MAX"] = str(a.malloc_arena_max)
  busy = common.busy_processes()
  torch_python, torch_info = find_torch_python(a.torch_python)
  print(f"official baseline: {torch_python or 'skipped'} ({torch_info})", file=sys.stderr)
  workdir = Path(a.workdir)
  sizes = a.sizes.split(",")
  # Orbax ingredients, uncompressed copies, .pt copies (+ one .npz while converting), float32.
  need = sum(SIZES[s]["approx_params"] * 4 * 3.1 * max(int(x) for x in
             getattr(a, f"{s}_n").split(",")) for s in sizes)
  free = shutil.disk_usage(workdir.parent).free
  if need > 0.8 * free:
    sys.exit(f"Not enough disk under {workdir.parent}: ~{need / 2**30:.1f} GiB needed, "
             f"{free / 2**30:.1f} GiB free.")
  results = {"targets": {"stream_vs_floor_plus_adds_max": 1.5, "official_over_stream_min": 3.0,
                         "peak_over_model_max": 3.0},
             "torch": torch_info if torch_python else None, "busy_at_start": busy,
             "stream_worker_env": dict(WORKER_ENV), "sizes": {}}
  all_rows, all_cold = [], []
  try:
    for s in sizes:
      ns = [int(x) for x in getattr(a, f"{s}_n").split(",")]
      repeats = a.repeats or SIZES[s]["repeats"]
      t = time.perf_counter()
      r = bench_size(s, ns, repeats, a.cold_repeats, workdir, torch_python, not a.no_cold,
                     not a.no_uncompressed)
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
  if WORKER_ENV:
    text = f"stream_average workers ran with {WORKER_ENV}.\n\n" + text
  notes = [r["cold_note"] for r in results["sizes"].values() if r["cold_note"]]
  if notes:
    text += "\n\n" + "\n".join(notes)
  print(text)
  results["busy_at_end"] = common.busy_processes()
  print("\nwrote", common.write_results(a.out, results), file=sys.stderr)


if __name__ == "__main__":
  main()
