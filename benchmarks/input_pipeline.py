"""Input pipeline throughput: the ImageNet transforms on Grain worker processes.

  python -m benchmarks.input_pipeline [--images=128 --batch=32 --batches=40 --repeats=5]

Generates ImageNet-sized JPEGs (500x375, about 94 KB: a smooth random color
field, oriented stripes and pixel noise, so that decoding costs what a photo
costs; never blank) and measures images/s of

  serial      today's per-thread cost: decode + transform in this process, one
              image after another (what each decoding thread of the old
              pipeline did);
  workers=1   the Grain pipeline of soup/data/grain_input.py, one worker process;
  workers=2   the same with two worker processes;

for the training transform (RandAugment m9 n2 after timm's random-resized crop
and flip, `TrainBatches`) and the eval transform (resize shorter side + center
crop, `TfdsImages`), at 224 px. Records come from an in-memory source (the
JPEG bytes; the TFDS array_record read is not measured). Also measured: the
consumer's cost alone (`transfer`: two workers hand over ready 224-px batches
through shared memory and the consumer reads each once, as the host-to-device
copy does; a lower bound on what one training process can take in, since on a
2-core machine the workers share the consumer's cores).

Each pipeline is started once (spawn cost excluded), its prefetch buffer is
drained before timing, and the configurations are timed in turn, `repeats`
times; the tables give medians. Two views of each run:

  wall clock   images/s. On a shared machine this is what the scheduler leaves
               us: with sched_autogroup (on here) a session gets one share of
               the CPUs however many processes it runs, so 1 -> 2 workers
               cannot scale while other sessions keep the cores busy;
  CPU time     images per CPU-second of the processes that decode (/proc/PID/stat
               of the workers; process_time() for serial), which does not depend
               on how much CPU others leave us: equal per-CPU-second rates for 1
               and 2 workers mean 2 workers give 2x on two free cores. The
               consumer's (this process's) CPU-seconds per image bound what one
               training process can take in: 1 / that.

"others' CPU" is the share of both CPUs other processes used during the serial
runs (common.Monitor). Writes benchmarks/results/input_pipeline.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np

from benchmarks import common
from soup.data import grain_input, randaugment, transforms

SIZE = 224
AUG = "rand-m9-n2"
FILL = (123, 117, 104)


def textured_jpeg(rng: np.random.Generator, width: int = 500, height: int = 375) -> bytes:
  """A random textured photo-like JPEG of about 94 KB at quality 90."""
  from PIL import Image
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
  img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
  for _ in range(4):  # Oriented stripes at random frequencies.
    freq, angle, phase = rng.uniform(0.02, 0.3), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    wave = np.sin(freq * (np.cos(angle) * x + np.sin(angle) * y) + phase)
    img = img + rng.uniform(10, 30) * wave[..., None] * rng.uniform(0.5, 1, 3)
  img = img + rng.normal(0, 18, img.shape)
  out = io.BytesIO()
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
  return out.getvalue()


class MemorySource:
  """A data source of `length` records cycling over a few JPEGs (picklable, like TFDS's)."""

  def __init__(self, jpegs: list[bytes], length: int):
    self.jpegs, self.length = jpegs, length

  def __len__(self) -> int:
    return self.length

  def __getitems__(self, ids):
    return [{"image": self.jpegs[i % len(self.jpegs)], "label": i % 1000} for i in ids]


class ReadyBatches:
  """Transfer only: a batch of the training shape, no decoding (the worker only copies it
  into shared memory)."""

  def __init__(self, batch: int):
    self.batch = batch
    self._images = None

  def __call__(self, k: int):
    if self._images is None:
      self._images = np.full((self.batch, SIZE, SIZE, 3), 7, np.uint8)
    return self._images, np.full((self.batch,), k, np.int32)


def serial_rate(jpegs: list[bytes], count: int, train: bool) -> dict:
  """Images/s (wall) and images per CPU-second of the transform in this process, one image
  after another."""
  augment = randaugment.from_string(AUG, FILL)
  t, cpu = time.perf_counter(), time.process_time()
  for i in range(count):
    img = transforms.decode_rgb(jpegs[i % len(jpegs)])
    if train:
      transforms.train_transform(img, SIZE, transforms.row_rng(0, i, 0), augment)
    else:
      transforms.eval_transform(img, SIZE)
  return dict(wall=count / (time.perf_counter() - t),
              per_cpu=count / max(time.process_time() - cpu, 1e-9))


def spawned_workers() -> set[int]:
  """Pids of this process's spawned children (Grain's worker processes)."""
  me, out = os.getpid(), set()
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{entry}/cmdline", "rb") as f:
          spawned = b"spawn_main" in f.read()
      except OSError:
        continue
      if ppid == me and spawned:
        out.add(int(entry))
  return out


def cpu_seconds(pids) -> float:
  """User + system CPU seconds of processes (from /proc/PID/stat)."""
  total = 0
  for pid in pids:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    total += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14, 15).
  return total / os.sysconf("SC_CLK_TCK")


