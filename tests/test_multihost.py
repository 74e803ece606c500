"""Two real processes on 127.0.0.1 (1 CPU device each, gloo collectives) train the default
pipeline: the same result as one process with the same global batch, and a kill of one process
followed by a restart of both resumes, on the built-in source and on exported arrays (the
activation stream). Every process is killed if the test fails or times out."""

import os
import signal
import subprocess
import sys
import time

from tests import cli_runs


def _launch(wd, env_of):
  """Both processes of the run; env_of(i) is process i's environment (flags via ARGS)."""
  procs = []
  for i in range(2):
    log = open(f'{wd}.{i}.log', 'w')
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'experiments.run', *cli_runs.ARGS, f'--workdir={wd}',
         *env_of(i)[1]], cwd=cli_runs.ROOT, env=env_of(i)[0], stdout=log,
        stderr=subprocess.STDOUT))
  return procs


def _wait(procs, wd, timeout=900):
  return cli_runs.wait_all(procs, wd, timeout)


def _kill_after_checkpoint(procs, wd, victim: int) -> None:
  """SIGKILLs process `victim` once level 1's step-40 checkpoint is committed, then its peer
  (which fails in a collective or on the coordinator's heartbeat, or is stopped)."""
  try:
    deadline = time.time() + 600
    while not (wd / 'level1' / 'ckpt' / '40').exists():  # committed (renamed) by orbax
      assert all(p.poll() is None for p in procs), 'the run ended before it could be killed'
      assert time.time() < deadline
      time.sleep(0.05)
    procs[victim].send_signal(signal.SIGKILL)
    assert procs[victim].wait() == -signal.SIGKILL
    try:
      procs[1 - victim].wait(timeout=20)
    except subprocess.TimeoutExpired:
      procs[1 - victim].kill()
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()


def _with_flags(port):
  return lambda i: (cli_runs.env(devices=1), ['--coordinator_address', f'127.0.0.1:{port}',
                                             '--num_processes=2', f'--process_id={i}'])


def _slurm(port):
  """A SLURM job step of 2 tasks, as srun sets it: the plain command, no flags (JAX detects
  it and derives the coordinator port from the job id)."""
  job = port - (65535 - 2**12 + 1)
  return lambda i: (cli_runs.env(devices=1, SLURM_JOB_ID=str(job), SLURM_STEP_NODELIST='127.0.0.1',
                                 SLURM_NTASKS='2', SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                                 SLURM_STEP_NUM_NODES='1'), [])


def test_two_processes_match_one_process(cli_reference, tmp_path):
  _, ref_export = cli_reference
  wd = tmp_path / 'mp'
  codes, logs = _wait(_launch(wd, _with_flags(cli_runs.free_port())), wd)
  assert codes == [0, 0], '\n'.join(log[-3000:] for log in logs)
  assert 'CSAE (staged) done' in logs[0] and 'process 1 of 2 done' in logs[1]
  cli_runs.same_exports(ref_export, wd / 'export', atol=1e-4)


def test_kill_one_process_then_restart_both_resumes(cli_reference, tmp_path):
  _, ref_export = cli_reference
  wd = tmp_path / 'mp'
  port = cli_runs.free_port(65535 - 2**12 + 1)
  _kill_after_checkpoint(_launch(wd, _slurm(port)), wd, victim=1)
  assert not (wd / 'export').exists()  # it really died mid-run
  kept = cli_runs.commit_record(wd, 'level1', 40)
  codes, logs = _wait(_launch(wd, _slurm(cli_runs.free_port(65535 - 2**12 + 1))), wd)
  assert codes == [0, 0], '\n'.join(log[-3000:] for log in logs)
  assert cli_runs.commit_record(wd, 'level1', 40) == kept  # resumed from step 40
  cli_runs.same_exports(ref_export, wd / 'export', atol=1e-4)


def test_exported_arrays_kill_and_restart_resume_the_stream(tmp_path):
  """The activation stream across processes and a kill: 2 processes on exported arrays, one
  killed after the step-40 checkpoint, both restarted, end with the decoders and hierarchy of
  one uninterrupted process (same global batch). Each process reads only its half of every
  batch, and the restart continues at step 40 of the same order: a row read twice or skipped
  by either process would change the decoders."""
  from csae_jax import config as config_lib
  from csae_jax.sources import synthetic
  data = tmp_path / 'data'
  synthetic.SyntheticSource(config_lib.SyntheticConfig(), batch_size=128, seed=0).write(
      str(data), 12_000)
  arrays_args = [f'--config.data.path={data}', '--config.data.holdout_rows=1024']
  ref = cli_runs.run('--workdir=' + str(tmp_path / 'ref'), *arrays_args)
  assert ref.returncode == 0, ref.stderr[-3000:]
  wd = tmp_path / 'mp'
  with_data = lambda flags: lambda i: (flags(i)[0], flags(i)[1] + arrays_args)  # noqa: E731
  _kill_after_checkpoint(_launch(wd, with_data(_with_flags(cli_runs.free_port()))), wd, victim=0)
  assert not (wd / 'export').exists()
  kept = cli_runs.commit_record(wd, 'level1', 40)
  codes, logs = _wait(_launch(wd, with_data(_with_flags(cli_runs.free_port()))), wd)
  assert codes == [0, 0], '\n'.join(log[-3000:] for log in logs)
  assert cli_runs.commit_record(wd, 'level1', 40) == kept  # resumed from step 40
  cli_runs.same_exports(tmp_path / 'ref' / 'export', wd / 'export', atol=1e-4)
