"""GLUE text classification, read from the standard download layout (`TASK/{train,dev}.tsv`).

The folder is what GLUE's `download_glue_data.py` writes (config.data.glue_dir), so a
user's own download works unchanged. Each task is declared once in GLUE_TASKS
(soup/data/glue_tasks.py): its folder, how its TSV columns are read, its label names, its
GLUE metric and its result columns.

Splits, as the paper's image experiments use ImageNet's:
  held-out  a seeded sample of train (config.data.held_out_examples, data.split_seed):
            the selection split of the greedy soup and the best individual (ImageNet2p's role);
  finetune  the rest of train, or a seeded subsample of it (data.finetune_examples, 0: all);
  dev       GLUE's dev set, the reported split, as in the paper (test labels are private).
GLUE has no distribution-shift sets: the task's Columns have no shifts.

Text crosses into the model as ONE int32 array per batch, [batch, 2, length]: row 0 the
WordPiece ids, row 1 the token types (0 first segment, 1 second), padding id 0 (BERT's),
so the trainer and the evaluator, which pass one array per batch, run text unchanged.
Sentences and pairs are encoded as BERT does ([CLS] a [SEP] b [SEP]) by the checkpoint's
own `tokenizer.json` (the Rust `tokenizers` library; no torch), truncated to
config.data.max_length (longest-first over a pair). Batches are padded to a length bucket
(config.data.length_buckets), not to max_length: SST-2's short sentences do not pay for
RTE's long pairs. Training batches draw examples of similar length together (a shuffled
pool sorted by length, cut into batches whose order is shuffled), a pure function of
(seed, step) so a resumed run replays the same batches; evaluation keeps the split's order.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from soup.data import batching

# GLUE_TASKS too: the task table is read from here as well (tests, older callers).
from soup.data.glue_tasks import GLUE_TASKS, GlueDataError, GlueTask, task_spec  # noqa: F401
from soup.data.task import EvalSplit, Task

log = logging.getLogger(__name__)

PAD_ID = 0  # BERT's [PAD]; the model's attention mask is `ids != PAD_ID`.
POOL_BATCHES = 50  # Training batches drawn together and sorted by length (bucketing).
GET_GLUE = ("download GLUE with the `download_glue_data.py` script of the GLUE baselines "
            "(github.com/nyu-mll/GLUE-baselines) or `tfds`/`datasets` exported to TSV, and set "
            "--config.data.glue_dir=DIR (DIR/SST-2/train.tsv, ...); this project's shared copy "
            "is ../shared/glue")


def task_files(glue_dir: str | os.PathLike, name: str) -> dict[str, Path]:
  spec = task_spec(name)
  folder = Path(os.path.expanduser(str(glue_dir))) / spec.folder
  return {"train": folder / "train.tsv", "dev": folder / spec.dev_file}


def missing_message(data_config) -> Optional[str]:
  """What the GLUE task of data_config lacks on disk, as a message naming the fix; reads no data."""
  glue_dir = str(data_config.get("glue_dir", "") or "")
  if not glue_dir or not Path(os.path.expanduser(glue_dir)).is_dir():
    return f"config.data.glue_dir={glue_dir!r} is not a folder: {GET_GLUE}."
  try:
    files = task_files(glue_dir, data_config.task)
  except GlueDataError as e:
    return str(e)
  absent = [str(p) for p in files.values() if not p.is_file()]
  if absent:
    return (f"GLUE task {data_config.task!r} has no {', '.join(absent)}; the folder "
            f"{glue_dir} lacks it ({GET_GLUE}).")
  tokenizer = str(data_config.get("tokenizer", "") or "")
  if not tokenizer or not Path(os.path.expanduser(tokenizer)).is_file():
    return (f"config.data.tokenizer={tokenizer!r} is not a file: point it at the checkpoint's "
            "tokenizer.json (scripts/get_minilm.sh puts MiniLM's in ~/checkpoints).")
  return None


def read_tsv(path: Path, spec: GlueTask) -> tuple[list[tuple[str, ...]], np.ndarray]:
  """(texts, labels) of one GLUE file; texts are 1- or 2-tuples of strings."""
  texts, labels = [], []
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader) if spec.header else None

    def position(column) -> int:
      if header is None:
        return column
      if column not in header:
        raise GlueDataError(f"{path}: no column {column!r} in its header {header}; is this "
                            f"the GLUE {spec.folder} file?")
      return header.index(column)

    text_at = [position(c) for c in spec.text_columns]
    label_at = position(spec.label_column)
    for number, row in enumerate(reader, start=2 if header else 1):
      if not row:
        continue
      try:
        label = spec.labels[row[label_at].strip()]
        texts.append(tuple(row[i] for i in text_at))
      except (IndexError, KeyError) as e:
        raise GlueDataError(f"{path}:{number}: cannot read a {spec.folder} row ({e!r}); "
                            f"labels must be one of {sorted(spec.labels)}.") from e
      labels.append(label)
  if not labels:
    raise GlueDataError(f"{path} holds no examples.")
  return texts, np.asarray(labels, np.int32)


# --- Tokens -----------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike, max_length: int):
  """The checkpoint's tokenizer.json, truncating pairs longest-first to max_length, no padding."""
  from tokenizers import Tokenizer
  tokenizer = Tokenizer.from_file(str(Path(os.path.expanduser(str(path)))))
  tokenizer.no_padding()
  tokenizer.enable_truncation(max_length=max_length, strategy="longest_first")
  return tokenizer