class Pipeline:
  """A started Grain stream, timed in chunks of `batches` elements."""

  def __init__(self, fn, workers: int, images_per_element: int):
    before = spawned_workers()
    self.stream = grain_input.Stream(fn, 10**9, workers)
    self.workers, self.per = workers, images_per_element
    for k in range(2 * workers + 1):  # Spawn (each worker starts on its first element).
      self.stream.read(k)
    self.pids = spawned_workers() - before
    if len(self.pids) != workers:
      raise RuntimeError(f"found {len(self.pids)} worker processes, expected {workers}.")

  def rate(self, batches: int, sink: np.ndarray | None = None) -> dict:
    """Over `batches` elements: images/s (wall), images per CPU-second of the workers, and
    CPU-seconds this (consuming) process spent per image. With `sink`, each batch's images
    are also copied there (the host-to-device copy reads them once in a training step)."""
    # Drain what was prefetched while other pipelines ran, then time steady state.
    for _ in range(6 * max(self.workers, 1)):  # Queue, interleave buffer, in flight.
      self.stream.read(self.stream.position)
    t, cpu, own = time.perf_counter(), cpu_seconds(self.pids), time.process_time()
    for _ in range(batches):
      element = self.stream.read(self.stream.position)
      if sink is not None:
        np.copyto(sink, element[0])
    images = batches * self.per
    wall, own = time.perf_counter() - t, time.process_time() - own
    workers_cpu = cpu_seconds(self.pids) - cpu
    return dict(wall=images / wall, per_cpu=images / max(workers_cpu, 1e-9),
                consumer_cpu_per_image=own / images)

  def close(self):
    self.stream.close()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=128, help="distinct JPEGs generated")
  parser.add_argument("--batch", type=int, default=32, help="images per pipeline element")
  parser.add_argument("--batches", type=int, default=40, help="elements per timed chunk")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--transfer_batch", type=int, default=256,
                      help="images per element in the transfer-only measurement")
  parser.add_argument("--out", default=str(common.RESULTS / "input_pipeline.json"))
  args = parser.parse_args(argv)

  rng = np.random.default_rng(0)
  jpegs = [textured_jpeg(rng) for _ in range(args.images)]
  kb = np.mean([len(j) for j in jpegs]) / 1000
  print(f"{len(jpegs)} JPEGs, 500x375, mean {kb:.1f} KB; load average {common.load_average()}")
  source = MemorySource(jpegs, 1_000_000)
  records = np.arange(len(source))
  train_fn = grain_input.TrainBatches(source, records, args.batch, seed=0, aug=AUG, fill=FILL,
                                      image_size=SIZE, rows=np.arange(args.batch))
  eval_fn = grain_input.EvalBatches([grain_input.TfdsImages(source, records, SIZE)], args.batch)

  pipelines = {(kind, w): Pipeline(fn, w, args.batch)
               for kind, fn in (("train", train_fn), ("eval", eval_fn)) for w in (1, 2)}
  pipelines[("transfer", 2)] = Pipeline(ReadyBatches(args.transfer_batch), 2, args.transfer_batch)
  sink = np.empty((args.transfer_batch, SIZE, SIZE, 3), np.uint8)
  serial_count = args.batch * args.batches // 2
  raw: dict[str, list] = {}
  loads = [common.load_average()]
  for r in range(args.repeats):
    for kind in ("train", "eval"):
      with common.Monitor() as m:
        rate = serial_rate(jpegs, serial_count, kind == "train")
      raw.setdefault(f"{kind}/serial", []).append(dict(rate, others=m.other_frac))
      for w in (1, 2):
        raw.setdefault(f"{kind}/workers={w}", []).append(pipelines[(kind, w)].rate(args.batches))
    raw.setdefault("transfer/workers=2", []).append(
        pipelines[("transfer", 2)].rate(args.batches, sink))
    loads.append(common.load_average())
    print(f"repeat {r + 1}/{args.repeats}: load average {loads[-1]}", file=sys.stderr)
  for p in pipelines.values():
    p.close()

  med = {k: {m: common.median([v[m] for v in vs]) for m in vs[0]} for k, vs in raw.items()}
  summary = {}
  print("\nWall clock (img/s; the machine is shared, see the load averages below):")
  print("| transform | serial | 1 worker | 2 workers | scaling 1 -> 2 | others' CPU (serial) |")
  print("|---|---:|---:|---:|---:|---:|")
  for kind in ("train", "eval"):
    s, w1, w2 = (med[f"{kind}/{c}"] for c in ("serial", "workers=1", "workers=2"))
    print(f"| {kind} | {s['wall']:.0f} | {w1['wall']:.0f} | {w2['wall']:.0f} "
          f"| {w2['wall'] / w1['wall']:.2f}x | {100 * s['others']:.0f}% |")
  print("\nPer CPU-second (img per CPU-s of the process(es) decoding; independent of how much "
        "CPU time others leave us):")
  print("| transform | serial (1 thread) | per worker, 1 worker | per worker, 2 workers "
        "| 2 workers / 1 worker (per CPU-s) | consumer CPU per image |")
  print("|---|---:|---:|---:|---:|---:|")
  for kind in ("train", "eval"):
    s, w1, w2 = (med[f"{kind}/{c}"] for c in ("serial", "workers=1", "workers=2"))
    summary[kind] = dict(serial=s, workers1=w1, workers2=w2,
                         wall_scaling=w2["wall"] / w1["wall"],
                         per_cpu_ratio=w2["per_cpu"] / w1["per_cpu"],
                         per_worker_vs_serial=w2["per_cpu"] / s["per_cpu"])
    print(f"| {kind} | {s['per_cpu']:.0f} | {w1['per_cpu']:.0f} | {w2['per_cpu']:.0f} "
          f"| {w2['per_cpu'] / w1['per_cpu']:.2f} | {1e6 * w2['consumer_cpu_per_image']:.0f} us |")
  t = med["transfer/workers=2"]
  per_image = t["consumer_cpu_per_image"]
  print(f"\ntransfer only ({args.transfer_batch}-image batches from 2 workers, read once by the "
        f"consumer): {t['wall']:.0f} img/s wall; consumer CPU {1e6 * per_image:.1f} us per "
        f"image, i.e. at most {1 / per_image:.0f} img/s per process")
  print(f"load averages (1, 5, 15 min) at start and after each repeat: {loads}")
  out = dict(machine=common.machine(), date=time.strftime("%Y-%m-%d %H:%M:%S"), args=vars(args),
             jpeg_kb_mean=kb, medians=med, summary=summary, load_averages=loads, raw=raw)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
