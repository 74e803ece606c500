"""The command line as users type it (subprocesses, so flag parsing and exit codes are real)."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd=ROOT):
  env = {**os.environ, 'PYTHONPATH': ROOT}
  return subprocess.run([sys.executable, '-m', 'experiments.run', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def test_arrays_command_as_documented(tmp_path):
  data = tmp_path / 'acts'
  data.mkdir()
  rng = np.random.default_rng(0)
  np.save(data / 'part0.npy', rng.standard_normal((900, 16)).astype(np.float32))
  np.save(data / 'part1.npy', rng.standard_normal((600, 16)).astype(np.float16))
  wd = tmp_path / 'wd'
  r = _run('--config=experiments/configs/csae.py', f'--config.data.path={data}',
           f'--workdir={wd}', '--config.train.steps=40', '--config.level2.steps=40',
           '--config.train.batch_size=128', '--config.data.eval_rows=256')
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'CSAE (staged) done' in r.stdout and 'level1/variance_explained' in r.stdout
  metrics = json.loads((wd / 'export' / 'metrics.json').read_text())
  assert metrics['level1/n_latents'] == 16 * 16 and metrics['level2/n_latents'] == 128
  assert np.load(wd / 'export' / 'level1_decoder.npy').shape == (256, 16)
  assert (wd / 'level1' / 'manifest.json').exists() and (wd / 'level2' / 'manifest.json').exists()
  manifest = json.loads((wd / 'level2' / 'manifest.json').read_text())
  assert manifest['parent']['stage'] == 'level1' and manifest['schema_version'] == 1
  assert manifest['data']['scale'] > 0


def test_cli_errors_are_one_clear_line(tmp_path):
  r = _run('--config.level1.nlatents=5')
  assert r.returncode == 2
  assert "unknown config key 'level1.nlatents'" in r.stderr and 'n_latents' in r.stderr
  for bad, want in (('--config.train.steps=abc', 'int'), ('--config.level1.auxk_weight=x', 'float')):
    r = _run(bad)  # ill-typed values: the same one line as config.py's type errors
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    key = bad.split('=')[0][len('--config.'):]
    assert f"config key '{key}' must be of type {want}" in r.stderr
  r = _run(f'--config.data.path={tmp_path / "missing"}', f'--workdir={tmp_path / "wd"}')
  assert r.returncode == 2 and 'does not exist' in r.stderr
  assert 'Traceback' not in r.stderr


def test_hard_kill_then_same_command_resumes_to_the_same_result(tmp_path):
  """SIGKILL mid-training (possibly mid-save), rerun the same command: same exports."""
  import signal
  import time
  args = ['--config=experiments/configs/csae.py:small', '--config.train.steps=400',
          '--config.train.checkpoint_every=50', '--config.level2.steps=100',
          '--config.level2.restarts=2', '--config.data.eval_rows=2048']
  ref = _run(*args, f'--workdir={tmp_path / "ref"}')
  assert ref.returncode == 0, ref.stderr[-2000:]
  wd = tmp_path / 'wd'
  env = {**os.environ, 'PYTHONPATH': ROOT}
  proc = subprocess.Popen([sys.executable, '-m', 'experiments.run', *args, f'--workdir={wd}'],
                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (wd / 'level1' / 'ckpt' / '150').exists():
    assert proc.poll() is None, 'run ended before it could be killed'
    assert time.time() < deadline
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  assert not (wd / 'export').exists()  # it really died mid-run
  again = _run(*args, f'--workdir={wd}')
  assert again.returncode == 0, again.stderr[-2000:]
  for name in ('level1_decoder.npy', 'level2_decoder.npy'):
    np.testing.assert_array_equal(np.load(tmp_path / 'ref' / 'export' / name),
                                  np.load(wd / 'export' / name))
  assert (json.loads((tmp_path / 'ref' / 'export' / 'hierarchy.json').read_text())
          == json.loads((wd / 'export' / 'hierarchy.json').read_text()))
