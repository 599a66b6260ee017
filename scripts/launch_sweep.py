#!/usr/bin/env python
r"""Runs a sweep's members as separate soup.main processes: printed, on this machine, or as
SkyPilot managed jobs on spot TPU VMs or GPU clouds.

The members of the random search are independent fine-tunes of the same
model_0, so they can run anywhere that sees the workdir. Three phases:
  1. setup, once:   --config.stages=pretrain,probe          (imports weights, model_0)
  2. member K:      --config.stages=pretrain,probe,sweep --config.sweep.only=K
                    (pretrain/probe are then loaded, not redone)
  3. final, once:   --config.stages=evaluate,soups,report
Setup comes first so that parallel members never race to write model_0. Every
stage resumes by itself: a finished member is skipped, an interrupted one goes
on from its last train-state checkpoint.

Modes:
  --mode=print   print the commands of the three phases, run nothing.
  --mode=local   run them here: members one after another, or --parallel=N at a
                 time; with --gpus=0,1,2,3 each of the N slots gets its own
                 CUDA_VISIBLE_DEVICES share (GPUs dealt round-robin to slots).
                 Members whose ingredient is in --workdir are skipped. Logs go to
                 workdir/launch_logs/.
  --mode=sky     one SkyPilot managed job per phase and per member, on spot
                 capacity with automatic recovery (`sky jobs launch`). The task
                 (scripts/sky/*.yaml, generated from the config: see
                 --write_template) mounts two GCS buckets: --bucket at /soup-work
                 holds the workdir (default /soup-work/workdirs/EXPERIMENT), and
                 --data_bucket at /soup-data holds what the config reads from the
                 home directory (tensorflow_datasets/, data/objectnet-1.0/,
                 checkpoints/), linked into ~ by the task's setup. A preempted
                 member is relaunched by SkyPilot with the same run command and
                 resumes from its checkpoint in the bucket. --phase=all (default)
                 runs setup and waits for it, then submits the members and
                 returns; run --phase=final once `sky jobs queue` shows them
                 SUCCEEDED. Finished members (ingredient in the bucket: listed
                 with Google's client, never a local path) are not relaunched,
                 and --phase=final refuses to start before all are finished.
                 --print_only prints the `sky jobs launch` commands of every
                 member without reading the bucket. Needs requirements-launch.txt
                 (skypilot[gcp]), `sky check gcp` and application-default
                 credentials.
  The former gcloud TPU mode is gone: SkyPilot creates the TPU VMs (single-host
  and pod slices), runs the command on every host, and recovers preemptions.

Anything after `--` is passed to every soup.main command (config overrides).

  python scripts/launch_sweep.py --config=configs/clip_vit_b32_imagenet.py \
      --workdir=workdirs/clip_vit_b32 --mode=local --parallel=8 --gpus=0,1,2,3,4,5,6,7
  python scripts/launch_sweep.py --config=configs/clip_vit_b32_imagenet.py --mode=sky \
      --accelerator=tpu-v4-8 --bucket=my-soup-work --data_bucket=my-soup-data
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # soup and configs, when run as scripts/launch_sweep.py.
from soup import layout  # noqa: E402  (names only)

SKY_DIR = ROOT / "scripts" / "sky"
SETUP_STAGES = ",".join(layout.SETUP_STAGES)
MEMBER_STAGES = ",".join(layout.MODEL_STAGES)
FINAL_STAGES = ",".join(layout.EVAL_STAGES)
ALL_STAGES = ",".join(layout.STAGES)
MODEL_0_DONE = f"{layout.ingredient(layout.INITIALIZATION)}/{layout.INGREDIENT_FILE}"
WORK_MOUNT = "/soup-work"  # --bucket: the workdirs.
DATA_MOUNT = "/soup-data"  # --data_bucket: data and weights, laid out as the config's ~.
HOME_LINKS = ("tensorflow_datasets", "data", "checkpoints")  # ~/X -> DATA_MOUNT/X.
COORDINATOR_PORT = 8476
UV_VERSION = "0.13.8"  # Installs Python 3.11 and the pins on the VMs.

# Accelerators a task may ask for. SkyPilot validates any TPU name offline (tpu-v9-999
# passes), so the names are checked here. TPU slices: version -> sizes (TensorCores for
# v2-v4 and v5p, chips for v5litepod and v6e) and the TPU VM image each family needs.
TPU_SIZES = {
    "v2": (8, 32, 128, 256, 512),
    "v3": (8, 32, 64, 128, 256, 512, 1024, 2048),
    "v4": (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
    "v5p": (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 6144, 12288),
    "v5litepod": (1, 4, 8, 16, 32, 64, 128, 256),
    "v6e": (1, 4, 8, 16, 32, 64, 128, 256),
}
TPU_RUNTIME = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base",
               "v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5",
               "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
GPUS = ("T4", "L4", "A10G", "L40S", "V100", "A100", "A100-80GB", "H100", "H200", "B200")
GPU_COUNTS = (1, 2, 4, 8)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = []
  if "--" in argv:
    cut = argv.index("--")
    argv, extra = argv[:cut], argv[cut + 1:]
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--config", required=True, help="config file[:arg], as for soup.main")
  p.add_argument("--workdir", default="",
                 help=f"print/local: the workdir (required); sky: a path under {WORK_MOUNT} "
                      f"(default: the task's, {WORK_MOUNT}/workdirs/EXPERIMENT)")
  p.add_argument("--mode", choices=("print", "local", "sky"), default="print")
  p.add_argument("--members", default="", help="1-based member indices, e.g. 1,2,5 (default: all)")
  p.add_argument("--parallel", type=int, default=1, help="local: processes at a time")
  p.add_argument("--gpus", default="", help="local: GPU ids to deal to the parallel slots")
  p.add_argument("--python", default=sys.executable, help="local: the interpreter to run")
  p.add_argument("--accelerator", default="tpu-v4-8",
                 help="sky: tpu-v4-8, tpu-v4-32 (a pod slice), A100-80GB:8, ...")
  p.add_argument("--num_nodes", type=int, default=1,
                 help="sky: GPU nodes per member (a TPU pod slice is one node of many hosts)")
  p.add_argument("--bucket", default="", help="sky: GCS bucket of the workdirs (mounted rw)")
  p.add_argument("--data_bucket", default="", help="sky: GCS bucket of data and weights")
  p.add_argument("--phase", choices=("all", "setup", "members", "final"), default="all",
                 help="sky: which phase(s) to launch")
  p.add_argument("--on_demand", action="store_true", help="sky: on-demand instead of spot")
  p.add_argument("--print_only", action="store_true", help="sky: print the commands, run nothing")
  p.add_argument("--write_template", action="store_true",
                 help="sky: write the task to scripts/sky/ (no overrides allowed) and exit")
  args = p.parse_args(argv)
  args.extra = extra
  if args.parallel < 1:
    p.error("--parallel must be >= 1")
  if args.mode != "sky" and not args.workdir:
    p.error(f"--mode={args.mode} needs --workdir")
  if args.mode == "sky":
    try:
      args.accelerator_kind = check_accelerator(args.accelerator, args.num_nodes)
    except ValueError as e:
      p.error(str(e))
    if args.workdir and not args.workdir.startswith(WORK_MOUNT + "/"):
      p.error(f"--workdir={args.workdir}: with --mode=sky it must be a path under {WORK_MOUNT}/ "
              "(the --bucket mount), e.g. /soup-work/workdirs/clip_run2")
    if args.write_template and args.extra:
      p.error("--write_template writes the config's own task: drop the overrides after --")
    if not (args.write_template or args.print_only) and not (args.bucket and args.data_bucket):
      p.error("--mode=sky needs --bucket (workdirs) and --data_bucket (data and weights)")
  return args


def check_accelerator(name: str, num_nodes: int = 1) -> str:
  """'tpu' or 'gpu' for a known accelerator name (SkyPilot's spelling); ValueError otherwise."""
  if num_nodes < 1:
    raise ValueError(f"--num_nodes={num_nodes}: must be >= 1")
  tpu = re.fullmatch(r"tpu-(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)", name)
  if tpu:
    if int(tpu.group(2)) not in TPU_SIZES[tpu.group(1)]:
      raise ValueError(f"Unknown TPU slice {name!r}: {tpu.group(1)} comes in sizes "
                       f"{', '.join(map(str, TPU_SIZES[tpu.group(1)]))}.")
    if num_nodes != 1:
      raise ValueError(f"{name} with --num_nodes={num_nodes}: a TPU slice is one SkyPilot node "
                       "(a pod slice's hosts all run the command); pick a bigger slice instead.")
    return "tpu"
  gpu = re.fullmatch(r"([A-Za-z0-9-]+):(\d+)", name)
  if gpu and gpu.group(1) in GPUS and int(gpu.group(2)) in GPU_COUNTS:
    return "gpu"
  raise ValueError(f"Unknown accelerator {name!r}: use tpu-{{{','.join(TPU_SIZES)}}}-SIZE "
                   f"(e.g. tpu-v4-8) or GPU:COUNT with GPU in {', '.join(GPUS)} and COUNT in "
                   f"{', '.join(map(str, GPU_COUNTS))} (e.g. A100-80GB:8).")


def load_config(spec: str):
  """get_config(arg) of the config file, as soup.main would build it (before overrides)."""
  path, _, arg = spec.partition(":")
  import configs
  module = configs.module_of(ROOT / path if not os.path.isabs(path) else path)
  return module.get_config(arg) if arg else module.get_config()


def num_members(args) -> int:
  """sweep.num_members, or the override among the pass-through arguments."""
  for a in args.extra:
    if a.startswith("--config.sweep.num_members="):
      return int(a.split("=", 1)[1])
  return int(load_config(args.config).sweep.num_members)


def member_list(args) -> list[int]:
  total = num_members(args)
  if not args.members:
    return list(range(1, total + 1))
  chosen = sorted({int(k) for k in args.members.split(",") if k.strip()})
  bad = [k for k in chosen if not 1 <= k <= total]
  if bad:
    raise SystemExit(f"--members {bad} outside 1..{total}")
  return chosen


def is_done(workdir: str, k: int) -> bool:
  member = layout.ingredient(layout.member_name(k))
  return (Path(workdir) / member / layout.INGREDIENT_FILE).exists()


def soup_main(args, stages: str, member: Optional[int] = None,
              distributed: bool = False) -> list[str]:
  """The soup.main argument list (after the interpreter) of one phase."""
  cmd = ["-m", "soup.main", f"--config={args.config}", f"--workdir={args.workdir}"]
  if distributed:
    cmd.append("--distributed")
  cmd.append(f"--config.stages={stages}")
  if member is not None:
    cmd.append(f"--config.sweep.only={member}")
  return cmd + list(args.extra)


def plan(args) -> dict:
  """{"setup": argv, "members": {K: argv}, "final": argv} here (python = args.python)."""
  todo = [k for k in member_list(args) if not is_done(args.workdir, k)]
  py = [args.python]
  return {"setup": py + soup_main(args, SETUP_STAGES),
          "members": {k: py + soup_main(args, MEMBER_STAGES, k) for k in todo},
          "final": py + soup_main(args, FINAL_STAGES)}


def gpu_slots(gpus: str, parallel: int) -> list[Optional[str]]:
  """CUDA_VISIBLE_DEVICES of each slot: the GPUs dealt round-robin (None: leave it unset)."""
  ids = [g.strip() for g in gpus.split(",") if g.strip()]
  if not ids:
    return [None] * parallel
  if parallel > len(ids):
    raise SystemExit(f"--parallel={parallel} needs at least that many --gpus (got {len(ids)}).")
  return [",".join(ids[i::parallel]) for i in range(parallel)]


def run_local(args, planned: dict) -> int:
  """Setup, then members (args.parallel at a time, each slot on its GPUs), then final."""
  logs = Path(args.workdir) / layout.LAUNCH_LOGS
  logs.mkdir(parents=True, exist_ok=True)
  paths = [str(ROOT), os.environ.get("PYTHONPATH")]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)))

  def start(argv, log_name, cuda=None):
    e = dict(env) if cuda is None else dict(env, CUDA_VISIBLE_DEVICES=cuda)
    f = open(logs / log_name, "w")
    prefix = "" if cuda is None else f"[CUDA_VISIBLE_DEVICES={cuda}] "
    print(prefix + shlex.join(argv), flush=True)
    return subprocess.Popen(argv, cwd=ROOT, env=e, stdout=f, stderr=subprocess.STDOUT), f

  def wait(proc, f, log_name):
    rc = proc.wait()
    f.close()
    if rc:
      print(f"failed ({rc}): see {logs / log_name}", file=sys.stderr, flush=True)
    return rc

  slots = gpu_slots(args.gpus, args.parallel)
  proc, f = start(planned["setup"], "setup.log", slots[0])
  if wait(proc, f, "setup.log"):
    return 1
  queue = list(planned["members"].items())
  running: dict[int, tuple] = {}  # slot -> (member, proc, file)
  failures = []
  while queue or running:
    for slot in range(args.parallel):
      if slot not in running and queue:
        k, argv = queue.pop(0)
        running[slot] = (k, *start(argv, f"model_{k}.log", slots[slot]))
    for slot, (k, p, f) in list(running.items()):
      if p.poll() is not None:
        if wait(p, f, f"model_{k}.log"):
          failures.append(k)
        del running[slot]
    time.sleep(0.2)
  if failures:
    print(f"members {failures} failed; rerun to retry them (finished ones are skipped).",
          file=sys.stderr)
    return 1
  proc, f = start(planned["final"], "final.log", slots[0])
  return wait(proc, f, "final.log")


