"""The sweep launcher (scripts/launch_sweep.py): local and print modes, and SkyPilot managed
jobs. The SkyPilot tasks are validated offline (a dry run needs cloud credentials), and their
run command is executed here as SkyPilot would run it: a member killed with SIGKILL and run
again, as a recovered spot job is, ends with the same ingredient as an uninterrupted run."""

import importlib.util
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from soup import checkpoints, distributed

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "scripts" / "sky").glob("*.yaml"))


def load_launcher():
  path = ROOT / "scripts" / "launch_sweep.py"
  spec = importlib.util.spec_from_file_location("launch_sweep", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


launch = load_launcher()


def skypilot_env(task: dict, **overrides) -> dict:
  """The environment SkyPilot gives the run command of a one-node task, plus overrides."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SKYPILOT_"))}
  env.update({k: str(v) for k, v in task["envs"].items()})
  env.update(SKYPILOT_NODE_RANK="0", SKYPILOT_NUM_NODES="1", SKYPILOT_NODE_IPS="127.0.0.1",
             SKYPILOT_TASK_ID="sky-managed-2026-11-28-10-00-00-000000_soup_7-0")
  env.update(overrides)
  return env


# --- Print and local modes --------------------------------------------------------


def test_print_mode_lists_three_phases_and_skips_done_members(tmp_path, capsys):
  workdir = tmp_path / "w"
  done = workdir / "models" / "model_3" / "ingredient"
  done.mkdir(parents=True)
  (done / "ingredient.json").write_text("{}")
  assert launch.main(["--config=configs/clip_vit_b32_imagenet.py", f"--workdir={workdir}",
                      "--mode=print", "--", "--config.eval.batch_size=256"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1 + 70 + 1
  assert "--config.stages=pretrain,probe " in lines[0] + " "
  members = [int(re.search(r"--config.sweep.only=(\d+)", line).group(1)) for line in lines[1:-1]]
  assert members == [k for k in range(1, 72) if k != 3]
  assert all("--config.stages=pretrain,probe,sweep" in line for line in lines[1:-1])
  assert "--config.stages=evaluate,soups,report" in lines[-1]
  assert all(line.endswith("--config.eval.batch_size=256") for line in lines)


def test_gpu_slots():
  assert launch.gpu_slots("0,1,2,3", 2) == ["0,2", "1,3"]
  assert launch.gpu_slots("0,1,2,3", 4) == ["0", "1", "2", "3"]
  assert launch.gpu_slots("", 3) == [None, None, None]
  with pytest.raises(SystemExit):
    launch.gpu_slots("0,1", 3)


def test_local_parallel_runs_each_member_once(tmp_path):
  """local mode with a stand-in interpreter that records its calls and 'trains' a member."""
  log = tmp_path / "calls.log"
  fake = tmp_path / "fake_python"
  fake.write_text(f"""#!/bin/bash
echo "$CUDA_VISIBLE_DEVICES|$*" >> {log}
for a in "$@"; do
  case $a in --config.sweep.only=*) k=${{a#*=}};; --workdir=*) w=${{a#*=}};; esac
done
if [ -n "$k" ]; then
  mkdir -p "$w/models/model_$k/ingredient"
  echo {{}} > "$w/models/model_$k/ingredient/ingredient.json"
fi
""")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  workdir = tmp_path / "w"
  argv = ["--config=configs/clip_vit_b32_imagenet.py:smoke", f"--workdir={workdir}", "--mode=local",
          "--parallel=2", "--gpus=0,1", f"--python={fake}", "--", "--config.sweep.num_members=4"]
  assert launch.main(argv) == 0
  calls = log.read_text().splitlines()
  assert len(calls) == 6 and "--config.stages=pretrain,probe --" in calls[0]
  assert "evaluate,soups,report" in calls[-1]
  members = sorted(int(re.search(r"sweep.only=(\d+)", c).group(1)) for c in calls[1:-1])
  assert members == [1, 2, 3, 4]
  assert {c.split("|")[0] for c in calls[1:-1]} == {"0", "1"}  # Each slot on its own GPU.
  log.unlink()
  assert launch.main(argv) == 0  # Everything done: only setup and final run again.
  assert len(log.read_text().splitlines()) == 2


# --- Accelerator names and arguments ------------------------------------------------


@pytest.mark.parametrize("name,nodes,kind", [
    ("tpu-v4-8", 1, "tpu"), ("tpu-v4-32", 1, "tpu"), ("tpu-v5litepod-8", 1, "tpu"),
    ("tpu-v5p-8", 1, "tpu"), ("tpu-v6e-256", 1, "tpu"), ("A100-80GB:8", 1, "gpu"),
    ("H100:8", 4, "gpu"), ("L4:1", 1, "gpu")])
def test_known_accelerators(name, nodes, kind):
  assert launch.check_accelerator(name, nodes) == kind


@pytest.mark.parametrize("name,nodes,message", [
    ("tpu-v9-999", 1, "Unknown accelerator"), ("tpu-v4-7", 1, "v4 comes in sizes"),
    ("v4-8", 1, "Unknown accelerator"), ("tpu-v4-8", 2, "one SkyPilot node"),
    ("A100:3", 1, "Unknown accelerator"), ("A100", 1, "Unknown accelerator"),
    ("RTX9090:8", 1, "Unknown accelerator"), ("A100:8", 0, "must be >= 1")])
def test_unknown_accelerators_are_refused(name, nodes, message):
  with pytest.raises(ValueError, match=message):
    launch.check_accelerator(name, nodes)


@pytest.mark.parametrize("argv,message", [
    (["--mode=sky", "--accelerator=tpu-v9-999", "--print_only"], "Unknown accelerator"),
    (["--mode=sky", "--accelerator=tpu-v4-8"], "needs --bucket"),
    (["--mode=sky", "--print_only", "--workdir=/tmp/w"], "under /soup-work/"),
    (["--mode=sky", "--write_template", "--", "--config.seed=1"], "drop the overrides"),
    (["--mode=local"], "needs --workdir")])
def test_bad_arguments_get_one_line_errors(argv, message, capsys):
  with pytest.raises(SystemExit):
    launch.parse_args(["--config=configs/clip_vit_b32_imagenet.py", *argv])
  assert message in capsys.readouterr().err


# --- SkyPilot tasks -------------------------------------------------------------------


@pytest.fixture
def sky(monkeypatch):
  """SkyPilot, offline: validating a GPU task looks its name up in SkyPilot's catalog, which
  is downloaded on first use; here the names are the launcher's list (checked above), kept as
  spelled. TPU names never read the catalog."""
  sky = pytest.importorskip("sky", reason="requirements-launch.txt (skypilot) is not installed")
  from sky.utils import accelerator_registry

  def canonical(name, cloud):
    del cloud
    assert name in launch.GPUS or name.startswith("tpu-"), name
    return name

  monkeypatch.setattr(accelerator_registry, "canonicalize_accelerator_name", canonical)
  monkeypatch.chdir(ROOT)  # The tasks' workdir (.) is the repository.
  return sky


def template_command(path: Path) -> list[str]:
  """The launcher arguments in the template's header ("# Generated ... by\n#   python ...")."""
  line = path.read_text().splitlines()[1]
  assert line.startswith("#   python scripts/launch_sweep.py "), line
  return shlex.split(line[len("#   python scripts/launch_sweep.py "):])


def test_clip_templates_cover_single_host_tpu_pod_and_multinode_gpu():
  names = {p.name for p in TEMPLATES}
  assert {"clip_vit_b32_imagenet.tpu-v4-8.yaml", "clip_vit_b32_imagenet.tpu-v4-32.yaml",
          "clip_vit_b32_imagenet.A100-80GB-8.yaml", "clip_vit_b32_imagenet.H100-8.x2.yaml"} <= names


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_committed_template_is_what_the_config_generates(path):
  args = launch.parse_args(template_command(path))
  assert args.write_template and args.mode == "sky"
  assert launch.template_path(args.config, args.accelerator, args.num_nodes) == path
  assert path.read_text() == launch.task_yaml(args.config, args.accelerator, args.num_nodes), (
      f"{path.name} is stale: rerun the command in its header.")


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_template_validates_offline(path, sky):
  task = sky.Task.from_yaml(str(path))
  task.validate()
  args = launch.parse_args(template_command(path))
  (resources,) = task.resources
  assert resources.accelerators == {args.accelerator.split(":")[0]:
                                    int(args.accelerator.split(":")[1]) if ":" in args.accelerator
                                    else 1}
  assert resources.use_spot and resources.job_recovery["strategy"] == "EAGER_NEXT_REGION"
  assert task.num_nodes == args.num_nodes
  kind = launch.check_accelerator(args.accelerator, args.num_nodes)
  if kind == "tpu":
    family = args.accelerator.split("-")[1]
    assert resources.accelerator_args["runtime_version"] == launch.TPU_RUNTIME[family]
  assert set(task.storage_mounts) == {"/soup-work", "/soup-data"}
  assert task.envs["WORKDIR"].startswith("/soup-work/")
  assert task.envs["STAGES"] == launch.ALL_STAGES and task.envs["MEMBER"] == ""
  # SkyPilot accepts a task without run: the command itself is checked here.
  assert task.run == launch.run_script(args.config, kind, args.num_nodes)
  assert f"-m soup.main --config={args.config} " in task.run
  assert ("--distributed" in task.run) == (kind == "tpu" or args.num_nodes > 1)
  assert ("JAX_COORDINATOR_ADDRESS" in task.run) == (kind == "gpu" and args.num_nodes > 1)
  assert f"jax[{'tpu' if kind == 'tpu' else 'cuda12'}]=={launch.pinned_jax()}" in task.setup
  for script in (task.run, task.setup):
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


@pytest.mark.parametrize("edit,error", [
    (("  use_spot: true", "  use_spot: sometimes"), "is not of type 'boolean'"),
    (("num_nodes: 1", "num_nodes: 1\nretries: 3"), "retries"),
    (("    mode: MOUNT", "    mode: MOUNTED"), "MOUNTED"),
    (("max_restarts_on_errors: 2", "max_restarts_on_errors: -1"), "minimum")])
def test_offline_validation_rejects_a_broken_task(edit, error, sky):
  """The validation the templates pass is not vacuous: SkyPilot's schema refuses these."""
  text = (ROOT / "scripts/sky/clip_vit_b32_imagenet.tpu-v4-8.yaml").read_text()
  assert edit[0] in text
  with pytest.raises(Exception, match=error):
    sky.Task.from_yaml_str(text.replace(edit[0], edit[1], 1)).validate()


def test_launch_commands_parse_with_the_sky_cli_and_fill_the_buckets(sky):
  """The `sky jobs launch` argv the launcher runs, parsed by SkyPilot's own CLI (no call)."""
  from sky.client.cli import command
  args = launch.parse_args(["--config=configs/clip_vit_b32_imagenet.py", "--mode=sky",
                            "--accelerator=tpu-v4-32", "--bucket=work-b", "--data_bucket=data-b",
                            "--members=2,5", "--workdir=/soup-work/workdirs/run2"])
  template = "scripts/sky/clip_vit_b32_imagenet.tpu-v4-32.yaml"
  launches = launch.sky_launches(args, template)
  order = [launches["setup"], *launches["members"], launches["final"]]
  expected = [("setup", launch.SETUP_STAGES, ""), ("m2", launch.MEMBER_STAGES, "2"),
              ("m5", launch.MEMBER_STAGES, "5"), ("final", launch.FINAL_STAGES, "")]
  for argv, (suffix, stages, member) in zip(order, expected, strict=True):
    assert argv[:3] == ["sky", "jobs", "launch"]
    params = command.jobs_launch.make_context("launch", argv[3:]).params
    assert params["entrypoint"] == (template,) and params["yes"]
    assert params["name"] == f"soup-clip-vit-b32-imagenet-{suffix}"
    assert params["detach_run"] == (suffix.startswith("m"))  # Setup and final wait.
    envs = dict(params["env"])
    assert envs == {"BUCKET": "work-b", "DATA_BUCKET": "data-b", "STAGES": stages,
                    "MEMBER": member, "WORKDIR": "/soup-work/workdirs/run2"}
    config = yaml.safe_load(Path(template).read_text())
    task = sky.Task.from_yaml_config(config, env_overrides=list(envs.items()))
    task.validate()
    assert task.storage_mounts["/soup-work"].source == "gs://work-b"
    assert task.storage_mounts["/soup-data"].source == "gs://data-b"
    assert task.envs["MEMBER"] == member and task.envs["STAGES"] == stages


def test_print_only_uses_the_committed_template_or_a_generated_one(capsys):
  base = ["--config=configs/clip_vit_b32_imagenet.py", "--mode=sky", "--accelerator=tpu-v4-8",
          "--bucket=b", "--data_bucket=d", "--print_only", "--members=1"]
  assert launch.main(base + ["--phase=members"]) == 0
  (line,) = capsys.readouterr().out.strip().splitlines()
  assert line.endswith(" scripts/sky/clip_vit_b32_imagenet.tpu-v4-8.yaml")
  assert launch.main(base + ["--phase=all", "--", "--config.eval.batch_size=256"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 and "--env=STAGES=pretrain,probe " in lines[0]
  task_file = Path(shlex.split(lines[0])[-1])  # Overrides: a generated task, not the template.
  assert task_file.parent != ROOT / "scripts" / "sky"
  assert "--config.sweep.only=\"$MEMBER\" --config.eval.batch_size=256" in task_file.read_text()
  task_file.unlink()


def test_launching_skips_members_finished_in_the_bucket_and_final_waits_for_all(monkeypatch,
                                                                             capsys):
  """The launcher reads the bucket (not a local path) for finished members; `sky` is not run
  here: its argv lists are recorded."""
  listed, ran = [], []
  prefix = "workdirs/run2/models/"
  bucket = [prefix + "model_2/ingredient/ingredient.json",
            prefix + "model_3/ingredient/ingredient.json.tmp",
            prefix + "model_4/train_state/8/ingredient/ingredient.json",
            prefix + "model_5/ingredient/ingredient.json"]

  def names(bucket_name, prefix, glob):
    listed.append((bucket_name, prefix, glob))
    return bucket

  monkeypatch.setattr(launch, "bucket_names", names)
  monkeypatch.setattr(launch.subprocess, "run",
                      lambda argv, cwd: ran.append(argv) or subprocess.CompletedProcess(argv, 0))
  base = ["--config=configs/clip_vit_b32_imagenet.py", "--mode=sky", "--accelerator=tpu-v4-8",
          "--bucket=work-b", "--data_bucket=data-b", "--workdir=/soup-work/workdirs/run2",
          "--members=1,2,3,4,5"]
  assert launch.main(base) == 0  # --phase=all
  assert listed == [("work-b", prefix, "model_*/ingredient/ingredient.json")]
  assert [next(a for a in argv if a.startswith("--name=")) for argv in ran] == [
      "--name=soup-clip-vit-b32-imagenet-setup", "--name=soup-clip-vit-b32-imagenet-m1",
      "--name=soup-clip-vit-b32-imagenet-m3", "--name=soup-clip-vit-b32-imagenet-m4"]
  assert "Skipping members [2, 5]" in capsys.readouterr().out
  ran.clear()
  with pytest.raises(SystemExit, match=r"Members \[1, 3, 4\] have no ingredient"):
    launch.main(base + ["--phase=final"])
  assert ran == []
  bucket.extend(prefix + f"model_{k}/ingredient/ingredient.json" for k in (1, 3, 4))
  assert launch.main(base + ["--phase=final"]) == 0
  (argv,) = ran
  assert "--env=STAGES=evaluate,soups,report" in argv and "--detach-run" not in argv

  def no_access(*args):
    raise PermissionError("403 caller does not have storage.objects.list access")

  monkeypatch.setattr(launch, "bucket_names", no_access)
  with pytest.raises(SystemExit, match="Cannot list gs://work-b/workdirs/run2/models/"):
    launch.main(base + ["--phase=members"])


# --- The run command, executed as SkyPilot would ------------------------------------


def fake_venv(tmp_path: Path, body: str) -> Path:
  """A directory whose .venv/bin/python is a bash script (the run command calls it)."""
  python = tmp_path / "node" / ".venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text("#!/bin/bash\n" + body)
  python.chmod(0o755)
  return tmp_path / "node"


def test_member_without_model_0_stops_with_a_clear_error(tmp_path):
  task = yaml.safe_load(launch.task_yaml("configs/clip_vit_b32_imagenet.py", "A100-80GB:8"))
  cwd = fake_venv(tmp_path, "echo ran > ran.txt\n")
  env = skypilot_env(task, WORKDIR=str(tmp_path / "w"), MEMBER="4")
  proc = subprocess.run(["bash", "-c", task["run"]], cwd=cwd, env=env, capture_output=True,
                        text=True)
  assert proc.returncode == 3 and "launch the setup phase first" in proc.stderr
  assert not (cwd / "ran.txt").exists()
  (tmp_path / "w" / "models" / "model_0" / "ingredient").mkdir(parents=True)
  (tmp_path / "w" / "models" / "model_0" / "ingredient" / "ingredient.json").write_text("{}")
  proc = subprocess.run(["bash", "-c", task["run"]], cwd=cwd, env=env, capture_output=True,
                        text=True)
  assert proc.returncode == 0 and (cwd / "ran.txt").exists()
  starts = (tmp_path / "w" / "launch_logs" / f"{env['SKYPILOT_TASK_ID']}.starts").read_text()
  assert starts.count("member=4") == 2  # One line per start of the same managed job.


def test_multinode_gpu_run_command_starts_jax_distributed(tmp_path):
  """Two nodes of the H100:8 x2 task on this machine: the run command exports the coordinator
  (first of SKYPILOT_NODE_IPS) and the rank, and soup.distributed joins both processes."""
  task = yaml.safe_load((ROOT / "scripts/sky/clip_vit_b32_imagenet.H100-8.x2.yaml").read_text())
  probe = tmp_path / "probe.py"
  probe.write_text(
      "from soup import distributed\ndistributed.initialize()\nimport jax\n"
      "print('joined', jax.process_index(), jax.process_count(), jax.device_count())\n")
  cwd = fake_venv(tmp_path, f"""
echo "$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID $*" >&2
case " $* " in *" --distributed "*) ;; *) echo "no --distributed" >&2; exit 9;; esac
exec {sys.executable} {probe}
""")
  (tmp_path / "w" / "models" / "model_0" / "ingredient").mkdir(parents=True)
  (tmp_path / "w" / "models" / "model_0" / "ingredient" / "ingredient.json").write_text("{}")
  procs = []
  for rank in (0, 1):
    env = skypilot_env(task, WORKDIR=str(tmp_path / "w"), MEMBER="1", SKYPILOT_NUM_NODES="2",
                       SKYPILOT_NODE_RANK=str(rank), SKYPILOT_NODE_IPS="127.0.0.1\n127.0.0.2",
                       JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                       PYTHONPATH=str(ROOT))
    procs.append(subprocess.Popen(["bash", "-c", task["run"]], cwd=cwd, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE))
  outs = [p.communicate(timeout=120) for p in procs]
  for rank, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, err
    address = f"127.0.0.1:{launch.COORDINATOR_PORT}"
    assert err.splitlines()[0].startswith(f"{address} 2 {rank} -m soup.main"), err
    assert out.split() == ["joined", str(rank), "2", "2"]


def test_distributed_kwargs_from_the_environment():
  assert distributed.initialize_kwargs({}) == {}  # TPU VMs, SLURM: JAX detects them.
  env = {"JAX_COORDINATOR_ADDRESS": "10.1.2.3:8476", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert distributed.initialize_kwargs(env) == dict(coordinator_address="10.1.2.3:8476",
                                                    num_processes=4, process_id=3)
  for bad, message in [({**env, "JAX_PROCESS_ID": ""}, "JAX_PROCESS_ID unset"),
                       ({**env, "JAX_PROCESS_ID": "4"}, "outside 0..3"),
                       ({**env, "JAX_NUM_PROCESSES": "four"}, "expected integers"),
                       ({**env, "JAX_COORDINATOR_ADDRESS": "10.1.2.3"}, "host:port")]:
    with pytest.raises(SystemExit, match=message):
      distributed.initialize_kwargs(bad)


def train_state_steps(member_dir: Path) -> list[int]:
  states = member_dir / "train_state"
  if not states.exists():
    return []
  return sorted(int(p.name) for p in states.iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_killed_member_resumes_to_the_uninterrupted_result(tmp_path, fashion_mnist_ready):
  """The exact run command of a generated task (Fashion-MNIST smoke, one GPU node, members
  of 16 steps), run in a local workdir: setup, then member 1 uninterrupted in one copy and,
  in another, SIGKILLed after its first train-state checkpoint and run again, as SkyPilot
  does after a preemption. Both ingredients are bit-identical."""
  overrides = ["--config.sweep.epochs=(2, 2)",  # 16 steps, a checkpoint every 4.
               "--config.data.upstream_examples=512", "--config.probe.l2_grid=(1e-4,)"]
  task = yaml.safe_load(launch.task_yaml("configs/fashion_mnist.py:smoke", "A100:1",
                                         extra=overrides))
  run = task["run"]
  assert "'--config.sweep.epochs=(2, 2)'" in run and "--distributed" not in run

  def start(workdir, stages, member=""):
    env = skypilot_env(task, WORKDIR=str(workdir), STAGES=stages, MEMBER=member)
    return subprocess.Popen(["bash", "-c", run], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)

  def finish(proc):
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]

  reference, killed = tmp_path / "reference", tmp_path / "killed"
  finish(start(reference, launch.SETUP_STAGES))
  subprocess.run(["cp", "-a", str(reference), str(killed)], check=True)
  member = lambda w: w / "models" / "model_1"  # noqa: E731
  finish(start(reference, launch.MEMBER_STAGES, "1"))

  proc = start(killed, launch.MEMBER_STAGES, "1")
  deadline = time.time() + 240
  while not train_state_steps(member(killed)) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  os.killpg(proc.pid, signal.SIGKILL)  # The whole job: bash and soup.main.
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  steps_at_kill = train_state_steps(member(killed))
  assert steps_at_kill and steps_at_kill[-1] < 16, steps_at_kill
  assert not checkpoints.is_ingredient(member(killed) / "ingredient")
  finish(start(killed, launch.MEMBER_STAGES, "1"))  # The recovery: the same command again.

  log = (killed / "log.txt").read_text()
  assert re.search(rf"model_1.*resuming at step {steps_at_kill[-1]} of 16", log), log[-2000:]
  starts = list((killed / "launch_logs").glob("*.starts"))
  assert len(starts) == 1 and starts[0].read_text().count("member=1") == 2
  want = checkpoints.load_ingredient(member(reference) / "ingredient")
  got = checkpoints.load_ingredient(member(killed) / "ingredient")
  jax.tree.map(np.testing.assert_array_equal, want, got)
