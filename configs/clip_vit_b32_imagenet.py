r"""Model soups at paper scale: CLIP ViT-B/32 fine-tuned on ImageNet (Table 1).

The recipe of the paper's 72 CLIP ViT-B/32 models: model_0 is a linear probe
(LP) on the frozen CLIP image tower (the paper's "LP initialization";
--config.probe.kind=zeroshot starts from CLIP's zero-shot head instead, as the
released finetune.py does), then 71 full fine-tunes start from it, each with
its own random hyperparameters: AdamW (decoupled weight decay on every
parameter), batch size 512, 500 warmup steps then cosine decay to 0, gradient
clipping at 1, on ImageNet train minus the 26,000 held-out images (ImageNet2p),
at 224 px. Selection uses ImageNet2p; results are on ImageNet val and the five
shifts.

Where the official code (github.com/mlfoundations/model-soups, commit d5398f1)
and a common alternative differ, the default is the official behaviour:
  finetune.weight_decay_mask  "all": finetune.py line 113 hands every parameter
      to torch.optim.AdamW (LayerNorm, biases, class embedding, head bias
      included); "matrices" decays tensors of rank >= 2 only.
  soups.greedy_tie_order  "reversed": main.py lines 152-153 sort ascending
      (stable), then reverse, so tied models come in reverse listed order (the
      released results tie model_4 and model_5); "listed" keeps listed order.
      The greedy ensemble uses the same order.
  soups.greedy_comparison  ">": main.py line 181; the paper's text says ">=".
  probe (model_0, the "LP initialization")  trained to convergence: full-batch
      L-BFGS logistic regression on cached features, its L2 strength chosen from
      probe.l2_grid on a held-out probe.validation_fraction of the examples, then
      refit on all (soup/linear_probe.py). The release has no LP code; a fixed
      budget of Adam steps from a zero head stops far short of the optimum.

The random search (get_sweep) is fitted to the paper's released
hparam_info.json (71 members; model_0 is the LP):
  lr            log-uniform [1e-6, 1e-4]: the file's 71 values span 1.0006e-6 to
                9.995e-5, and a Kolmogorov-Smirnov test does not reject
                log-uniformity (p = 0.26).
  weight decay  log-uniform [7e-5, 0.6]: the file spans 8.2e-5 to 0.527 (3.81
                decades; 4 values below 1e-4 and 3 above 0.5, so not the
                "about [1e-4, 0.5]" of the README); the unbiased range estimate
                for 71 uniform draws adds span/70 = 0.054 decades at each end,
                [7.2e-5, 0.60], rounded outwards (KS p = 0.75).
  epochs        uniform integer 4..16: all 13 values occur (2 to 8 times each).
  smoothing     0 with probability 0.5 (39 of 71 are 0), else U(0, 0.23): the 32
                non-zero values reach 0.225; U(0, 0.25) would keep all 32 below
                that only 3.5% of the time.
  mixup         0 with probability 0.5 (39 of 71), else U(0, 0.9) (max 0.875).
                Zero smoothing and zero mixup look independent (23 members have
                both; independence predicts 21).
  aug           None with probability 0.38 (27 of 71), else rand-m{M}-n{N} with M
                uniform in 1..20 (44 draws cover all but 11 and 13) and N in
                {0, 1, 2} with probabilities 0.48, 0.41, 0.11 (21, 18, 5 of 44:
                not uniform, which would give 5 or fewer n2 with p ~ 0.001).
                n0 applies no RandAugment op, only timm's crop and flip; m > 10
                acts as 10 (timm clips magnitudes; soup/data/randaugment.py).
  Also in the file: model_4 and model_5 have identical hyperparameters (a
  random sampler would not repeat them; we do not reproduce that).
Augmentation is host-side (soup/data/imagenet.py): aug None trains on CLIP's
eval preprocessing (finetune.py without --timm-aug), a RandAugment string on
timm's transforms_imagenet_train (random-resized crop, flip, RandAugment).

Prepare once (see soup/data/imagenet.py for each dataset's `tfds build` command):
  TFDS array_record: imagenet2012, imagenet_v2/matched-frequency, imagenet_sketch,
  imagenet_r, imagenet_a in $TFDS_DATA_DIR; ObjectNet 1.0 unpacked in
  ~/data/objectnet-1.0; CLIP weights (soup/models/pretrained.py says how) in
  ~/checkpoints/clip/ViT-B-32-openai.safetensors and the BPE vocabulary in
  ~/checkpoints/clip/bpe_simple_vocab_16e6.txt.gz; then the held-out list, the paper's own
  (imagenet_98_idxs.npy from github.com/mlfoundations/model-soups; without the flag: ours):
    python scripts/make_imagenet_heldout.py --data_dir=$TFDS_DATA_DIR \
        --official_mask=imagenet_98_idxs.npy
Run (the 71 members are independent: one process, GPU or TPU slice each):
  python scripts/launch_sweep.py --config=configs/clip_vit_b32_imagenet.py \
      --workdir=workdirs/clip_vit_b32 --mode=local --parallel=8 --gpus=0,1,2,3,4,5,6,7
or everything in one process:
  python -m soup.main --config=configs/clip_vit_b32_imagenet.py --workdir=workdirs/clip_vit_b32
Smoke (the same code on tiny mock data and a tiny random CLIP; ~3 min on 2 CPU cores,
chance-level accuracies since the mock images are random):
  python -m soup.data.imagenet_mock --out=/tmp/soup_imagenet_mock
  python -m soup.main --config=configs/clip_vit_b32_imagenet.py:smoke --workdir=/tmp/soup_clip_smoke

Expected (paper Table 1, CLIP ViT-B/32, ImageNet top-1 / average over the 5 shifts):
  best individual 80.38 / 47.83     uniform soup 79.97 / 51.45
  greedy soup 81.03 / 50.75         learned soup 80.89 / 51.07
  learned soup by layer 81.37 / 50.87   ensemble 81.19 / 50.77
  greedy ensemble 81.90 / 49.44     (LP initialization model_0: 75.57 on ImageNet)
Our random search differs from theirs in its draws (and our held-out images
from theirs unless the list is made with --official_mask), so expect the
same ordering within a few tenths, not the same digits.
"""

