"""The GLUE text path: reading GLUE's layout, BERT's pair encoding, length buckets, the task
metrics and their paired intervals, bad input refused before compute, and every stage end to
end on a tiny random BERT and toy TSVs the test writes itself (no ../shared needed)."""

import json
from pathlib import Path

import ml_collections as mlc
import numpy as np
import pytest

from soup import metrics, stats
from soup.data import glue
from tests import glue_fixtures
from tests.conftest import run_python


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  root = tmp_path_factory.mktemp("glue_toy")
  return root, glue_fixtures.write_all(root)


def data_config(toy, task: str, **overrides) -> mlc.ConfigDict:
  _, paths = toy
  fields = dict(name="glue", task=task, glue_dir=paths["data.glue_dir"],
                tokenizer=paths["data.tokenizer"], split_seed=0, held_out_examples=24,
                finetune_examples=0, max_length=24, length_buckets=(8, 16))
  return mlc.ConfigDict({**fields, **overrides})


# --- Reading and encoding -------------------------------------------------------------


def test_each_layout_reads_its_rows_and_labels(toy):
  root, paths = toy
  glue_dir = Path(paths["data.glue_dir"])
  for task, spec in (("sst2", glue.GLUE_TASKS["sst2"]), ("rte", glue.GLUE_TASKS["rte"]),
                     ("cola", glue.GLUE_TASKS["cola"])):
    lines = (glue_dir / spec.folder / "dev.tsv").read_text().splitlines()
    texts, labels = glue.read_tsv(glue_dir / spec.folder / "dev.tsv", spec)
    rows = lines[1:] if spec.header else lines
    assert len(texts) == len(labels) == len(rows) == 48
    first = rows[0].split("\t")
    if task == "sst2":
      assert texts[0] == (first[0],) and labels[0] == int(first[1])
    elif task == "cola":  # No header: label in column 1, sentence in column 3.
      assert texts[0] == (first[3],) and labels[0] == int(first[1])
    else:  # entailment -> 0, not_entailment -> 1.
      assert texts[0] == (first[1], first[2])
      assert labels[0] == (0 if first[3] == "entailment" else 1)


def test_pairs_are_encoded_as_bert_does(toy):
  _, paths = toy
  tokenizer = glue.load_tokenizer(paths["data.tokenizer"], max_length=12)
  vocab = tokenizer.get_vocab()
  split = glue.tokenize(tokenizer, [("The cat sat", "a dog")], np.asarray([0]))
  ids, types = split.ids[0], split.types[0]
  expected = ["[CLS]", "the", "cat", "sat", "[SEP]", "a", "dog", "[SEP]"]
  assert list(ids) == [vocab[w] for w in expected]
  assert list(types) == [0, 0, 0, 0, 0, 1, 1, 1]
  # Truncation is longest-first over the pair and keeps both [SEP]s.
  long = glue.tokenize(tokenizer, [("the cat sat on the mat very quite truly", "a dog")],
                       np.asarray([0]))
  assert len(long.ids[0]) == 12 and long.ids[0][-1] == vocab["[SEP]"]
  assert list(long.types[0]).count(1) == 3


def test_batches_pad_to_buckets_and_evaluation_keeps_order(toy):
  task = glue.GlueTextTask(data_config(toy, "rte"))
  assert task.buckets == (8, 16, 24)
  split = task.eval_splits()[task.columns.test]
  rows = []
  for batch in split.iterate(10):
    assert batch.shape[1] == 2 and batch.shape[2] in task.buckets
    longest = max(int(np.sum(r[0] != glue.PAD_ID)) for r in batch)
    assert batch.shape[2] == glue.bucket_length(longest, task.buckets)
    rows.extend(batch[:, 0].tolist())
  # Every dev example once, in file order.
  assert len(rows) == len(task.dev)
  for row, ids in zip(rows, task.dev.ids):
    assert row[:len(ids)] == list(ids) and not any(row[len(ids):])


