"""The weight-decay mask of the train step: "all" is torch AdamW over every parameter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soup import train

CLASSES = 3


def tiny_model_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"dense": {"kernel": rng.normal(size=(4, CLASSES)).astype(np.float32),
                    "bias": rng.normal(size=(CLASSES,)).astype(np.float32)},
          "norm": {"scale": (1 + 0.1 * rng.normal(size=(4,))).astype(np.float32)}}


def apply_fn(params, x):
  return (x * params["norm"]["scale"]) @ params["dense"]["kernel"] + params["dense"]["bias"]


def make_step(mask):
  return train.make_train_step(apply_fn, CLASSES, augment_fn=lambda key, x, strength: x,
                               preprocess_fn=lambda x: x, grad_clip=1e9,
                               weight_decay_mask=mask)


def batch(seed):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(8, 4)).astype(np.float32), rng.integers(0, CLASSES, 8)


@pytest.mark.parametrize("mask,decayed", [("all", {"kernel", "bias", "scale"}),
                                          ("matrices", {"kernel"})])
def test_mask_decays_exactly_the_chosen_tensors(mask, decayed):
  # With a zero learning signal (constant logits) Adam's update is 0, so one step
  # multiplies each decayed tensor by exactly 1 - lr * wd and leaves the rest alone.
  zero_apply = lambda p, x: 0.0 * apply_fn(p, x)
  init_state, step = train.make_train_step(zero_apply, CLASSES, augment_fn=lambda k, x, s: x,
                                           preprocess_fn=lambda x: x, grad_clip=1e9,
                                           weight_decay_mask=mask)
  params = tiny_model_params()
  hyper = train.Hyper(lr=0.5, weight_decay=0.25, total_steps=10)
  lr = float(train.learning_rate(jnp.zeros((), jnp.int32), hyper.as_arrays()))
  state, _ = jax.jit(step)(init_state(params), *batch(0), hyper.as_arrays(), 0)
  for group, leaves in params.items():
    for name, before in leaves.items():
      factor = np.float32(1 - lr * 0.25) if name in decayed else np.float32(1)
      np.testing.assert_allclose(state["params"][group][name], before * factor, rtol=1e-6,
                                 err_msg=f"{group}/{name}")


def test_all_matches_torch_adamw_on_every_parameter():
  torch = pytest.importorskip("torch")
  params = tiny_model_params(1)
  hyper = train.Hyper(lr=0.05, weight_decay=0.3, total_steps=6, warmup_steps=2)
  init_state, step = make_step("all")
  step = jax.jit(step)
  state = init_state(params)

  # The official recipe: torch.optim.AdamW over every parameter (finetune.py), with the
  # learning rate set by hand each step to our schedule.
  ref = {f"{g}.{n}": torch.nn.Parameter(torch.tensor(v)) for g, d in params.items()
         for n, v in d.items()}
  opt = torch.optim.AdamW(list(ref.values()), lr=0.05, weight_decay=0.3)
  for i in range(hyper.total_steps):
    x, y = batch(10 + i)
    lr = float(train.learning_rate(jnp.asarray(i), hyper.as_arrays()))
    state, _ = step(state, x, y, hyper.as_arrays(), 0)
    for group in opt.param_groups:
      group["lr"] = lr
    opt.zero_grad()
    logits = ((torch.tensor(x) * ref["norm.scale"]) @ ref["dense.kernel"] + ref["dense.bias"])
    torch.nn.functional.cross_entropy(logits, torch.tensor(y)).backward()
    opt.step()
  for key, value in ref.items():
    group, name = key.split(".")
    np.testing.assert_allclose(state["params"][group][name], value.detach().numpy(),
                               rtol=2e-5, atol=2e-6, err_msg=key)


def test_one_compile_serves_members_with_different_weight_decay():
  init_state, step = make_step("all")
  step_jit = jax.jit(step)
  for wd in (0.0, 0.1, 0.6):
    hyper = train.Hyper(lr=1e-3, weight_decay=wd, total_steps=4)
    step_jit(init_state(tiny_model_params()), *batch(0), hyper.as_arrays(), 1)
  assert step_jit._cache_size() == 1


def test_unknown_mask_is_rejected_up_front():
  with pytest.raises(ValueError, match=r"weight_decay_mask must be one of \('all', 'matrices'\)"):
    make_step("norms")
