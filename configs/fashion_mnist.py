r"""Model soups on Fashion-MNIST: the embedded default experiment.

The pretrained start: a tiny hybrid ViT (a 3x3 conv stem of 16 channels, then
patch 7, width 64, depth 4; 252k parameters), pretrained by this project
self-supervised, as CLIP never saw ImageNet's labels: SimCLR (soup/contrastive.py;
InfoNCE at temperature 0.2 over two views: random-resized crop, flip, brightness
and contrast jitter; batch 256, 12 epochs) on the 58,000 training images that
are not held out, fine-tuning images included, no label read. It took 936 s on
2 cores beside other jobs, so it was done once and shipped:
soup/models/weights/fashion_mnist_vit.npz (its .json holds the sha256, the
config and the command; scripts/pretrain_upstream.sh re-makes it,
`:upstream_here` pretrains it in the run). A linear probe on the 15,000 labeled
fine-tuning images gives model_0, the shared initialization; a random search of
12 full fine-tunes (2-3 epochs) starts from it; then every soup and baseline is
evaluated on held-out, test and five shifts, with paired bootstrap intervals
against the best individual, the paper's claims, and two analysis figures.

Why this start (experiments/README.md, "A start that has not seen the labels"):
the earlier start, supervised on the 10 classes (`:supervised_upstream`), already
solved the task and fine-tuning had nothing to add (34 of 36 fine-tunes ended
below it). This one leaves fine-tuning the work, as in the paper.

Run (from a prepared dataset):
  python -m soup.main --config=configs/fashion_mnist.py --workdir=workdirs/fashion_mnist
Smoke (same code path, a tiny model pretrained in the run, about a minute idle):
  python -m soup.main --config=configs/fashion_mnist.py:smoke --workdir=/tmp/soup_smoke
Ablations (same command, a config argument; combine with commas, e.g. narrow_lr,smoke):
  :supervised_upstream  the earlier default's start, supervised on the 10 classes over
                        48,000 images (fashion_mnist_vit_supervised.npz), 10,000 to fine-tune;
  :weak_upstream        a weak supervised start pretrained in the run (4 coarse classes,
                        30,000 images, 3 epochs);
  :narrow_lr            sweep lr in [1e-3, 3e-3] instead of [5e-4, 5e-3];
  :low_lr               sweep lr in [2e-4, 1e-3].
Expected (5 seeds of the sweep, one shared start; test accuracy %, mean ± std over seeds,
experiments/fashion_mnist_seeds_2026_12_08/aggregate.md, EPYC kind): pixel baseline 83.6 and
initialization 80.8 (the same in every seed); best individual 86.05 ± 0.40, 4.77 to 5.79
points above the initialization in every seed, with 9-12 of 12 fine-tunes above it on
held-out; greedy soup 86.05 ± 0.40 (the best individual alone in all 5 seeds), uniform soup
83.8 ± 0.7, learned soup (by layer) 85.1 ± 0.3, ensemble 85.9 ± 0.4. Shift average:
initialization 42.4, best individual 48.3 ± 1.9, greedy soup the same, uniform soup 49.7 ±
0.2, learned soup (by layer) 50.6 ± 0.2. Seed 0's results digest on the EPYC kind:
55e7ecd8... (README, "Where a rerun gives the same digits").
Another CPU kind differs in the sweep's last bits. About 6.5 minutes on an idle 2-core Xeon
(390 s for seed 0 of the earlier code; 416 s from a fresh clone with set-up). On the EPYC kind,
with soup.main's host allocator (soup/memory.py), 346-350 s with the compilation cache warm
(probe 18-24 s, sweep 193-199 s, evaluation 34-35 s, soups 62-64 s, report 29-31 s) and
425-473 s from a fresh clone (cold cache; 457-511 s with set-up): docs/benchmarks.md.
Overrides: --config.sweep.num_members=24 --config.soups.greedy_comparison='>='
  --config.report.analysis=False.
"""

from pathlib import Path

import ml_collections as mlc

from soup import layout, recipes, sweep

ARGS = ("smoke", "supervised_upstream", "weak_upstream", "narrow_lr", "low_lr", "upstream_here")
# The project's own pretrained start (scripts/pretrain_upstream.sh made it; its .json
# beside it holds the sha256, the config and the command).
WEIGHTS = Path(__file__).resolve().parent.parent / "soup/models/weights/fashion_mnist_vit.npz"
# The earlier default's start, supervised on the 10 classes (:supervised_upstream).
SUPERVISED_WEIGHTS = WEIGHTS.with_name("fashion_mnist_vit_supervised.npz")


