"""Shared fixtures and helpers. Tests run on the CPU; multi-device checks run in subprocesses.

Test files import helpers from here (`from tests.conftest import run_python`), never from
another test file.
"""

import math
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(args, env_extra=None, timeout=600, check=True):
  """Runs `python ARGS` from the repo root with the root on PYTHONPATH; returns the
  CompletedProcess. env_extra adds to os.environ; a None value removes that variable."""
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.update(env_extra or {})
  env = {k: v for k, v in env.items() if v is not None}
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"python {' '.join(args)} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return proc


def run_python_together(arg_lists, env_extra=None, timeout=600, check=True):
  """run_python for each ARGS in arg_lists, all at once (e.g. the processes of one
  jax.distributed job); returns their CompletedProcesses in order."""
  with ThreadPoolExecutor(len(arg_lists)) as pool:
    return list(pool.map(lambda args: run_python(args, env_extra, timeout, check), arg_lists))


def free_port() -> int:
  """A TCP port free on localhost now (jax.distributed coordinators in tests)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="session")
def mock_imagenet(tmp_path_factory):
  """The mock ImageNet (soup/data/imagenet_mock.py: TFDS datasets, ObjectNet folder, held-out
  list, tiny CLIP, BPE and ViT), written once per session; its label cache beside it."""
  from soup.data import imagenet_mock as mock_lib
  root = tmp_path_factory.mktemp("imagenet_mock")
  return {**mock_lib.write_all(root), "cache_dir": str(root / "cache")}


@pytest.fixture(scope="session")
def fashion_mnist_ready():
  from soup.data import fashion_mnist_tfds
  try:
    fashion_mnist_tfds.load_arrays()
  except fashion_mnist_tfds.DatasetMissingError as e:
    pytest.fail(f"Fashion-MNIST is not prepared; run scripts/setup.sh. ({e})")
  return True


# --- Tiny CLIP state dicts (test_clip, test_convert, test_fsdp_giants) ---------------------

TINY_CLIP = dict(width=32, layers=2, heads=2, patch=8, image=32, embed=16, text_width=32,
                 text_layers=2, text_heads=2, context=16, vocab=100)
HEAD_WIDTH = 16  # TINY_CLIP's 32-wide towers with 2 heads.


def block_weights(rng, prefix, width, mlp):
  """One residual attention block of random weights, in OpenAI's names and torch layouts."""
  n = lambda *s, std=0.05: (std * rng.standard_normal(s)).astype(np.float32)
  return {
      f"{prefix}.ln_1.weight": 1 + n(width, std=0.1), f"{prefix}.ln_1.bias": n(width),
      f"{prefix}.attn.in_proj_weight": n(3 * width, width, std=0.2),
      f"{prefix}.attn.in_proj_bias": n(3 * width),
      f"{prefix}.attn.out_proj.weight": n(width, width, std=0.2),
      f"{prefix}.attn.out_proj.bias": n(width),
      f"{prefix}.ln_2.weight": 1 + n(width, std=0.1), f"{prefix}.ln_2.bias": n(width),
      f"{prefix}.mlp.c_fc.weight": n(mlp, width, std=0.2), f"{prefix}.mlp.c_fc.bias": n(mlp),
      f"{prefix}.mlp.c_proj.weight": n(width, mlp, std=0.1),
      f"{prefix}.mlp.c_proj.bias": n(width),
  }


def make_state_dict(seed=0, **overrides):
  """A random CLIP ViT state dict with OpenAI's key names and tensor layouts.

  Embedding scales are CLIP-like (small), so LayerNorm inputs have small variance and
  a wrong LayerNorm epsilon (flax's 1e-6 instead of torch's 1e-5) shows up.
  """
  c = {**TINY_CLIP, **overrides}
  rng = np.random.default_rng(seed)
  n = lambda *s, std=0.05: (std * rng.standard_normal(s)).astype(np.float32)
  w, tw, grid = c["width"], c["text_width"], c["image"] // c["patch"]
  sd = {
      "visual.conv1.weight": n(w, 3, c["patch"], c["patch"], std=0.02),
      "visual.class_embedding": n(w, std=0.05),
      "visual.positional_embedding": n(grid * grid + 1, w, std=0.05),
      "visual.ln_pre.weight": 1 + n(w, std=0.1), "visual.ln_pre.bias": n(w),
      "visual.ln_post.weight": 1 + n(w, std=0.1), "visual.ln_post.bias": n(w),
      "visual.proj": n(w, c["embed"], std=0.2),
      "token_embedding.weight": n(c["vocab"], tw, std=0.02),
      "positional_embedding": n(c["context"], tw, std=0.01),
      "ln_final.weight": 1 + n(tw, std=0.1), "ln_final.bias": n(tw),
      "text_projection": n(tw, c["embed"], std=0.2),
      "logit_scale": np.array(math.log(1 / 0.07), np.float32),
  }
  for i in range(c["layers"]):
    sd.update(block_weights(rng, f"visual.transformer.resblocks.{i}", w, 4 * w))
  for i in range(c["text_layers"]):
    sd.update(block_weights(rng, f"transformer.resblocks.{i}", tw, 4 * tw))
  return sd