# --- SkyPilot managed jobs --------------------------------------------------------------


def job_prefix(config_spec: str) -> str:
  """soup-EXPERIMENT with dashes: the managed jobs' names start with it."""
  return "soup-" + load_config(config_spec).experiment.replace("_", "-")


def template_path(config_spec: str, accelerator: str, num_nodes: int) -> Path:
  """scripts/sky/EXPERIMENT[-ARG].ACCELERATOR[.xNODES].yaml"""
  path, _, arg = config_spec.partition(":")
  stem = Path(path).stem + (f"-{arg}" if arg else "")
  accel = accelerator.replace(":", "-")
  return SKY_DIR / f"{stem}.{accel}{f'.x{num_nodes}' if num_nodes > 1 else ''}.yaml"


def pinned_jax() -> str:
  """The jax version of requirements.txt, so the accelerator build matches the CPU pins."""
  text = (ROOT / "requirements.txt").read_text()
  return re.search(r"^jax==(\S+)$", text, re.M).group(1)


def setup_script(kind: str) -> str:
  """The task's setup (every node, every host, again after each recovery): Python 3.11 and
  the pinned requirements in .venv, and ~/X linked to the data bucket."""
  extra = f"jax[tpu]=={pinned_jax()}" if kind == "tpu" else f"jax[cuda12]=={pinned_jax()}"
  links = " ".join(HOME_LINKS)
  return "\n".join([
      "set -euo pipefail",
      f"for d in {links}; do",
      f"  [ -e ~/$d ] || ln -s {DATA_MOUNT}/$d ~/$d",
      "done",
      f"python3 -m pip install -q --user uv=={UV_VERSION}",
      "[ -x .venv/bin/python ] || ~/.local/bin/uv venv -q --python 3.11 .venv",
      f"~/.local/bin/uv pip install -q --python .venv/bin/python -r requirements.txt '{extra}'",
      ""])


