r"""Model soups with a supervised ViT-B/16 pretrained on ImageNet-21k (big_vision .npz).

The paper's CLIP recipe (configs/clip_vit_b32_imagenet.py: same random
search, fitted to its hparam_info.json; AdamW, batch 512, 500 warmup steps,
cosine; the same data, held-out split and shifts) applied to a public
supervised backbone: the ImageNet-21k AugReg ViT-B/16 of Steiner et al.
(2021) from big_vision / vision_transformer. Differences that follow from the
backbone, not from the paper:
  * model_0 is always a linear probe (there is no text tower for a zero-shot
    head); its 21k-class head and pre_logits are dropped on loading, and the
    position embeddings resized to 224 px if the checkpoint was made at another
    size;
  * images are normalized to [-1, 1] (big_vision's value_range), not with CLIP's
    statistics;
  * the MLP activation is "gelu_tanh": big_vision's MlpBlock calls flax
    nn.gelu(x), the tanh approximation (big_vision/models/vit.py, commit
    0127fb6), and the checkpoint was trained with it (soup/models/vit.py);
  * everything else (crop, resize, RandAugment, mixup, smoothing) as for CLIP.

Prepare the data as for CLIP, then the checkpoint (soup/models/pretrained.py):
  gsutil cp gs://vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz \
      ~/checkpoints/vit/
Run:
  python scripts/launch_sweep.py --config=configs/vit_b16_imagenet.py \
      --workdir=workdirs/vit_b16 --mode=local --parallel=8 --gpus=0,1,2,3,4,5,6,7
Smoke (tiny random ViT on the mock data, CPU):
  python -m soup.data.imagenet_mock --out=/tmp/soup_imagenet_mock
  python -m soup.main --config=configs/vit_b16_imagenet.py:smoke --workdir=/tmp/soup_vit_smoke

Expected: the paper reports no soup of this model, so there is no number to
match; its claims to check are qualitative: the greedy soup at least as good
as the best individual on held-out (by construction) and on ImageNet, and the
uniform soup better on the shifts than on ImageNet relative to the individuals.
"""

from configs import clip_vit_b32_imagenet as _CLIP

CHECKPOINT = "~/checkpoints/vit/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz"


def get_config(arg: str = ""):
  """arg: "" (full scale) or "smoke" (the same config on tiny mock data)."""
  c = _CLIP.get_config(arg)
  c.unlock()
  c.experiment = "vit_b16_imagenet"
  c.data.normalization = "inception"
  c.model = dict(name="vit", patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072,
                 activation="gelu_tanh")  # big_vision's nn.gelu default (docstring).
  c.init = dict(source="pretrained", path=CHECKPOINT, bpe_path="")
  c.probe.kind = "linear_probe"
  if arg == "smoke":
    from soup.data import imagenet_mock
    c.model = dict(name="vit", **imagenet_mock.TINY_VIT, activation="gelu_tanh")
    c.init.path = f"{_CLIP.SMOKE_ROOT}/tiny_vit.npz"
  c.lock()
  return c


def get_sweep(config) -> list[dict]:
  """The paper's random search, as for CLIP (see configs/clip_vit_b32_imagenet.py)."""
  return _CLIP.get_sweep(config)
