"""SimCLR upstream (soup/contrastive.py): the loss, the views, and that labels are never read."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from soup import contrastive, train
from soup.data import fashion_mnist
from soup.models.vit import ViT


def _reference_info_nce(z1, z2, temperature):
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  b, losses, hits = len(z1), [], []
  for i in range(2 * b):
    twin = (i + b) % (2 * b)
    logits = np.array([z[i] @ z[j] / temperature for j in range(2 * b) if j != i])
    others = [j for j in range(2 * b) if j != i]
    losses.append(np.log(np.exp(logits).sum()) - logits[others.index(twin)])
    hits.append(others[int(np.argmax(logits))] == twin)
  return np.mean(losses), np.mean(hits)


def test_info_nce_matches_a_direct_computation():
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  loss, acc = contrastive.info_nce(jnp.asarray(z1), jnp.asarray(z2), 0.2)
  want_loss, want_acc = _reference_info_nce(z1, z2, 0.2)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  assert float(acc) == want_acc


def test_info_nce_is_low_when_views_agree_and_chance_when_all_collapse():
  z = jnp.eye(8)
  loss, acc = contrastive.info_nce(z, z, 0.1)
  assert float(acc) == 1.0 and float(loss) < 1e-3
  same = jnp.ones((8, 4))
  loss, _ = contrastive.info_nce(same, same, 0.1)
  np.testing.assert_allclose(float(loss), np.log(15), rtol=1e-5)  # 2B - 1 equal candidates.


def test_full_crop_is_the_identity_and_views_stay_in_range():
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, 28, 28, 1)), jnp.float32)
  same = contrastive.random_resized_crop(jax.random.key(0), images, scale=(1.0, 1.0),
                                         ratio=(1.0, 1.0))
  np.testing.assert_allclose(np.asarray(same), np.asarray(images), atol=1e-3)
  v = contrastive.view(jax.random.key(1), images)
  assert v.shape == images.shape and float(v.min()) >= 0 and float(v.max()) <= 255
  assert not np.allclose(np.asarray(v), np.asarray(images))


@pytest.mark.slow
def test_step_never_reads_labels_and_learns():
  model = ViT(num_classes=0, patch_size=7, width=16, depth=1, num_heads=2, mlp_dim=32)
  images = np.random.default_rng(2).integers(0, 256, (16, 28, 28, 1)).astype(np.uint8)
  features = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  sample = fashion_mnist.normalize(jnp.asarray(images[:2]))
  backbone = model.init(jax.random.key(0), sample)["params"]
  params = contrastive.init_params(backbone, 16, 32, 8, seed=0)
  assert set(params) == set(backbone) | {"projection"}
  init_state, step = contrastive.make_step(features, fashion_mnist.normalize, temperature=0.2,
                                          hidden=32, out=8, grad_clip=1.0,
                                          weight_decay_mask="matrices")
  step = jax.jit(step)
  hp = train.Hyper(lr=3e-3, weight_decay=0.0, total_steps=40, warmup_steps=0).as_arrays()
  a, _ = step(init_state(params), images, np.zeros(16, np.int32), hp, 0)
  b, _ = step(init_state(params), images, np.arange(16, dtype=np.int32), hp, 0)
  assert optax.tree.norm(jax.tree.map(lambda x, y: x - y, a["params"], b["params"])) == 0
  state, losses = init_state(params), []
  for _ in range(40):
    state, metrics = step(state, images, np.zeros(16, np.int32), hp, 0)
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-5:]) < np.mean(losses[:5])