def test_training_batches_group_lengths_and_replay_by_seed(toy):
  task = glue.GlueTextTask(data_config(toy, "sst2"))
  lengths = task.finetune.lengths
  order = glue.bucketed_batch_order(lengths, 8, seed=3, epoch=0)
  seen = np.concatenate(order)
  assert len(seen) == len(set(seen.tolist())) == (len(lengths) // 8) * 8  # Each once per epoch.
  again = glue.bucketed_batch_order(lengths, 8, seed=3, epoch=0)
  assert all(np.array_equal(a, b) for a, b in zip(order, again))
  other = glue.bucketed_batch_order(lengths, 8, seed=3, epoch=1)
  assert not all(np.array_equal(a, b) for a, b in zip(order, other))
  # Sorted pools pad less than random batches of the same examples.
  bucketed = sum(lengths[b].max() for b in order)
  rng = np.random.default_rng(0)
  random = sum(lengths[b].max() for b in np.split(rng.permutation(seen), len(order)))
  assert bucketed < random
  x1, y1 = task.finetune_batch(8, 3, 5, {})
  x2, y2 = task.finetune_batch(8, 3, 5, {})
  assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and x1.dtype == np.int32


def test_held_out_and_finetuning_are_disjoint_seeded_parts_of_train(toy):
  task = glue.GlueTextTask(data_config(toy, "sst2", finetune_examples=100))
  assert len(task.held_out) == 24 and len(task.finetune) == 100
  key = lambda s: {tuple(x) for x in s.ids}  # noqa: E731
  # The toy sentences repeat rarely; disjoint index sets give (almost) disjoint texts.
  assert len(key(task.held_out) & key(task.finetune)) <= 2
  again = glue.GlueTextTask(data_config(toy, "sst2", finetune_examples=100))
  assert all(np.array_equal(a, b) for a, b in zip(task.held_out.ids, again.held_out.ids))
  other = glue.GlueTextTask(data_config(toy, "sst2", finetune_examples=100, split_seed=1))
  assert not all(np.array_equal(a, b) for a, b in zip(task.held_out.ids, other.held_out.ids))


# --- Metrics and their intervals -----------------------------------------------------


def test_matthews_and_f1_match_hand_computed_values():
  labels = np.array([1, 1, 1, 0, 0, 0, 0, 1])
  preds = np.array([1, 1, 0, 0, 0, 1, 0, 1])
  # tp=3 tn=3 fp=1 fn=1: MCC = (9 - 1) / sqrt(4*4*4*4) = 0.5; F1 = 6 / 8.
  assert metrics.matthews(preds, labels) == pytest.approx(0.5)
  assert metrics.f1(preds, labels) == pytest.approx(0.75)
  logits = np.eye(2)[preds]
  assert metrics.score("matthews", logits, labels) == pytest.approx(0.5)
  assert metrics.score("accuracy_f1", logits, labels) == pytest.approx((0.75 + 0.75) / 2)
  assert metrics.matthews(np.ones(8, int), labels) == 0.0  # One class predicted: undefined -> 0.
  from sklearn.metrics import f1_score, matthews_corrcoef
  rng = np.random.default_rng(0)
  y, p = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
  assert metrics.matthews(p, y) == pytest.approx(matthews_corrcoef(y, p), abs=1e-12)
  assert metrics.f1(p, y) == pytest.approx(f1_score(y, p), abs=1e-12)


def test_paired_bootstrap_of_matthews():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, 400)
  a = rng.random(400) < 0.85
  b = a.copy()
  b[:40] = ~b[:40]
  interval = stats.paired_bootstrap(a, b, metric="matthews", labels=labels, num_resamples=500)
  point = (metrics.METRICS["matthews"](a, labels) - metrics.METRICS["matthews"](b, labels))
  assert interval.diff == pytest.approx(float(point))
  assert interval.low <= interval.diff <= interval.high
  same = stats.paired_bootstrap(a, a, metric="matthews", labels=labels, num_resamples=100)
  assert same.diff == same.low == same.high == 0.0
  with pytest.raises(ValueError, match="one label per example"):
    stats.paired_bootstrap(a, b, metric="matthews", labels=labels[:10], num_resamples=10)


