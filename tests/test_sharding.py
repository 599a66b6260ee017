"""Device-sharded and multi-process averaging, on simulated CPU devices."""

import os
import subprocess
import sys

import numpy as np
from conftest import ROOT, free_port, run_python


def test_sharded_average_learned_soup_and_evaluation_on_8_devices():
  proc = run_python(["tests/multidevice_checks.py", "single"],
                    {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert "single: ok" in proc.stdout


def test_two_process_jax_distributed_average_equals_streamed_to_float32_rounding(tmp_path):
  from soup import checkpoints, soups
  sys.path.insert(0, str(ROOT / "tests"))
  from multidevice_checks import _trees

  port, out = free_port(), tmp_path / "soup.npz"
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen([sys.executable, "tests/multidevice_checks.py", "multiprocess", str(r),
                             str(port), str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for r in (0, 1)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (o, e) in zip(procs, outputs):
    assert p.returncode == 0, f"{o}\n{e[-4000:]}"
  expected = checkpoints.flatten_with_names(soups.stream_average(_trees(5)))
  with np.load(out) as got:
    assert set(got.files) == set(expected)
    for k, v in expected.items():
      np.testing.assert_allclose(got[k], v, rtol=2e-6, atol=1e-7, err_msg=k)