import json
from pathlib import Path

import ml_collections as mlc

from soup import layout, recipes, sweep

SMOKE_ROOT = "/tmp/soup_imagenet_mock"  # Where `python -m soup.data.imagenet_mock` writes.
# The released models' hyperparameters (model-soups repo), the ":released" argument's sweep;
# relative to the repository root, so that the workdir's config.json does not pin a checkout.
RELEASED_HPARAMS = "tests/data/paper/hparam_info.json"
REPO_ROOT = Path(__file__).resolve().parents[1]


def get_config(arg: str = ""):
  """arg: "" (paper scale) or "smoke" (the same config on tiny mock data); "released" (or
  "released,smoke") evaluates and soups the paper's own 72 released models instead of training
  (scripts/import_official.py puts them in the workdir; README, "Reproduce Table 1 from the
  released checkpoints")."""
  parts = set(arg.split(",")) - {""}
  if not parts <= {"smoke", "released"}:
    raise ValueError(f"Unknown config argument {arg!r}: use '', 'smoke', 'released' or "
                     "'released,smoke'.")
  c = mlc.ConfigDict()
  c.experiment = "clip_vit_b32_imagenet"
  c.seed = 0
  c.stages = layout.STAGES

  c.data = dict(
      name="imagenet",
      data_dir="",                 # TFDS data_dir; "" -> $TFDS_DATA_DIR or ~/tensorflow_datasets.
      objectnet_dir="~/data/objectnet-1.0",
      imagenet_v2_variant="matched-frequency",
      heldout_file="",             # "" -> soup/data/imagenet2012_heldout.npz (committed).
      heldout_per_class=26,        # 26,000 images: the paper's ImageNet2p.
      heldout_in_memory=True,      # Decoded once (3.9 GB): greedy soup reads it 72 times.
      split_seed=0,                # Order of the linear probe's examples.
      image_size=224,
      normalization="clip",        # CLIP's mean/std, in jit.
      num_workers=-1,              # Grain decoding processes; -1: one per core, 0: in-process.
      # JPEG draft decode in the training crop (never in eval): off = timm's exact pixels; on
      # only speeds up crops >= 2x image_size (no ImageNet-typical 500x375 crop at 224 px).
      train_jpeg_draft=False,
      # Official (off): their ObjectNet loader is built before the 2-px crop is added, so
      # the released numbers saw uncropped images (soup/data/objectnet.py cites the code).
      objectnet_border_crop=False,
      cache_dir="",                # Label cache; "" -> ~/.cache/soup/labels.
  )
  c.model = dict(name="clip", variant="ViT-B/32")
  c.init = dict(source="pretrained", path="~/checkpoints/clip/ViT-B-32-openai.safetensors",
                bpe_path="~/checkpoints/clip/bpe_simple_vocab_16e6.txt.gz")
  # Empty: nothing is pretrained here (init.source "pretrained"); the block stays in the
  # schema, without placeholder values that no run could use (soup/validate.py refuses them).
  c.upstream = dict()
  # model_0. The LP sees `examples` fine-tuning images, held in host memory as uint8
  # (150 KB each at 224 px: 100,000 -> 15 GB); the paper's LP used all of train and does
  # not give its settings, so these are ours: check model_0 against the paper's
  # (ImageNet2p 78.08, ImageNet 75.57) before the sweep.
  # L-BFGS to convergence (soup/linear_probe.py): L2 per decade (unit-norm CLIP features want
  # little), chosen on a held-out 10% of the examples, then refit on all of them; a choice at
  # an end of the grid adds the next decade past it, at most l2_bracket times.
  c.probe = dict(kind="linear_probe", examples=100_000,
                 l2_grid=(1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3), l2_bracket=4,
                 validation_fraction=0.1,
                 max_iterations=1000, tolerance=1e-6)
  c.finetune = dict(batch_size=512, warmup_steps=500, grad_clip=1.0, checkpoint_every_steps=1000,
                    log_every_steps=50,
                    weight_decay_mask="all")  # Official: AdamW on every parameter (docstring).
  c.sweep = dict(
      num_members=71, seed=0,
      only="",                          # Comma-separated member indices (1-based) to run here.
      lr=(1e-6, 1e-4),                  # Log-uniform.
      weight_decay=(7e-5, 0.6),         # Log-uniform.
      epochs=(4, 16),                   # Uniform integer, inclusive.
      label_smoothing=(0.0, 0.23), p_zero_smoothing=0.5,
      mixup=(0.0, 0.9), p_zero_mixup=0.5,
      p_no_aug=0.38,
      randaug_m=(1, 20),                # Uniform integer, inclusive.
      randaug_n_probs=(0.48, 0.41, 0.11),  # P(N = 0, 1, 2).
  )
  # group_size: models evaluated together on one decode of each split; 0: as many as the
  # devices hold (all 72 ViT-B/32s, 25 GB, on one 80 GB GPU).
  c.eval = dict(batch_size=1024, group_size=0)
  # The paper's recipes (soup/recipes.py declares their settings and defaults); model_0 is one
  # of the paper's 72 ingredients, and greedy soups compare as the official code.
  c.soups = recipes.default_soups_config(
      ("best_individual", "uniform_soup", "greedy_soup", "learned_soup", "learned_soup_by_layer",
       "ensemble", "greedy_ensemble", "wise_ft", "model_stock"))
  c.soups.learned.update(epochs=5)

  if "smoke" in parts:
    c.data.update(data_dir=f"{SMOKE_ROOT}/tfds", objectnet_dir=f"{SMOKE_ROOT}/objectnet-1.0",
                  heldout_file=f"{SMOKE_ROOT}/imagenet2012_heldout.npz", heldout_per_class=1,
                  image_size=32, num_workers=2, cache_dir=f"{SMOKE_ROOT}/label_cache")
    c.model.update(variant="tiny")
    c.init.update(path=f"{SMOKE_ROOT}/tiny_clip.safetensors",
                  bpe_path=f"{SMOKE_ROOT}/tiny_bpe.txt.gz")
    c.probe.update(examples=64)
    c.finetune.update(batch_size=32, warmup_steps=2, checkpoint_every_steps=8, log_every_steps=4)
    c.sweep.update(num_members=2, epochs=(1, 1))
    c.eval.update(batch_size=64)
    c.soups.learned.update(epochs=1, batch_size=64)
    c.soups.wise_ft.update(alphas=(0.0, 0.5, 1.0))
  if "released" in parts:
    # model_0..model_71 are the release's files, imported into the workdir: nothing trains, so
    # only the stages that read models run. The marker keeps trained and released models apart
    # (a workdir of the other kind is refused). Use the official held-out list (the docstring's
    # --official_mask): it is what chose the released greedy soup.
    c.stages = layout.EVAL_STAGES
    c.released = dict(release="model-soups v0.0.2", hparams=RELEASED_HPARAMS)
  c.lock()
  return c


