"""The ImageNet input pipeline on Grain: batches decoded by worker processes.

A pipeline here is an ordered stream of elements `fn(0), fn(1), ...` where
`fn` is a picklable function of the element's index alone (one whole batch
per element): `grain.MapDataset.range(n).map(fn)`, prefetched by
`mp_prefetch` in `num_workers` processes (0: in this process, one thread
ahead). Worker w computes elements w, w + W, w + 2W, ... and Grain interleaves
them back in order, so the stream is the same whatever the worker count, and
an element's bytes depend on its index only (its randomness is seeded from it).

Position. `Stream.read(i)` returns element i. Reading in order just takes the
next element; any other index first moves the workers there (`seek`), by
setting Grain's iterator state to the one it would have after i elements, so
a restarted member that asks for its step continues bit-identically
(tests/test_imagenet_data.py).

Processes are spawned (Grain uses the "spawn" context), so `fn` and what it
holds (a TFDS data source, index arrays) are pickled to each worker once,
when the stream starts; a stream costs a few seconds to start and is kept
for as long as its consumer reads from it.
"""

from __future__ import annotations

import atexit
import copy
import logging
import weakref
from typing import Any, Callable, Optional

import numpy as np

log = logging.getLogger(__name__)

_live: "weakref.WeakSet[Stream]" = weakref.WeakSet()


def _mark_flags_parsed() -> None:
  """Grain reads absl flags in its worker machinery; outside an absl app (tests,
  scripts) they were never parsed, so take their defaults."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _state_at(initial: dict, position: int, num_workers: int) -> dict:
  """Grain's iterator state after `position` elements, from the state of a fresh iterator."""
  state = copy.deepcopy(initial)
  if "iterators_in_use_states" not in state:  # No worker processes: one prefetch iterator.
    state["next_index"] = int(position)
    return state
  workers = len(state["iterators_in_use_states"])
  if workers != max(num_workers, 1):
    raise ValueError(f"Grain state holds {workers} workers, the stream has {num_workers}.")
  state["next_index_in_cycle"] = int(position) % workers
  for w, worker_state in enumerate(state["iterators_in_use_states"]):
    worker_state["next_index"] = max(0, -(-(int(position) - w) // workers))  # ceil((p - w) / W)
  state["exhausted"] = [0] * workers
  return state


class Stream:
  """Elements fn(0) .. fn(length - 1), computed ahead by Grain worker processes."""

  def __init__(self, fn: Callable[[int], Any], length: int, num_workers: int,
               buffer_per_worker: int = 2):
    import grain

    _mark_flags_parsed()
    self.fn, self.num_workers, self.length = fn, int(num_workers), int(length)
    read = grain.ReadOptions(num_threads=0 if self.num_workers else 1,
                             prefetch_buffer_size=0 if self.num_workers else buffer_per_worker)
    dataset = grain.MapDataset.range(self.length).map(fn).to_iter_dataset(read)
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=self.num_workers, per_worker_buffer_size=buffer_per_worker))
    log.info("input stream of %s: %s", type(fn).__name__,
             f"{self.num_workers} worker processes" if self.num_workers else "in this process")
    self._iterator = iter(dataset)
    self._initial = self._iterator.get_state()
    self.position = 0  # Index of the element the iterator gives next.
    self.closed = False
    _live.add(self)

  def seek(self, position: int) -> None:
    if not 0 <= position < self.length:
      raise IndexError(f"element {position} outside the stream's {self.length}.")
    if position != self.position:
      self._iterator.set_state(_state_at(self._initial, position, self.num_workers))
      self.position = position

  def read(self, position: int) -> Any:
    """Element `position` (the next one costs nothing extra; others move the workers first)."""
    if self.closed:
      raise RuntimeError("read from a closed input stream.")
    self.seek(position)
    element = next(self._iterator)
    self.position += 1
    return element

  def close(self) -> None:
    if not self.closed:
      self.closed = True
      close = getattr(self._iterator, "close", None)
      if close is not None:
        close()


class StreamSlot:
  """One live Stream at a time: asking for another key closes the current one, which
  bounds the memory of idle worker processes."""

  def __init__(self, num_workers: int):
    self.num_workers = num_workers
    self.stream: Optional[Stream] = None
    self.key: Any = None

  def get(self, key, make: Callable[[], tuple[Callable, int]]) -> Stream:
    """The live stream for `key`, started (and any other closed) when needed."""
    if self.stream is None or self.key != key or self.stream.closed:
      self.close()
      fn, length = make()
      self.stream, self.key = Stream(fn, length, self.num_workers), key
    return self.stream

  def close(self) -> None:
    if self.stream is not None:
      self.stream.close()
      self.stream, self.key = None, None


@atexit.register
def _close_all() -> None:  # Before interpreter teardown, so workers stop cleanly.
  for stream in list(_live):
    stream.close()