# --- Bad input: one error line before compute, nothing written -------------------------


def _main(toy, tmp_path, *overrides, config="configs/glue_bert.py:cola,smoke"):
  _, paths = toy
  flags = {**paths}
  args = ["-m", "soup.main", f"--config={config}", f"--workdir={tmp_path / 'wd'}"]
  for item in overrides:
    key, value = item.split("=", 1)
    flags[key] = value
  args += [f"--config.{k}={v}" for k, v in flags.items()]
  return run_python(args, check=False, timeout=300)


@pytest.mark.parametrize("override, expected", [
    ("data.glue_dir=/nonexistent/glue", "download GLUE"),
    ("data.task=mrpc", "GLUE task 'mrpc' has no"),
    ("data.task=mnli2", "data.task must be one of"),
    ("data.max_length=4096", "exceeds the 40 position embeddings"),
])
def test_bad_input_is_one_error_line_before_compute(toy, tmp_path, override, expected):
  proc = _main(toy, tmp_path, override)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
  assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_checkpoint_folder_without_its_files_is_refused(toy, tmp_path, missing):
  import shutil
  _, paths = toy
  folder = tmp_path / "ckpt"
  shutil.copytree(paths["model.checkpoint"], folder)
  (folder / missing).unlink()
  proc = _main(toy, tmp_path, f"model.checkpoint={folder}", f"init.path={folder}")
  assert proc.returncode == 2
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and missing in errors[0] and "get_minilm.sh" in errors[0]
  assert not (tmp_path / "wd").exists()


# --- Every stage, end to end ------------------------------------------------------------


@pytest.mark.slow
def test_glue_smoke_runs_every_stage_and_reports_without_shifts(toy, tmp_path):
  proc = _main(toy, tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  wd = tmp_path / "wd"
  rows = [json.loads(line) for line in (wd / "results.jsonl").read_text().splitlines()]
  by_name = {r["model_name"]: r for r in rows}
  expected = {"model_0", "model_1", "model_2", "model_3", "best_individual", "uniform_soup",
              "greedy_soup", "learned_soup", "learned_soup_by_layer", "ensemble",
              "greedy_ensemble", "model_stock"}
  assert expected <= set(by_name)
  for row in rows:  # Matthews correlation in [-1, 1], no shift columns or average.
    assert -1 <= row["CoLADev"] <= 1 and -1 <= row["CoLAHeldOut"] <= 1
    assert row["avg_shifts"] is None and row["metric"] == "matthews"
  # The greedy soup never loses held-out score against the best individual.
  assert by_name["greedy_soup"]["CoLAHeldOut"] >= by_name["best_individual"]["CoLAHeldOut"]
  # The interval is of Matthews correlation, the best individual's own difference is zero.
  ci = by_name["greedy_soup"]["vs_best_individual"]
  assert ci["avg_shifts"] is None and ci["test"]["low"] <= ci["test"]["diff"] <= ci["test"]["high"]
  report = (wd / "report.md").read_text()
  assert "no distribution shifts for this task" in report
  assert "Avg. shifts" not in report and "Matthews correlation" in report
  from soup import claims
  assert claims.CLAIMS["greedy_under_shift"] not in report
  assert claims.CLAIMS["greedy_in_distribution"] in report
  # The members differ from model_0 and share its head's shape: one start for all.
  hp = [by_name[f"model_{i}"]["hparams"] for i in (1, 2, 3)]
  assert {h["batch_size"] for h in hp} == {8} and all(h["mixup"] == 0 for h in hp)
  # A rerun trains nothing: every stage is cached.
  again = _main(toy, tmp_path)
  assert again.returncode == 0 and "sweep 1/3" not in again.stderr
  assert (wd / "results.jsonl").read_text().count("\n") == len(rows)