def run_script(config_spec: str, kind: str, num_nodes: int, extra: Sequence[str] = ()) -> str:
  """The task's run command, the same for every phase (STAGES, MEMBER from the task's envs).

  SkyPilot reruns it from the start after a preemption; soup.main then resumes each stage.
  SKYPILOT_TASK_ID is stable across those recoveries: one line per start in
  launch_logs/$SKYPILOT_TASK_ID.starts counts them. TPU VMs (single-host and pod
  slices) are found by jax.distributed.initialize() itself; GPU nodes get the coordinator
  (first of SKYPILOT_NODE_IPS) and process id (SKYPILOT_NODE_RANK) explicitly.
  """
  lines = [
      "set -euo pipefail",
      'if [ "$SKYPILOT_NODE_RANK" = 0 ]; then',
      '  mkdir -p "$WORKDIR/launch_logs"',
      '  echo "$(date -u +%FT%TZ) stages=$STAGES member=$MEMBER nodes=$SKYPILOT_NUM_NODES" \\',
      '    >> "$WORKDIR/launch_logs/$SKYPILOT_TASK_ID.starts"',
      "fi",
      f'if [ -n "$MEMBER" ] && [ ! -e "$WORKDIR/{MODEL_0_DONE}" ]; then',
      '  echo "No model_0 in $WORKDIR: launch the setup phase first'
      ' (scripts/launch_sweep.py --phase=setup)." >&2',
      "  exit 3",
      "fi",
  ]
  distributed = kind == "tpu" or num_nodes > 1
  if kind == "gpu" and num_nodes > 1:
    lines += [
        'export JAX_COORDINATOR_ADDRESS="$(echo "$SKYPILOT_NODE_IPS" | head -n1)'
        f':{COORDINATOR_PORT}"',
        'export JAX_NUM_PROCESSES="$SKYPILOT_NUM_NODES" JAX_PROCESS_ID="$SKYPILOT_NODE_RANK"',
    ]
  command = [".venv/bin/python", "-m", "soup.main", f"--config={config_spec}"]
  lines.append(" ".join(shlex.quote(a) for a in command) + ' --workdir="$WORKDIR"'
               + (" --distributed" if distributed else "") + " \\")
  lines.append('  --config.stages="$STAGES" --config.sweep.only="$MEMBER"'
               + "".join(f" {shlex.quote(a)}" for a in extra))
  return "\n".join(lines) + "\n"