def get_sweep(config) -> list[dict]:
  """One dict of hyperparameters per member (see the module docstring), seeded by sweep.seed.

  Keys: lr, weight_decay, epochs, label_smoothing, mixup, aug_strength (0: the
  in-jit augmentation is the identity for ImageNet), aug (RandAugment string or
  None), seed. Draws happen in a fixed order per member, so adding members
  never changes the earlier ones.
  """
  s = config.sweep
  if "released" in config:
    return released_members(config.released.hparams)[:s.num_members]
  draw = sweep.Sampler(s.seed)
  members = []
  for i in range(s.num_members):
    lr = draw.log_uniform(*s.lr)
    weight_decay = draw.log_uniform(*s.weight_decay)
    epochs = draw.integer(*s.epochs)
    smoothing = draw.zero_or_uniform(s.p_zero_smoothing, *s.label_smoothing, draw_first=True)
    mixup = draw.zero_or_uniform(s.p_zero_mixup, *s.mixup, draw_first=True)
    m = draw.integer(*s.randaug_m)
    n = draw.choice(s.randaug_n_probs)
    aug = None if draw.chance(s.p_no_aug) else f"rand-m{m}-n{n}"
    members.append(dict(lr=lr, weight_decay=weight_decay, epochs=epochs, label_smoothing=smoothing,
                        mixup=mixup, aug_strength=0.0, aug=aug,
                        seed=sweep.member_seed(s.seed, i)))
  return members


def released_members(path: str) -> list[dict]:
  """model_1..model_71's hyperparameters from the release's hparam_info.json, in get_sweep's
  format. It has no per-member seed; nothing is trained from these, so seed is -1."""
  info = json.loads((REPO_ROOT / path).read_text())
  return [dict(lr=float(h["lr"]), weight_decay=float(h["wd"]), epochs=int(h["epochs"]),
               label_smoothing=float(h["smoothing"]), mixup=float(h["mix"]), aug_strength=0.0,
               aug=h["aug"], seed=-1)
          for h in (info[f"model_{k}"] for k in range(1, len(info)))]
