"""Device-sharded and multi-process averaging, on simulated CPU devices."""

import numpy as np
import pytest

from tests.conftest import free_port, run_python, run_python_together

pytestmark = pytest.mark.slow  # The pipeline or several processes: -m 'not slow' skips it.


def test_sharded_average_learned_soup_and_evaluation_on_8_devices():
  proc = run_python(["tests/multidevice_checks.py", "single"],
                    {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert "single: ok" in proc.stdout


def test_two_process_jax_distributed_average_equals_streamed_to_float32_rounding(tmp_path):
  from soup import soups, trees as tree_lib
  from tests.multidevice_checks import _trees

  port, out = free_port(), tmp_path / "soup.npz"
  run_python_together([["tests/multidevice_checks.py", "multiprocess", str(r), str(port),
                        str(out)] for r in (0, 1)],
                      {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, timeout=300)
  expected = tree_lib.flatten_with_names(soups.weighted_average(_trees(5)))
  with np.load(out) as got:
    assert set(got.files) == set(expected)
    for k, v in expected.items():
      np.testing.assert_allclose(got[k], v, rtol=2e-6, atol=1e-7, err_msg=k)