def _block(text: str, indent: int = 2) -> str:
  pad = " " * indent
  return "|\n" + "".join(pad + line + "\n" if line else "\n" for line in text.splitlines())


def task_yaml(config_spec: str, accelerator: str, num_nodes: int = 1, spot: bool = True,
              extra: Sequence[str] = ()) -> str:
  """The SkyPilot task of this config on this accelerator, as YAML text."""
  kind = check_accelerator(accelerator, num_nodes)
  experiment = load_config(config_spec).experiment
  prefix = job_prefix(config_spec)
  q = json.dumps  # A JSON string is a YAML double-quoted scalar.
  command = ("python scripts/launch_sweep.py --mode=sky --write_template "
             f"--config={config_spec} --accelerator={accelerator}"
             + (f" --num_nodes={num_nodes}" if num_nodes > 1 else ""))
  accel_args = ""
  if kind == "tpu":
    family = accelerator.split("-")[1]
    accel_args = f"  accelerator_args:\n    runtime_version: {TPU_RUNTIME[family]}\n"
  return "".join([
      f"# Generated from {config_spec} by\n#   {command}\n",
      "# Launch with scripts/launch_sweep.py --mode=sky, or one phase by hand:\n",
      f"#   sky jobs launch -n {prefix}-m5 --env BUCKET=B --env DATA_BUCKET=D \\\n",
      f"#     --env STAGES={MEMBER_STAGES} --env MEMBER=5 THIS_FILE\n",
      f"name: {prefix}\n",
      "workdir: .\n",
      "resources:\n",
      f"  accelerators: {q(accelerator)}\n",
      accel_args,
      f"  use_spot: {'true' if spot else 'false'}\n",
      "  job_recovery:\n",
      "    strategy: EAGER_NEXT_REGION\n",
      "    max_restarts_on_errors: 2  # Also retry a crash (not only a preemption), twice.\n",
      f"num_nodes: {num_nodes}\n",
      "envs:\n",
      "  BUCKET: CHANGE-ME  # --env BUCKET=...: the workdirs' bucket.\n",
      "  DATA_BUCKET: CHANGE-ME  # --env DATA_BUCKET=...: data and weights.\n",
      f"  WORKDIR: {q(f'{WORK_MOUNT}/workdirs/{experiment}')}\n",
      f"  STAGES: {q(ALL_STAGES)}  # Unless a phase is set: the whole experiment in one job.\n",
      '  MEMBER: ""  # The member (1-based); empty for the setup and final phases.\n',
      "file_mounts:\n",
      f"  {WORK_MOUNT}:\n    source: gs://${{BUCKET}}\n    mode: MOUNT\n",
      f"  {DATA_MOUNT}:\n    source: gs://${{DATA_BUCKET}}\n    mode: MOUNT\n",
      "setup: ", _block(setup_script(kind)),
      "run: ", _block(run_script(config_spec, kind, num_nodes, extra)),
  ])


