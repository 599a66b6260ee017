"""Validate before compute: a user error is one line naming the fix, exit status 2, fast."""

import time

import pytest

from tests.conftest import run_python

SMOKE = "--config=configs/fashion_mnist.py:smoke"

BAD_SWEEP_CONFIG = """
from configs import fashion_mnist

get_config = fashion_mnist.get_config


def get_sweep(config):
  members = fashion_mnist.get_sweep(config)
  members[1]["epochs"] = {epochs!r}
  return members
"""


def run_main(*args, timeout=120):
  t = time.time()
  proc = run_python(["-m", "soup.main", *args], timeout=timeout, check=False)
  return proc, time.time() - t


def assert_user_error(proc, seconds, *needles):
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], lines[0]
  # Under 10 s on an idle machine (about 1 s); this one is shared by other jobs.
  assert seconds < 20, seconds


@pytest.mark.parametrize("args,needles", [
    ([SMOKE, "--config.soups.recipes=('uniform_soup','greedy_soop')"],
     ["unknown recipe 'greedy_soop'", "choose from"]),
    ([SMOKE, "--config.soups.recipes=('wise_ft','greedy_soup')",
      "--config.soups.wise_ft.endpoint=greedy_soup"], ["add 'greedy_soup' ahead of 'wise_ft'"]),
    ([SMOKE, "--config.stages=sweep,evalute"], ["unknown stage(s) ['evalute']"]),
    (["--config=configs/fashion_mnist.py:smok"], ["Unknown config argument 'smok'"]),
    ([SMOKE, "--config.sweep.num_memberz=2"], ["no field num_memberz", "num_members"]),
    (["--config=configs/fashion_mnist_typo.py"], ["no such file"]),
    ([SMOKE, "--config.soups.greedy_comparison=>>"], ["greedy_comparison must be"]),
    ([SMOKE, "--config.data.data_dir=/nonexistent/tfds"],
     ["not prepared in /nonexistent/tfds", "python -m soup.data.prepare"]),
    (["--config=configs/clip_vit_b32_imagenet.py"], ["config.data.objectnet_dir"]),
    (["--config=configs/clip_vit_b32_imagenet.py", "--config.data.objectnet_dir=/tmp"],
     ["config.init.path", "download the weights"]),
])
def test_user_error_is_one_line_and_exit_2(args, needles, tmp_path):
  workdir = tmp_path / "run"
  proc, seconds = run_main(*args, f"--workdir={workdir}")
  assert_user_error(proc, seconds, *needles)
  assert not workdir.exists()  # Nothing was made.


@pytest.mark.parametrize("epochs,needle", [(0, "epochs >= 1"), ("2", "epochs='2'")])
def test_bad_sweep_output(tmp_path, epochs, needle):
  config = tmp_path / "bad_sweep.py"
  config.write_text(BAD_SWEEP_CONFIG.format(epochs=epochs))
  proc, seconds = run_main(f"--config={config}:smoke", f"--workdir={tmp_path / 'run'}")
  assert_user_error(proc, seconds, "get_sweep", "member 2", needle)


def test_report_cli_names_file_and_line_of_a_bad_row(tmp_path):
  from soup import results
  columns = {c: 0.5 for c in results.FASHION_MNIST.all}
  good = tmp_path / "results.jsonl"
  results.write(good, [{"model_name": "model_0", **columns}, {"model_name": "model_1", **columns}])
  lines = good.read_text().splitlines()
  cases = {
      "truncated": lines[0] + "\n" + lines[1][:40] + "\n",
      "no_column": lines[0] + "\n\n" + lines[1].replace('"FashionMNISTA": 0.5', '"x": 1') + "\n",
  }
  for name, text in cases.items():
    path = tmp_path / f"{name}.jsonl"
    path.write_text(text)
    proc = run_python(["-m", "soup.report", f"--results={good}", f"--results={path}",
                       f"--out={tmp_path / 'out'}"], timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    line = {"truncated": 2, "no_column": 3}[name]
    assert proc.stderr.strip().startswith(f"error: {path}:{line}: "), proc.stderr
  assert "FashionMNISTA" in proc.stderr


def test_paths_are_checked_for_the_stages_that_read_them(tmp_path):
  clip = ["--config=configs/clip_vit_b32_imagenet.py", "--config.stages=sweep"]
  # No evaluation in this run: ObjectNet is not needed, the weights are.
  proc, seconds = run_main(*clip, f"--workdir={tmp_path / 'a'}")
  assert_user_error(proc, seconds, "config.init.path")
  # The upstream ingredient is in the workdir: the weights are not read again, so not
  # checked (this fake ingredient then fails to restore: still one line, exit 2).
  marker = tmp_path / "b" / "upstream" / "ingredient" / "ingredient.json"
  marker.parent.mkdir(parents=True)
  marker.write_text("{}")
  proc, seconds = run_main(*clip, f"--workdir={tmp_path / 'b'}")
  assert proc.returncode == 2 and "config.init.path" not in proc.stderr
  assert "Cannot restore ingredient" in proc.stderr.splitlines()[-1]
