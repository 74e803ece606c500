"""A tiny CLI run of the default pipeline, shared by the fault and multi-process tests (their
reference is one 1-process run with 2 fake devices; see conftest.cli_reference)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# keep 3: steps 20, 40 and 60 of level 1 stay on disk
ARGS = ['--config=experiments/configs/csae.py:small', '--config.train.steps=60',
        '--config.train.checkpoint_every=20', '--config.train.keep_checkpoints=3',
        '--config.train.batch_size=128', '--config.level2.steps=20',
        '--config.level2.restarts=1', '--config.data.eval_rows=1024']


def env(devices: int = 2, **extra) -> dict:
  out = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}', **extra}
  return out


def run(*args, code=None, env_=None, timeout=900) -> subprocess.CompletedProcess:
  """`python -m experiments.run ARGS... args...` (or `python -c code args...`)."""
  cmd = ([sys.executable, '-c', code] if code else [sys.executable, '-m', 'experiments.run'])
  return subprocess.run([*cmd, *ARGS, *args], cwd=ROOT, env=env_ or env(), capture_output=True,
                        text=True, timeout=timeout)


def reference(base) -> tuple:
  """(workdir, a copy of its export/) of the 1-process run."""
  wd = base / 'ref'
  r = run(f'--workdir={wd}')
  assert r.returncode == 0, r.stderr[-3000:]
  saved = base / 'ref_export'
  shutil.copytree(wd / 'export', saved)
  return wd, saved


def same_exports(a, b, atol: float = 0.0) -> None:
  """Two export/ folders hold the same decoders (within atol) and the same hierarchy."""
  for name in ('level1_decoder.npy', 'level2_decoder.npy'):
    np.testing.assert_allclose(np.load(a / name), np.load(b / name), rtol=0, atol=atol)
  assert json.loads((a / 'hierarchy.json').read_text()) == json.loads(
      (b / 'hierarchy.json').read_text())


def commit_record(wd, stage: str, step: int) -> str:
  """Orbax's metadata of a committed checkpoint (its save and commit times): unchanged after a
  restart iff the restart resumed after it instead of training that step again."""
  return (wd / stage / 'ckpt' / str(step) / '_CHECKPOINT_METADATA').read_text()


def free_port(lo: int = 0) -> int:
  """A port nobody listens on: the OS's pick, or the first free one from lo."""
  for port in ([0] if lo == 0 else range(lo, 65536)):
    with socket.socket() as s:
      try:
        s.bind(('127.0.0.1', port))
        return s.getsockname()[1]
      except OSError:
        continue
  raise RuntimeError(f'no free port from {lo}')


def wait_all(procs, log_prefix, timeout: float = 900) -> tuple[list[int], list[str]]:
  """Waits for every process (killing those that outlive the timeout); (exit codes, the logs
  `{log_prefix}.{i}.log` they wrote)."""
  deadline = time.time() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(1, deadline - time.time()))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [p.returncode for p in procs], [open(f'{log_prefix}.{i}.log').read()
                                         for i in range(len(procs))]