def bucket_names(bucket: str, prefix: str, glob: str) -> list[str]:
  """Object names under gs://BUCKET/PREFIX matching GLOB (Google's client, as SkyPilot's)."""
  from google.cloud import storage
  blobs = storage.Client().list_blobs(bucket, prefix=prefix, match_glob=prefix + glob)
  return [blob.name for blob in blobs]


def finished_members(args) -> set[int]:
  """Members whose ingredient is in the bucket: the workdir as the jobs see it, not a local
  path (the launching machine need not mount the bucket)."""
  workdir = args.workdir or f"{WORK_MOUNT}/workdirs/{load_config(args.config).experiment}"
  prefix = workdir[len(WORK_MOUNT) + 1:].strip("/") + f"/{layout.MODELS}/"
  done = f"/{layout.INGREDIENT}/{layout.INGREDIENT_FILE}"
  try:
    names = bucket_names(args.bucket, prefix, "model_*" + done)
  except Exception as e:  # No credentials, no bucket, no network.
    raise SystemExit(f"Cannot list gs://{args.bucket}/{prefix} ({type(e).__name__}: {e}). Run "
                     "`gcloud auth application-default login` and `sky check gcp`, or pass "
                     "--print_only and launch the printed commands.")
  pattern = re.compile(re.escape(prefix) + r"model_(\d+)" + re.escape(done))
  return {int(m.group(1)) for m in map(pattern.fullmatch, names) if m}


