#!/usr/bin/env python
r"""Runs a sweep's members as separate soup.main processes: locally, in parallel, or on TPU slices.

The members of the random search are independent fine-tunes of the same
model_0, so they can run anywhere that sees the workdir. Three phases:
  1. once:          --config.stages=pretrain,probe          (imports weights, model_0)
  2. per member K:  --config.stages=pretrain,probe,sweep --config.sweep.only=K
                    (pretrain/probe are then loaded, not redone)
  3. once:          --config.stages=evaluate,soups,report
Phase 1 comes first so that parallel members never race to write model_0.
Members whose ingredient exists (workdir/models/model_K/ingredient/
ingredient.json) are skipped; every stage also resumes by itself.

Modes:
  --mode=print   print the commands of all three phases, run nothing.
  --mode=local   run them here: members one after another, or --parallel=N at a
                 time; with --gpus=0,1,2,3 each of the N slots gets its own
                 CUDA_VISIBLE_DEVICES share (GPUs dealt round-robin to slots).
                 Logs go to workdir/launch_logs/.
  --mode=tpu     one member per TPU VM slice named {tpu_prefix}-{K}, through
                 `gcloud compute tpus tpu-vm ssh ... --worker=all` with
                 soup.main --distributed (every host of a multi-host slice runs
                 the same command). The workdir must be a filesystem every slice
                 mounts (Filestore/NFS, or gcsfuse), and the repository with its
                 .venv must be at --remote_dir on each VM. --create adds the
                 `tpu-vm create` commands; --print_only prints instead of running.
Anything after `--` is passed to every soup.main command (config overrides).

  python scripts/launch_sweep.py --config=configs/clip_vit_b32_imagenet.py \
      --workdir=workdirs/clip_vit_b32 --mode=local --parallel=8 --gpus=0,1,2,3,4,5,6,7
  python scripts/launch_sweep.py --config=configs/clip_vit_b32_imagenet.py \
      --workdir=/mnt/shared/clip_vit_b32 --mode=tpu --tpu_prefix=soup --zone=us-central2-b \
      --accelerator=v4-8 --print_only
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
SETUP_STAGES = "pretrain,probe"
MEMBER_STAGES = "pretrain,probe,sweep"
FINAL_STAGES = "evaluate,soups,report"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = []
  if "--" in argv:
    cut = argv.index("--")
    argv, extra = argv[:cut], argv[cut + 1:]
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--config", required=True, help="config file[:arg], as for soup.main")
  p.add_argument("--workdir", required=True)
  p.add_argument("--mode", choices=("print", "local", "tpu"), default="print")
  p.add_argument("--members", default="", help="1-based member indices, e.g. 1,2,5 (default: all)")
  p.add_argument("--parallel", type=int, default=1, help="local: processes at a time")
  p.add_argument("--gpus", default="", help="local: GPU ids to deal to the parallel slots")
  p.add_argument("--python", default=sys.executable, help="local: the interpreter to run")
  p.add_argument("--tpu_prefix", default="soup", help="tpu: slice K is named PREFIX-K")
  p.add_argument("--zone", default="", help="tpu: the slices' zone")
  p.add_argument("--accelerator", default="v4-8", help="tpu: accelerator type, for --create")
  p.add_argument("--tpu_version", default="tpu-ubuntu2204-base", help="tpu: VM image, for --create")
  p.add_argument("--remote_dir", default="~/soup", help="tpu: the repository on the VMs")
  p.add_argument("--create", action="store_true", help="tpu: also emit the create commands")
  p.add_argument("--print_only", action="store_true", help="tpu: print the commands, run nothing")
  args = p.parse_args(argv)
  args.extra = extra
  if args.mode == "tpu" and not args.zone:
    p.error("--mode=tpu needs --zone")
  if args.parallel < 1:
    p.error("--parallel must be >= 1")
  return args


def load_config(spec: str):
  """get_config(arg) of the config file, as soup.main would build it (before overrides)."""
  path, _, arg = spec.partition(":")
  sys.path.insert(0, str(ROOT))  # The configs package (and soup, which configs import).
  import configs
  module = configs.module_of(ROOT / path if not os.path.isabs(path) else path)
  return module.get_config(arg) if arg else module.get_config()


def num_members(args) -> int:
  """sweep.num_members, or the override among the pass-through arguments."""
  for a in args.extra:
    if a.startswith("--config.sweep.num_members="):
      return int(a.split("=", 1)[1])
  sys.path.insert(0, str(ROOT))
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
  return (Path(workdir) / "models" / f"model_{k}" / "ingredient" / "ingredient.json").exists()


def soup_main(args, stages: str, member: Optional[int] = None, distributed: bool = False) -> list[str]:
  """The soup.main argument list (after the interpreter) of one phase."""
  cmd = ["-m", "soup.main", f"--config={args.config}", f"--workdir={args.workdir}"]
  if distributed:
    cmd.append("--distributed")
  cmd.append(f"--config.stages={stages}")
  if member is not None:
    cmd.append(f"--config.sweep.only={member}")
  return cmd + list(args.extra)


def plan(args) -> dict:
  """{"setup": argv, "members": {K: argv}, "final": argv} for this machine (python = args.python)."""
  todo = [k for k in member_list(args) if not is_done(args.workdir, k)]
  py = [args.python]
  return {"setup": py + soup_main(args, SETUP_STAGES),
          "members": {k: py + soup_main(args, MEMBER_STAGES, k) for k in todo},
          "final": py + soup_main(args, FINAL_STAGES)}


def tpu_commands(args) -> dict:
  """Shell commands {"create": [...], "setup": str, "members": [...], "final": str}: setup and
  final on the first slice, member K on slice PREFIX-K."""
  todo = [k for k in member_list(args) if not is_done(args.workdir, k)]
  zone = shlex.quote(args.zone)

  def name(k):
    return f"{args.tpu_prefix}-{k}"

  def ssh(k, stages, member=None):
    inner = " ".join(shlex.quote(a) for a in soup_main(args, stages, member, distributed=True))
    remote = f"cd {args.remote_dir} && .venv/bin/python {inner}"
    return (f"gcloud compute tpus tpu-vm ssh {name(k)} --zone={zone} --worker=all "
            f"--command={shlex.quote(remote)}")

  first = todo[0] if todo else 1
  create = [f"gcloud compute tpus tpu-vm create {name(k)} --zone={zone} "
            f"--accelerator-type={shlex.quote(args.accelerator)} --version={shlex.quote(args.tpu_version)}"
            for k in todo] if args.create else []
  return {"create": create, "setup": ssh(first, SETUP_STAGES),
          "members": [ssh(k, MEMBER_STAGES, k) for k in todo], "final": ssh(first, FINAL_STAGES)}


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
  logs = Path(args.workdir) / "launch_logs"
  logs.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))

  def start(argv, log_name, cuda=None):
    e = dict(env) if cuda is None else dict(env, CUDA_VISIBLE_DEVICES=cuda)
    f = open(logs / log_name, "w")
    print(("" if cuda is None else f"[CUDA_VISIBLE_DEVICES={cuda}] ") + shlex.join(argv), flush=True)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  if args.mode == "tpu":
    cmds = tpu_commands(args)
    if args.print_only:
      print("\n".join([*cmds["create"], cmds["setup"], *cmds["members"], cmds["final"]]))
      return 0
    for c in cmds["create"] + [cmds["setup"]]:
      subprocess.run(c, shell=True, check=True)
    procs = [subprocess.Popen(c, shell=True) for c in cmds["members"]]  # One slice each, at once.
    if any(p.wait() for p in procs):
      print("some members failed; rerun to retry them (finished ones are skipped).", file=sys.stderr)
      return 1
    return subprocess.run(cmds["final"], shell=True).returncode
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
