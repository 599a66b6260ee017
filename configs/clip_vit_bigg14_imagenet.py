r"""Model soups at the paper's headline scale, with open weights: CLIP ViT-bigG/14 (or g/14).

The paper's record (greedy soup of 58 ViT-G/14 fine-tunes, 14 picked, 90.94% ImageNet
top-1) used JFT-3B-pretrained weights that are not public. The open equivalents are
LAION's open_clip giants (architectures from open_clip's model_configs/*.json, vendored
in soup/models/clip.py, trained with GELU, not QuickGELU):
  ViT-bigG-14  image tower 1.845B params (width 1664, 48 layers, 16 heads of 104, MLP 8192),
               2.54B with the text tower; weights: open_clip "laion2b_s39b_b160k".
  ViT-g-14     image tower 1.013B params (width 1408, 40 layers, 16 heads of 88, MLP 6144),
               1.37B in all; weights: open_clip "laion2b_s34b_b88k".
Pick one with the config argument: configs/clip_vit_bigg14_imagenet.py (bigG),
`...:ViT-g-14`, and `:smoke` / `:ViT-g-14,smoke` for the same config on mock data.

Everything else is the CLIP ViT-B/32 recipe of configs/clip_vit_b32_imagenet.py (AdamW,
batch 512, warmup then cosine, LP initialization, the same random search, ImageNet2p
selection), except:
  * sharding_rules: FSDP. Params and both AdamW moments are split over the data axis
    (soup/sharding.py): 12 bytes/param is 22 GB for bigG's image tower; replicated, the
    step's peak is 34 GiB per chip, more than a v4 chip holds (docs/benchmarks.md).
    The sweep and the probe save ingredients in that layout, shard by shard (no gather to
    one host); the evaluate stage and every recipe read them back into it through the one
    averager (soup/soups/average.py, Layout.sharded), each process only its devices' shards.
    The smoke argument runs all six stages on 8 simulated devices and on 2 processes x 4
    devices with the same results rows, each process reading half the ingredient bytes
    (tests/test_fsdp_giants.py).
  * num_members 58 and epochs 4..8: the paper's ViT-G sweep had 58 members, fine-tuned
    "at a batch size of 512 for either 10,000 or 20,000 steps (approximately 4 or 8
    epochs)" at 518 px; we keep open_clip's 224 px (518 px means 1369 tokens instead of
    257 tokens).
  * eval batch 256, learned-soup batch 64: smaller batches for a 1.8B-param tower.
The batch of 512 fits one step on a v4-256 or 4 nodes of 8 H100s; a v4-8 holds 24 images
per step (memory plan below), so run v4-8 members with --config.finetune.batch_size=24.
Memory plan (per-chip bytes, smallest slice): docs/benchmarks.md, "Giant models".

Prepare as for configs/clip_vit_b32_imagenet.py, with the bigG state dict in
~/checkpoints/clip/ViT-bigG-14-laion2b_s39b_b160k.safetensors:
  python -c "import open_clip, safetensors.torch as st; m, _, _ = \
    open_clip.create_model_and_transforms('ViT-bigG-14', pretrained='laion2b_s39b_b160k'); \
    st.save_file(m.state_dict(), 'ViT-bigG-14-laion2b_s39b_b160k.safetensors')"
Run (each member a SkyPilot managed job on its own spot v4-8, scripts/sky/ has the task):
  python scripts/launch_sweep.py --config=configs/clip_vit_bigg14_imagenet.py --mode=sky \
      --accelerator=tpu-v4-8 --bucket=my-soup-work --data_bucket=my-soup-data
Smoke (tiny CLIP width, same rules, mock data; needs `python -m soup.data.imagenet_mock`):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m soup.main \
      --config=configs/clip_vit_bigg14_imagenet.py:smoke --workdir=/tmp/soup_bigg_smoke
  # Or 2 processes x 4 devices (run both, PROCESS=0 and 1; about 2.5 minutes on 2 cores):
  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_COORDINATOR_ADDRESS=127.0.0.1:8476 \
      JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$PROCESS python -m soup.main --distributed \
      --config=configs/clip_vit_bigg14_imagenet.py:smoke --workdir=/tmp/soup_bigg_smoke_2p
Expected: every stage runs (accuracies near 0: the mock data's 1000 classes are random);
the two runs' results.jsonl rows agree, and each process's reads.process<k>.json shows half
the ingredient bytes of the single process's.
"""

from configs import clip_vit_b32_imagenet as base

GIANTS = {
    "ViT-bigG-14": "~/checkpoints/clip/ViT-bigG-14-laion2b_s39b_b160k.safetensors",
    "ViT-g-14": "~/checkpoints/clip/ViT-g-14-laion2b_s34b_b88k.safetensors",
}
SHARDING_RULES = ((".*", 'fsdp(axis="data")'),)


def get_config(arg: str = ""):
  """arg: "", "ViT-g-14", "smoke" or "ViT-g-14,smoke" (default variant: ViT-bigG-14)."""
  parts = [p.strip() for p in arg.split(",") if p.strip()]
  variants = [p for p in parts if p in GIANTS]
  unknown = [p for p in parts if p not in GIANTS and p != "smoke"]
  if unknown or len(variants) > 1:
    raise ValueError(f"Unknown config argument {arg!r}: use '', 'smoke', one of {list(GIANTS)} "
                     "or '<variant>,smoke'.")
  variant = variants[0] if variants else "ViT-bigG-14"
  smoke = "smoke" in parts
  c = base.get_config("smoke" if smoke else "")
  with c.unlocked():
    c.experiment = f"clip_{variant.lower().replace('-', '_')}_imagenet"
    c.sharding_rules = SHARDING_RULES
    c.model.update(act="gelu")  # LAION's giants; QuickGELU would silently change every feature.
    if smoke:  # The tiny mock CLIP (soup.data.imagenet_mock), sharded by the same rules.
      c.model.update(variant="tiny")
    else:
      c.model.update(variant=variant)
      c.init.update(path=GIANTS[variant])
      c.sweep.update(num_members=58, epochs=(4, 8))
      c.eval.update(batch_size=256)
      c.soups.learned.update(batch_size=64)
  c.lock()
  return c


def get_sweep(config) -> list[dict]:
  """The random search of configs/clip_vit_b32_imagenet.py, with this config's ranges."""
  return base.get_sweep(config)