@dataclasses.dataclass(frozen=True)
class TokenSplit:
  """Tokenized examples of one split: ragged ids and token types, their lengths, labels."""
  ids: list
  types: list
  labels: np.ndarray

  @property
  def lengths(self) -> np.ndarray:
    return np.asarray([len(x) for x in self.ids], np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, indices: Sequence[int]) -> "TokenSplit":
    return TokenSplit([self.ids[i] for i in indices], [self.types[i] for i in indices],
                      self.labels[np.asarray(indices, np.int64)])


def tokenize(tokenizer, texts: Sequence[tuple[str, ...]], labels: np.ndarray) -> TokenSplit:
  singles = [t for t in texts if len(t) == 1]
  if singles and len(singles) != len(texts):
    raise GlueDataError("A GLUE task's rows are all single sentences or all pairs.")
  inputs = [t[0] for t in texts] if singles else [tuple(t) for t in texts]
  encodings = tokenizer.encode_batch(inputs)
  return TokenSplit([np.asarray(e.ids, np.int32) for e in encodings],
                    [np.asarray(e.type_ids, np.int32) for e in encodings], labels)


def bucket_length(longest: int, buckets: Sequence[int]) -> int:
  """The smallest bucket that holds `longest` tokens (the largest bucket is max_length)."""
  for b in buckets:
    if longest <= b:
      return int(b)
  raise ValueError(f"{longest} tokens exceed the largest length bucket {max(buckets)}.")


def pack(split: TokenSplit, indices: Sequence[int], buckets: Sequence[int]) -> np.ndarray:
  """int32 [len(indices), 2, bucket]: ids and token types, padded with PAD_ID to one bucket."""
  length = bucket_length(max(len(split.ids[i]) for i in indices), buckets)
  out = np.full((len(indices), 2, length), PAD_ID, np.int32)
  for row, i in enumerate(indices):
    n = len(split.ids[i])
    out[row, 0, :n], out[row, 1, :n] = split.ids[i], split.types[i]
  return out


def length_buckets(max_length: int, buckets: Sequence[int]) -> tuple[int, ...]:
  """The configured buckets below max_length, then max_length itself."""
  return tuple(sorted({int(b) for b in buckets if b < max_length} | {int(max_length)}))


def bucketed_batch_order(lengths: np.ndarray, batch_size: int, seed: int,
                         epoch: int) -> list[np.ndarray]:
  """One epoch's batches: a seeded permutation cut into pools of POOL_BATCHES batches, each
  pool sorted by length and cut into batches, the batches then shuffled. The last partial
  batch is dropped (batching.steps_per_epoch); a pure function of (seed, epoch)."""
  n = len(lengths)
  per_epoch = batching.steps_per_epoch(n, batch_size)
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(n)[:per_epoch * batch_size]
  pool = POOL_BATCHES * batch_size
  batches = []
  for start in range(0, len(order), pool):
    chunk = order[start:start + pool]
    chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
    batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
  return [batches[i] for i in rng.permutation(len(batches))]


# --- The task ---------------------------------------------------------------------


def _sample(n: int, count: int, seed: int, salt: int) -> np.ndarray:
  return np.sort(np.random.default_rng([seed, salt]).permutation(n)[:count])


