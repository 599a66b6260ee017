"""The hand-written AdamW step and schedule (soup/train.py) against optax, step by step.

They are hand-written so that lr, weight decay and the schedule's lengths stay
traced arguments (one compile serves the whole sweep); these tests pin them to
optax.adamw, optax.clip_by_global_norm and optax's warmup-cosine schedule.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from soup import mesh as mesh_lib, train

NUM_CLASSES = 3


def _schedule_of(hyper: train.Hyper):
  hp = hyper.as_arrays()
  return lambda step: train.learning_rate(jnp.asarray(step, jnp.int32), hp)


@pytest.mark.parametrize("warmup,total", [(5, 40), (1, 10), (0, 12)])
def test_schedule_is_optax_warmup_cosine_counted_from_one_during_warmup(warmup, total):
  lr = 3e-3
  ours = _schedule_of(train.Hyper(lr=lr, weight_decay=0.0, total_steps=total,
                                  warmup_steps=warmup))
  reference = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, end_value=0.0)
  for step in range(total + 3):
    # Warmup step s uses lr (s + 1) / warmup, as the official model-soups code
    # (WiSE-FT's cosine_lr): optax's count s + 1. The cosine part is optax's as is.
    count = step + 1 if step < warmup else step
    np.testing.assert_allclose(float(ours(step)), float(reference(count)), rtol=1e-6,
                               atol=1e-6 * lr, err_msg=f"step {step}")
  if warmup:
    assert float(ours(warmup - 1)) == pytest.approx(lr)  # Peak reached at the last warmup step.
  assert float(ours(total)) == pytest.approx(0.0, abs=1e-12)


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {"dense": {"kernel": rng.normal(size=(5, NUM_CLASSES)).astype(np.float32),
                      "bias": rng.normal(size=(NUM_CLASSES,)).astype(np.float32)},
            "norm": {"scale": np.ones((5,), np.float32)}}
  images = rng.normal(size=(16, 5)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=16).astype(np.int32)
  return params, images, labels


def _apply(params, x):
  x = x * params["norm"]["scale"]
  return x @ params["dense"]["kernel"] + params["dense"]["bias"]


@pytest.mark.parametrize("grad_clip", [0.05, 100.0])  # Clipping active / inactive.
def test_train_step_matches_optax_adamw(grad_clip):
  params, images, labels = _problem()
  hyper = train.Hyper(lr=0.05, weight_decay=0.3, total_steps=30, warmup_steps=4)
  init_state, step_fn = train.make_train_step(_apply, NUM_CLASSES,
                                              augment_fn=lambda rng, x, s: x,
                                              preprocess_fn=lambda x: x, grad_clip=grad_clip,
                                              weight_decay_mask="matrices")
  step_fn = jax.jit(step_fn)
  hp = hyper.as_arrays()

  # The same optimizer from optax: clip, Adam moments, decoupled weight decay on
  # the decay mask's leaves (rank > 1), the schedule.
  decayed = jax.tree.map(lambda m: m > 0, train.decay_mask(params))
  reference = optax.chain(
      optax.clip_by_global_norm(grad_clip),
      optax.adamw(_schedule_of(hyper), b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.3,
                  mask=decayed))

  def loss_fn(p):
    targets = jax.nn.one_hot(labels, NUM_CLASSES)
    return jnp.mean(optax.softmax_cross_entropy(_apply(p, images), targets))

  @jax.jit
  def reference_step(p, opt_state):
    grads = jax.grad(loss_fn)(p)
    updates, opt_state = reference.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  state = init_state(jax.tree.map(jnp.asarray, params))
  ref_params, ref_state = jax.tree.map(jnp.asarray, params), reference.init(params)
  clipped = 0
  for step in range(30):
    state, metrics = step_fn(state, images, labels, hp, 0)
    ref_params, ref_state = reference_step(ref_params, ref_state)
    clipped += float(metrics["grad_norm"]) > grad_clip
    for (path, ours), theirs in zip(jax.tree_util.tree_flatten_with_path(state["params"])[0],
                                    jax.tree.leaves(ref_params), strict=True):
      np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=2e-6, atol=2e-7,
                                 err_msg=f"step {step} {jax.tree_util.keystr(path)}")
  assert (clipped > 0) == (grad_clip < 1)  # The clip was exercised where intended.


def test_decay_mask_is_rank_above_one():
  params, _, _ = _problem()
  assert train.decay_mask(params) == {"dense": {"kernel": 1.0, "bias": 0.0},
                                      "norm": {"scale": 0.0}}


def test_train_refuses_params_other_than_those_its_step_was_compiled_for(tmp_path):
  params, images, labels = _problem()
  fns = train.make_train_step(_apply, NUM_CLASSES, augment_fn=lambda rng, x, s: x,
                              preprocess_fn=lambda x: x, grad_clip=1.0,
                              weight_decay_mask="matrices")
  step = train.compile_step(fns, params, mesh_lib.make_mesh())
  wider = {**params, "norm": {"scale": np.ones((6,), np.float32)}}
  with pytest.raises(ValueError, match="compiled for"):
    train.train(step=step, params=wider, hyper=train.Hyper(lr=0.1, weight_decay=0.0),
                batch_fn=lambda s: (images, labels), workdir=tmp_path, seed=0)
