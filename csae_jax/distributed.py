"""Joining a multi-process run (TPU pod slice, multi-GPU hosts, SLURM, or local CPU processes).

`initialize` must run before anything touches devices (jax.devices(), an array, a jit): JAX
fixes the set of devices the first time its backend starts. Explicit arguments are
jax.distributed.initialize's; with none, JAX's own cluster detection runs (Cloud TPU VMs, GKE,
SLURM, Open MPI, and JAX_COORDINATOR_ADDRESS), and a machine with no cluster runs one process.
`num_processes=1` alone runs one process without joining a detected cluster (the per-host runs
of a sharded sweep on a pod slice: experiments/sweep.py --single_process).
"""

from __future__ import annotations

import jax
from absl import logging

_NO_CLUSTER = 'coordinator_address should be defined'


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  if coordinator_address is None and num_processes is None and process_id is None:
    try:
      jax.distributed.initialize()
    except ValueError as e:
      if _NO_CLUSTER not in str(e):
        raise ValueError(f'joining the detected cluster failed: {e}; pass '
                         f'--coordinator_address, --num_processes and --process_id') from e
      logging.info('no cluster detected: one process')
    return
  if num_processes == 1 and coordinator_address is None and process_id in (None, 0):
    logging.info('--num_processes=1: one process, no cluster joined')
    return
  if coordinator_address is not None and ':' not in coordinator_address:
    raise ValueError(f'--coordinator_address={coordinator_address} needs a port: HOST:PORT '
                     f'(process 0\'s host, a free port, the same on every process)')
  if num_processes is not None and num_processes < 1:
    raise ValueError(f'--num_processes={num_processes} must be >= 1')
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f'--process_id={process_id} must be in [0, --num_processes={num_processes})')
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except ValueError as e:
    raise ValueError(f'{e}: outside a detected cluster (TPU VM, SLURM, Open MPI) give all of '
                     f'--coordinator_address=HOST:PORT --num_processes=N --process_id=I') from e
