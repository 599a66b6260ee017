"""jax.distributed.initialize() for `soup.main --distributed`, on any launcher.

TPU VMs (a single host or every host of a pod slice) and SLURM are detected by
JAX itself, so nothing is passed there. A multi-node GPU cluster has no such
runtime to detect: the launcher exports JAX_COORDINATOR_ADDRESS (host:port of
process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID, which are passed explicitly.
scripts/launch_sweep.py's SkyPilot tasks set them from SkyPilot's variables: the
first of SKYPILOT_NODE_IPS with a fixed port, SKYPILOT_NUM_NODES and
SKYPILOT_NODE_RANK.
"""

from __future__ import annotations

import os
from typing import Mapping

ENV_KEYS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_kwargs(environ: Mapping[str, str]) -> dict:
  """Keyword arguments of jax.distributed.initialize() from the environment ({}: detect)."""
  values = [environ.get(k, "") for k in ENV_KEYS]
  if not any(values):
    return {}
  if not all(values):
    missing = ", ".join(k for k, v in zip(ENV_KEYS, values) if not v)
    raise SystemExit(f"--distributed: {missing} unset; set all of {', '.join(ENV_KEYS)} "
                     "(multi-node GPU) or none of them (TPU VMs and SLURM are detected).")
  address, count, rank = values
  if ":" not in address:
    raise SystemExit(f"JAX_COORDINATOR_ADDRESS={address!r}: expected host:port.")
  try:
    count, rank = int(count), int(rank)
  except ValueError:
    raise SystemExit(f"JAX_NUM_PROCESSES={count!r}, JAX_PROCESS_ID={rank!r}: expected integers.")
  if not 0 <= rank < count:
    raise SystemExit(f"JAX_PROCESS_ID={rank} outside 0..{count - 1} (JAX_NUM_PROCESSES={count}).")
  return dict(coordinator_address=address, num_processes=count, process_id=rank)


def initialize(environ: Mapping[str, str] = os.environ) -> None:
  import jax
  jax.distributed.initialize(**initialize_kwargs(environ))
