"""Shared helpers for the benchmark scripts (not a benchmark itself).

Each benchmark is a module run from the repository root: `python -m benchmarks.NAME`.
They print markdown tables and write JSON under benchmarks/results/. Timings are medians
of repeated runs; ratios are taken between numbers measured in the same run.
Standard library only: benchmarks/_torch_soup.py imports it in a venv with just torch.
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

# Every benchmark process sets the host allocator as soup.main does, before any thread
# starts (soup/memory.py keep_freed_blocks; SOUP_GLIBC_DEFAULTS=1 keeps glibc's own).
# Figures dated before 2026-12-08 were measured with glibc's defaults.
try:
  from soup import memory as _memory
  ALLOCATOR = ("soup.main's (memory.keep_freed_blocks)" if _memory.keep_freed_blocks()
               else "glibc defaults")
except ImportError:  # benchmarks/_torch_soup.py's venv: the official loop, as it runs.
  ALLOCATOR = "glibc defaults"


def median(xs):
  return float(statistics.median(xs))


def timeit(fn, repeats: int) -> list[float]:
  """Wall seconds of `repeats` calls of fn()."""
  out = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t)
  return out


def load_average() -> list[float]:
  """The 1, 5 and 15 minute load averages."""
  return [round(x, 2) for x in os.getloadavg()]


def uptime() -> str:
  """The load averages as `uptime` prints them: "1.23 0.98 0.75"."""
  return " ".join(f"{x:.2f}" for x in load_average())


def drop_caches() -> bool:
  """Empties the page cache (`sync; echo 3 > /proc/sys/vm/drop_caches`); False if refused."""
  try:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
      f.write("3")
    return True
  except OSError:
    return False


def machine() -> dict:
  """What the numbers were measured on."""
  info = {"python": platform.python_version(), "cpus": os.cpu_count(),
          "platform": platform.platform(), "allocator": ALLOCATOR}
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


BUSY_PATTERNS = ("soup.main", "pytest")


def busy_processes(patterns=BUSY_PATTERNS) -> list[str]:
  """Other processes that would skew timings (a running experiment, a test suite)."""
  out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
  me = str(os.getpid())
  return [line.strip()[:200] for line in out.splitlines()[1:]
          if any(p in line for p in patterns) and "ps -eo" not in line
          and not line.strip().startswith(me + " ")]


def wait_until_quiet(timeout_s: float = 0.0, patterns=BUSY_PATTERNS) -> list[str]:
  """Waits up to timeout_s for no such process; returns those still running."""
  deadline = time.time() + timeout_s
  busy = busy_processes(patterns)
  while busy and time.time() < deadline:
    time.sleep(5)
    busy = busy_processes(patterns)
  if busy:
    print(f"WARNING: {len(busy)} busy process(es) running; timings are skewed: {busy[:3]}",
          file=sys.stderr)
  return busy


def _system_busy_s() -> float:
  """CPU seconds all CPUs spent busy since boot (user+nice+system+irq+softirq+steal)."""
  with open("/proc/stat") as f:
    v = [int(x) for x in f.readline().split()[1:9]]
  return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
  import resource
  s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class Monitor:
  """Measures the CPU time other processes used while the block ran.

  other_frac = (all CPUs' busy time - this process's and its waited-for
  children's CPU time) / (wall time x CPUs). Near 0 on a quiet machine.
  """

  def __enter__(self):
    self.t, self.sys, self.own = time.perf_counter(), _system_busy_s(), _own_cpu_s()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self.t
    other = (_system_busy_s() - self.sys) - (_own_cpu_s() - self.own)
    self.other_frac = max(0.0, other) / max(self.wall * (os.cpu_count() or 1), 1e-9)
    return False


CONTENDED = 0.05  # other_frac above this: the measurement is flagged (and retried).


def quiet_call(fn, wait_s: float = 300, retries: int = 2):
  """Runs fn() once the machine is quiet; retries a contended run; returns (result, other_frac).

  Waits up to wait_s for no soup.main / pytest process, then runs fn under a
  Monitor; if other processes used more than 5% of the CPUs meanwhile, waits
  and reruns (at most `retries` more times), keeping the least contended run.
  """
  best = None
  for _ in range(retries + 1):
    wait_until_quiet(wait_s)
    with Monitor() as m:
      out = fn()
    if best is None or m.other_frac < best[1]:
      best = (out, m.other_frac)
    if m.other_frac <= CONTENDED:
      break
    print(f"contended run ({100 * m.other_frac:.0f}% of the CPUs used by others): retrying",
          file=sys.stderr)
  return best


CODE_FILES = ("soup/checkpoints.py", "soup/memory.py", "soup/trees.py", "soup/soups/average.py",
              "soup/soups/greedy.py", "soup/soups/learned.py", "soup/train.py", "soup/evaluate.py",
              "soup/models/vit.py")


def code_version() -> dict:
  """sha256 (12 hex) of the files the benchmarks measure: ties results to a code version."""
  import hashlib
  out = {}
  for f in CODE_FILES:
    try:
      out[f] = hashlib.sha256((ROOT / f).read_bytes()).hexdigest()[:12]
    except OSError:
      out[f] = None
  return out


def write_results(name: str, payload: dict) -> Path:
  RESULTS.mkdir(parents=True, exist_ok=True)
  payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
             "machine": machine(), "code": code_version(), "busy_processes": busy_processes(),
             **payload}
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
  """Runs a child that prints one JSON object on its last stdout line.

  The child runs in the repository root, so `[python, "-m", "benchmarks.NAME", ...]` works
  from any working directory."""
  full_env = dict(os.environ)
  full_env.update(env or {})
  proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout,
                        cwd=ROOT)
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
