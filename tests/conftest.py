"""Shared fixtures. Tests run on the CPU; multi-device checks run in subprocesses."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(args, env_extra=None, timeout=600, check=True):
  """Runs `python ARGS` from the repo root; returns the CompletedProcess."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"python {' '.join(args)} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return proc


def free_port() -> int:
  """A TCP port free on localhost now (jax.distributed coordinators in tests)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="session")
def fashion_mnist_ready():
  from soup.data import fashion_mnist
  try:
    fashion_mnist.load_arrays()
  except fashion_mnist.DatasetMissingError as e:
    pytest.fail(f"Fashion-MNIST is not prepared; run scripts/setup.sh. ({e})")
  return True