# --- Element functions (picklable; run in the workers) -------------------------


class TrainBatches:
  """Element `step`: this host's rows of the global fine-tuning batch of that step.

  Positions: each epoch a permutation of the fine-tuning split seeded by
  (seed, epoch), cut into batches (the last partial one dropped), each batch
  sorted (faster reads). Row r of step s is augmented with
  transforms.row_rng(seed, s, r) (transforms.train_example; jpeg_draft: see there).
  Returns (images [rows, size, size, 3] uint8, labels [rows] int32) for `rows`, this
  host's rows of the global batch.
  """

  def __init__(self, source, finetune_idx: np.ndarray, batch_size: int, seed: int,
               aug: Optional[str], fill: tuple[int, ...], image_size: int, rows: np.ndarray,
               jpeg_draft: bool = False):
    self.source, self.finetune_idx = source, np.asarray(finetune_idx)
    self.batch_size, self.seed, self.aug, self.fill = int(batch_size), int(seed), aug, fill
    self.image_size, self.rows, self.jpeg_draft = int(image_size), np.asarray(rows), jpeg_draft
    self._order: Optional[tuple[int, np.ndarray]] = None  # (epoch, permutation) of the last call.

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_order"}

  def __setstate__(self, state):
    self.__dict__.update(state, _order=None)

  def positions(self, step: int) -> np.ndarray:
    """Positions in the fine-tuning split of step's global batch, sorted."""
    per_epoch = len(self.finetune_idx) // self.batch_size
    if per_epoch == 0:
      raise ValueError(f"{len(self.finetune_idx)} training examples cannot fill a batch of "
                       f"{self.batch_size}.")
    epoch, index = divmod(int(step), per_epoch)
    if self._order is None or self._order[0] != epoch:
      self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(
          len(self.finetune_idx)))
    return np.sort(self._order[1][index * self.batch_size:(index + 1) * self.batch_size])

  def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    from soup.data import randaugment, transforms

    augment = randaugment.from_string(self.aug, self.fill)
    records = self.finetune_idx[self.positions(step)[self.rows]]
    images = np.empty((len(self.rows), self.image_size, self.image_size, 3), np.uint8)
    labels = np.empty((len(self.rows),), np.int32)
    for k, record in enumerate(self.source.__getitems__(records.tolist()) if len(records) else []):
      rng = transforms.row_rng(self.seed, step, self.rows[k])
      images[k] = transforms.train_example(record["image"], self.image_size, rng, augment,
                                           self.jpeg_draft)
      labels[k] = record["label"]
    return images, labels


class TfdsImages:
  """Eval-preprocessed images of a TFDS source's records at `records[positions]`."""

  def __init__(self, source, records: np.ndarray, image_size: int):
    self.source, self.records, self.image_size = source, np.asarray(records), int(image_size)

  def __len__(self) -> int:
    return len(self.records)

  def __call__(self, positions: np.ndarray) -> np.ndarray:
    from soup.data import transforms
    out = np.empty((len(positions), self.image_size, self.image_size, 3), np.uint8)
    for k, record in enumerate(self.source.__getitems__(self.records[positions].tolist())):
      out[k] = transforms.eval_transform(transforms.decode_rgb(record["image"]), self.image_size)
    return out


class FileImages:
  """Eval-preprocessed images of files (ObjectNet), optionally losing a border first."""

  def __init__(self, paths, image_size: int, border: int = 0):
    self.paths, self.image_size, self.border = [str(p) for p in paths], int(image_size), int(border)

  def __len__(self) -> int:
    return len(self.paths)

  def __call__(self, positions: np.ndarray) -> np.ndarray:
    from soup.data import objectnet, transforms
    out = np.empty((len(positions), self.image_size, self.image_size, 3), np.uint8)
    for k, i in enumerate(positions):
      img = objectnet.load_image(self.paths[int(i)], self.border)
      out[k] = transforms.eval_transform(img, self.image_size)
    return out


class EvalBatches:
  """Element k: the k-th batch of the concatenated ordered batches of several image readers
  (each split's last batch may be short), so one worker pool serves every split."""

  def __init__(self, readers: list, batch_size: int):
    self.readers, self.batch_size = readers, int(batch_size)
    self.table = [(r, start, min(len(reader), start + self.batch_size))
                  for r, reader in enumerate(readers)
                  for start in range(0, len(reader), self.batch_size)]
    firsts = np.cumsum([0] + [-(-len(reader) // self.batch_size) for reader in readers])
    self.first_batch = firsts.tolist()  # Element index of reader r's first batch.

  def __len__(self) -> int:
    return len(self.table)

  def __call__(self, k: int) -> np.ndarray:
    r, start, stop = self.table[int(k)]
    return self.readers[r](np.arange(start, stop))