def get_config(arg: str = ""):
  """arg: comma-separated switches, e.g. "" (the default), "smoke", "weak_upstream,smoke".

  smoke: the same experiment, shrunk for tests (a tiny model pretrained in the run).
  upstream_here: pretrain the upstream in the run instead of loading WEIGHTS, with the
  settings that made WEIGHTS (config.upstream): SimCLR, 12 epochs, 936 s (about 16
  minutes) on 2 cores.
  supervised_upstream: the earlier default's start (SUPERVISED_WEIGHTS), supervised on the
  10 classes, with its splits (10,000 to fine-tune, 48,000 upstream).
  weak_upstream: the first ablation, a weak start pretrained in the run (4 coarse classes,
  30,000 images, 3 epochs). narrow_lr: the sweep-width ablation, lr in [1e-3, 3e-3]
  instead of [5e-4, 5e-3] (members closer together). low_lr: lr in [2e-4, 1e-3], smaller
  steps from model_0 (members nearer the start and each other).
  """
  switches = {a.strip() for a in arg.split(",") if a.strip()}
  unknown = sorted(switches - set(ARGS))
  if unknown:
    raise ValueError(f"Unknown config argument {', '.join(map(repr, unknown))}: use a "
                     f"comma-separated subset of {', '.join(ARGS)}, or nothing.")
  smoke = "smoke" in switches
  c = mlc.ConfigDict()
  c.experiment = "fashion_mnist"
  c.seed = 0
  c.stages = layout.STAGES

  # Data: splits of TFDS fashion_mnist, fixed by split_seed.
  c.data = dict(
      name="fashion_mnist",
      data_dir="",            # "" -> $TFDS_DATA_DIR or ~/tensorflow_datasets.
      idx_dir="/usr/share/datasets/fashion-mnist",
      split_seed=0,
      image_size=28, image_channels=1,
      held_out_examples=2_000,    # Selection (greedy soup, best individual): ImageNet2p's role.
      finetune_examples=15_000,   # Fine-tuning (labeled), disjoint from held-out.
      upstream_examples=43_000,   # The rest of the 60k: upstream only, never scored.
      # The self-supervised upstream also sees the fine-tuning images (no labels read).
      upstream_includes_finetune=True,
      upstream_labels="fine",     # Supervised upstreams: coarse | tops_merged | fine.
      upstream_transform="none",  # none | resample (the upstream sees V2's rendition).
      test_examples=10_000,       # The test split (all of it).
      shift_examples=2_000,       # Per shift split.
  )
  # A hybrid ViT: one 3x3 conv (16 channels) before the 7x7 patches, as the ViT paper's
  # hybrids; 1.3 points over the plain patch embedding at equal upstream (experiments/README).
  c.model = dict(name="vit", patch_size=7, width=64, depth=4, num_heads=4, mlp_dim=256,
                 stem_channels=16)

  # The shared initialization: the project's pretrained upstream, then a linear probe.
  # source "pretrained" loads WEIGHTS; "upstream" trains it here with config.upstream.
  c.init = dict(source="pretrained", path=str(WEIGHTS))
  # SimCLR (soup/contrastive.py): InfoNCE at temperature 0.2 over two views (random-resized
  # crop, flip, brightness and contrast jitter), a projection MLP dropped afterwards.
  c.upstream = dict(objective="simclr", epochs=12, batch_size=256, lr=1e-3, weight_decay=0.05,
                    warmup_steps=200, aug_strength=0.0, temperature=0.2, projection_hidden=256,
                    projection_out=64, crop_min_scale=0.25, jitter=0.4)
  # examples=0: the whole fine-tuning split. L-BFGS to convergence, L2 chosen on a held-out
  # 10% of it (soup/linear_probe.py), as for the paper configs; a choice at an end of the
  # grid adds the next decade past it, at most l2_bracket times.
  c.probe = dict(kind="linear_probe", examples=0, l2_grid=(1e-6, 1e-5, 1e-4), l2_bracket=4,
                 validation_fraction=0.1, max_iterations=1000, tolerance=1e-5)

  # Fine-tuning: shared settings; the sweep varies the rest.
  c.finetune = dict(batch_size=128, warmup_steps=50, grad_clip=1.0, checkpoint_every_steps=100,
                    log_every_steps=20)
  c.finetune.weight_decay_mask = "matrices"  # Rank >= 2 only; "all" as the official finetune.py.
  c.sweep = dict(
      num_members=12, seed=0,
      lr=(5e-4, 5e-3),          # log-uniform; below 1e-4 runs ended under model_0.
      weight_decay=(1e-4, 0.5),  # log-uniform.
      epochs=(2, 3),             # uniform integer, inclusive; 1-epoch runs ended under model_0.
      label_smoothing=(0.0, 0.25), mixup=(0.0, 0.4), aug_strength=(0.0, 0.5),
      p_zero_smoothing=0.5, p_zero_mixup=0.5, p_no_aug=0.25,
      only="",                   # Comma-separated member indices (1-based) to run here.
  )
  # group_size: models evaluated together on one read of each split; 0: as many as fit.
  c.eval = dict(batch_size=500, group_size=0)
  # Every recipe, its settings at their defaults (soup/recipes.py declares them).
  c.soups = recipes.default_soups_config(
      ("pixel_linear", "best_individual", "uniform_soup", "greedy_soup", "learned_soup",
       "learned_soup_by_layer", "ensemble", "greedy_ensemble", "wise_ft", "model_stock"))
  # The report: paired bootstrap intervals, the claims, and the analysis figures
  # (error landscape on a landscape_grid^2 lattice of the plane, scored on the first
  # landscape_examples held-out images; soups by ingredients). analysis=False skips them.
  c.report = dict(bootstrap_resamples=2_000, analysis=True, landscape_grid=5,
                  landscape_examples=1_000)

  if "supervised_upstream" in switches:  # The earlier default: a start that knows the labels.
    c.init.update(path=str(SUPERVISED_WEIGHTS))
    c.data.update(finetune_examples=10_000, upstream_examples=48_000,
                  upstream_includes_finetune=False)
    c.upstream.update(objective="supervised", epochs=12, batch_size=128, lr=1e-3,
                      weight_decay=1e-4, warmup_steps=100, aug_strength=0.25)
  if "upstream_here" in switches or "weak_upstream" in switches or smoke:
    c.init.update(source="upstream", path="")
  if "weak_upstream" in switches:  # A weak start: 4 coarse classes, 30k images, 3 epochs.
    c.data.update(finetune_examples=10_000, upstream_examples=30_000, upstream_labels="coarse",
                  upstream_transform="none", upstream_includes_finetune=False)
    c.upstream.update(objective="supervised", epochs=3, batch_size=128, lr=1e-3,
                      weight_decay=1e-4, warmup_steps=100, aug_strength=0.5)
  if "narrow_lr" in switches:
    c.sweep.update(lr=(1e-3, 3e-3))
  if "low_lr" in switches:
    c.sweep.update(lr=(2e-4, 1e-3))
  if smoke:
    c.data.update(upstream_examples=2_000, held_out_examples=500, finetune_examples=1_024,
                  test_examples=1_000, shift_examples=300)
    c.model.update(width=32, depth=1, num_heads=2, mlp_dim=64, stem_channels=4)
    c.upstream.update(epochs=1, warmup_steps=5, batch_size=64)
    c.finetune.update(warmup_steps=2, checkpoint_every_steps=4, log_every_steps=2)
    c.sweep.update(num_members=3, epochs=(1, 1))
    c.soups.learned.update(epochs=1)
    c.soups.wise_ft.update(alphas=(0.0, 0.5, 1.0))
    c.soups.pixel_linear.update(max_iterations=50)
    c.report.update(bootstrap_resamples=200, landscape_grid=3, landscape_examples=200)
  c.lock()
  return c


def get_sweep(config) -> list[dict]:
  """The random search: one dict of hyperparameters per member, seeded.

  Mirrors the paper's space (README of ../shared/paper): lr log-uniform,
  weight decay log-uniform, integer epochs, label smoothing and mixup zero
  half of the time, augmentation off a quarter of the time.
  """
  s = config.sweep
  draw = sweep.Sampler(s.seed)
  return [dict(
      lr=draw.log_uniform(*s.lr),
      weight_decay=draw.log_uniform(*s.weight_decay),
      epochs=draw.integer(*s.epochs),
      label_smoothing=draw.zero_or_uniform(s.p_zero_smoothing, *s.label_smoothing,
                                           draw_first=False),
      mixup=draw.zero_or_uniform(s.p_zero_mixup, *s.mixup, draw_first=False),
      aug_strength=draw.zero_or_uniform(s.p_no_aug, *s.aug_strength, draw_first=False),
      seed=sweep.member_seed(s.seed, i),
  ) for i in range(s.num_members)]