def sky_launches(args, task_file: str, finished: frozenset = frozenset()) -> dict:
  """`sky jobs launch` argv lists {"setup": argv, "members": [argv], "final": argv}: setup and
  final wait for their job (and exit with its status); members not in `finished` are
  submitted detached."""
  prefix = job_prefix(args.config)
  common = [f"--env=BUCKET={args.bucket}", f"--env=DATA_BUCKET={args.data_bucket}"]
  if args.workdir:
    common.append(f"--env=WORKDIR={args.workdir}")

  def launch(name, stages, member="", detach=False):
    return (["sky", "jobs", "launch", "--yes", f"--name={prefix}-{name}"]
            + (["--detach-run"] if detach else []) + common
            + [f"--env=STAGES={stages}", f"--env=MEMBER={member}", task_file])

  return {"setup": launch("setup", SETUP_STAGES),
          "members": [launch(f"m{k}", MEMBER_STAGES, str(k), detach=True)
                      for k in member_list(args) if k not in finished],
          "final": launch("final", FINAL_STAGES)}


def run_sky(args) -> int:
  text = task_yaml(args.config, args.accelerator, args.num_nodes, spot=not args.on_demand,
                   extra=args.extra)
  template = template_path(args.config, args.accelerator, args.num_nodes)
  if args.write_template:
    template.parent.mkdir(parents=True, exist_ok=True)
    template.write_text(text)
    print(template.relative_to(ROOT))
    return 0
  if template.exists() and template.read_text() == text:
    task_file = str(template.relative_to(ROOT))
  else:  # Overrides after --, or no committed template for this accelerator.
    handle, task_file = tempfile.mkstemp(prefix="soup-task-", suffix=".yaml")
    os.write(handle, text.encode())
    os.close(handle)
  finished = frozenset()
  if not args.print_only and args.phase != "setup":  # --print_only lists every member.
    finished = frozenset(finished_members(args))
    missing = [k for k in member_list(args) if k not in finished]
    if args.phase == "final" and missing:
      raise SystemExit(f"Members {missing} have no ingredient in gs://{args.bucket} yet: wait for "
                       "their jobs (`sky jobs queue`) or relaunch them with --phase=members.")
    if finished and args.phase != "final":
      print(f"Skipping members {sorted(finished)}: finished (their ingredient is in the bucket).")
  launches = sky_launches(args, task_file, finished)
  steps = {"all": [[launches["setup"]], launches["members"]], "setup": [[launches["setup"]]],
           "members": [launches["members"]], "final": [[launches["final"]]]}[args.phase]
  if args.print_only:
    print("\n".join(shlex.join(argv) for group in steps for argv in group))
    return 0
  for group in steps:
    for argv in group:
      print(shlex.join(argv), flush=True)
      if subprocess.run(argv, cwd=ROOT).returncode:
        print(f"failed: {shlex.join(argv)}", file=sys.stderr)
        return 1
  if args.phase in ("all", "members"):
    print("Members submitted. Watch them with `sky jobs queue`; once all have SUCCEEDED, run "
          "this command again with --phase=final.")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  if args.mode == "sky":
    return run_sky(args)
  planned = plan(args)
  if args.mode == "print":
    print(shlex.join(planned["setup"]))
    for argv in planned["members"].values():
      print(shlex.join(argv))
    print(shlex.join(planned["final"]))
    return 0
  return run_local(args, planned)


if __name__ == "__main__":
  sys.exit(main())
