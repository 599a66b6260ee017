"""Shared helpers for the benchmark scripts (not a benchmark itself).

Each benchmark is a script: `python benchmarks/NAME.py`. They print a markdown
table and write JSON under benchmarks/results/. Timings are medians of repeated
runs; ratios are taken between numbers measured in the same run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))


def median(xs):
  return float(statistics.median(xs))


def machine() -> dict:
  """What the numbers were measured on."""
  info = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    for line in out.splitlines():
      key, _, value = line.partition(":")
      if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "L3 cache"):
        info[key.strip()] = value.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  try:
    with open("/proc/meminfo") as f:
      info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
  except OSError:
    pass
  return info


def busy_processes(pattern: str = "soup.main") -> list[str]:
  """Other processes that would skew timings (e.g. a running experiment)."""
  out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
  me = str(os.getpid())
  return [l.strip() for l in out.splitlines()[1:]
          if pattern in l and "ps -eo" not in l and not l.strip().startswith(me + " ")]


def wait_until_quiet(pattern: str = "soup.main", timeout_s: float = 0.0) -> list[str]:
  """Waits up to timeout_s for no `pattern` process; returns those still running."""
  deadline = time.time() + timeout_s
  busy = busy_processes(pattern)
  while busy and time.time() < deadline:
    time.sleep(10)
    busy = busy_processes(pattern)
  if busy:
    print(f"WARNING: {len(busy)} '{pattern}' process(es) running; timings are skewed: {busy}",
          file=sys.stderr)
  return busy


def write_results(name: str, payload: dict) -> Path:
  RESULTS.mkdir(parents=True, exist_ok=True)
  payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
             "machine": machine(), "busy_processes": busy_processes(), **payload}
  path = RESULTS / f"{name}.json"
  path.write_text(json.dumps(payload, indent=1, default=float))
  return path


def table(headers: list[str], rows: list[list]) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
  return "\n".join(lines)


def run_json(cmd: list[str], env: dict | None = None, timeout: float = 900) -> dict:
  """Runs a child that prints one JSON object on its last stdout line."""
  full_env = dict(os.environ)
  full_env.update(env or {})
  proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def reset_peak_rss() -> bool:
  """Resets this process's VmHWM (Linux >= 4.0); False if not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def rss_mib() -> tuple[float, float]:
  """(current RSS, peak RSS since start or last reset) of this process in MiB."""
  cur = peak = float("nan")
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        cur = int(line.split()[1]) / 1024
      elif line.startswith("VmHWM:"):
        peak = int(line.split()[1]) / 1024
  return cur, peak


def vit_forward_flops(batch: int, image: tuple[int, int, int], patch: int, width: int, depth: int,
                      mlp: int, num_classes: int, cls_token: bool = True) -> dict:
  """Analytic matmul FLOPs (2 per multiply-add) of one ViT forward pass.

  Counts the patch embedding, q/k/v/out projections, the two attention
  products, the MLP and the head (class token only); not norms, softmax,
  GELU or elementwise ops. A train step is counted as 3x forward (the usual
  MFU convention: backward = 2x forward).
  """
  h, w, c = image
  patches = (h // patch) * (w // patch)
  t = patches + (1 if cls_token else 0)
  per_block = 2 * t * width * 3 * width + 2 * 2 * t * t * width + 2 * t * width * width \
      + 2 * 2 * t * width * mlp
  per_image = 2 * patches * patch * patch * c * width + depth * per_block + 2 * width * num_classes
  return {"forward": batch * per_image, "train_step": 3 * batch * per_image, "tokens": t}
