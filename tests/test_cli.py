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
  r = _run('--config.train.steps=abc')
  assert r.returncode != 0 and 'config.train.steps' in r.stderr
  r = _run(f'--config.data.path={tmp_path / "missing"}', f'--workdir={tmp_path / "wd"}')
  assert r.returncode == 2 and 'does not exist' in r.stderr
  assert 'Traceback' not in r.stderr