class GlueTextTask(Task):
  """One GLUE task, tokenized in memory: held-out and fine-tuning cut from train, dev reported."""

  def __init__(self, data_config):
    self.config = data_config
    self.spec = task_spec(data_config.task)
    self.columns = self.spec.columns
    self.num_classes = len(set(self.spec.labels.values()))
    self.buckets = length_buckets(data_config.max_length, data_config.length_buckets)
    files = task_files(data_config.glue_dir, data_config.task)
    tokenizer = load_tokenizer(data_config.tokenizer, data_config.max_length)
    self.vocab_size = tokenizer.get_vocab_size()
    train_texts, train_labels = read_tsv(files["train"], self.spec)
    dev_texts, dev_labels = read_tsv(files["dev"], self.spec)
    n, held = len(train_labels), data_config.held_out_examples
    if held >= n:
      raise GlueDataError(f"config.data.held_out_examples={held} leaves nothing of "
                          f"{self.spec.folder}'s {n} training examples to fine-tune on.")
    # Held-out: a seeded sample of train; fine-tuning: the rest, or a seeded subsample of it.
    held_idx = _sample(n, held, data_config.split_seed, 0)
    rest = np.setdiff1d(np.arange(n), held_idx)
    want = data_config.finetune_examples or len(rest)
    if want > len(rest):
      raise GlueDataError(f"config.data.finetune_examples={want} > the {len(rest)} training "
                          "examples left after the held-out split; lower it (0: all of them).")
    tune_idx = rest[_sample(len(rest), want, data_config.split_seed, 1)]
    self.finetune = tokenize(tokenizer, [train_texts[i] for i in tune_idx],
                             train_labels[tune_idx])
    self.held_out = tokenize(tokenizer, [train_texts[i] for i in held_idx],
                             train_labels[held_idx])
    self.dev = tokenize(tokenizer, dev_texts, dev_labels)
    digest = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()[:12]  # noqa: E731
    # What every results row carries about the data (read once: rows are made per model).
    self._provenance = {
        "glue_task": data_config.task, "metric": self.spec.metric,
        "selection_split": (f"{len(self.held_out)} examples of {self.spec.folder} train, "
                            f"seeded sample (data.split_seed={data_config.split_seed})"),
        "finetune_examples": len(self.finetune), "max_length": data_config.max_length,
        "data_sha256": {k: digest(p) for k, p in files.items()}}
    self._epochs: dict[tuple[int, int, int], list[np.ndarray]] = {}
    truncated = int(np.sum(self.finetune.lengths >= data_config.max_length))
    log.info("GLUE %s: %d fine-tuning, %d held-out, %d dev examples; %d fine-tuning examples "
             "reach max_length=%d; buckets %s", data_config.task, len(self.finetune),
             len(self.held_out), len(self.dev), truncated, data_config.max_length, self.buckets)

  def provenance(self) -> dict[str, Any]:
    return self._provenance

  def finetune_size(self) -> int:
    return len(self.finetune)

  def finetune_batch(self, batch_size: int, seed: int, step: int,
                     hparams: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    del hparams  # Text has no augmentation here; mixup is refused for integer inputs.
    per_epoch = batching.steps_per_epoch(len(self.finetune), batch_size)
    epoch, index = divmod(step, per_epoch)
    key = (batch_size, seed, epoch)
    if key not in self._epochs:
      self._epochs = {key: bucketed_batch_order(self.finetune.lengths, batch_size, seed, epoch)}
    idx = self._epochs[key][index]
    return pack(self.finetune, idx, self.buckets), self.finetune.labels[idx]

  def finetune_examples(self, count: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(min(count, len(self.finetune)))
    return pack(self.finetune, idx, self.buckets), self.finetune.labels[idx]

  def _split(self, split: TokenSplit) -> EvalSplit:
    def batches(batch_size: int) -> Iterator[np.ndarray]:
      for start in range(0, len(split), batch_size):
        yield pack(split, range(start, min(start + batch_size, len(split))), self.buckets)
    return EvalSplit(labels=split.labels, batches=batches, metric=self.spec.metric)

  def eval_splits(self) -> dict[str, EvalSplit]:
    return {self.columns.held_out: self._split(self.held_out),
            self.columns.test: self._split(self.dev)}

  def preprocess(self, tokens):
    return tokens  # Token ids go to the model as they are.
