"""A harvest by 2 real processes on 127.0.0.1 (1 CPU device each, the CLI's multi-process flags)
into one workdir: each process harvests only its chunks (c % 2), process 0 writes the manifests
and the index, and the store equals a 1-process harvest of the same images exactly; a restart
resumes at each process's unfinished chunks; a store of other settings, or a workdir that
is not shared, fails on both."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from csae_jax.sources import harvest
from experiments.configs import harvest as harvest_config
from tests import cli_runs
from tests.sources.test_harvest import save_tiny_tokenizer
from tests.vlms import conftest as vlm

SITES = 'vision/block_1,vision/merger'  # two stores from one compiled vision-tower forward
N_IMAGES = 5  # 1 image per chunk: process 0 owns chunks 0, 2, 4 and process 1 chunks 1, 3


def _overrides(folder: str, images: str, **kw) -> dict:
  out = {'model': 'qwen3-vl', 'model_path': folder, 'images': images, 'image_size': 32,
         'batch_size': 1, 'chunk_images': 1, 'sites': SITES}
  out.update(kw)
  return out


def _two_processes(wd, overrides: dict, timeout: float = 300, wd_1=None
                   ) -> tuple[list[int], list[str]]:
  """`python -m experiments.run --config=experiments/configs/harvest.py ...` as processes 0 and
  1 of one run (process 1 on wd_1 if given); (exit codes, logs). Both are killed if they outlive
  the timeout."""
  port, procs = cli_runs.free_port(), []
  flags = [f'--config.{k}={v}' for k, v in overrides.items()]
  for i, workdir in enumerate((wd, wd_1 or wd)):
    log = open(f'{wd}.{i}.log', 'w')
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'experiments.run', '--config=experiments/configs/harvest.py',
         *flags, f'--workdir={workdir}', f'--coordinator_address=127.0.0.1:{port}',
         '--num_processes=2', f'--process_id={i}'], cwd=cli_runs.ROOT,
        env=cli_runs.env(devices=1), stdout=log, stderr=subprocess.STDOUT))
  return cli_runs.wait_all(procs, wd, timeout)


def _read_store(wd) -> dict:
  """{site folder/file: content} of every file of every site folder: .npy as raw bytes (exact),
  .npz as arrays (zip entries carry their write time), .json parsed."""
  out, root = {}, os.path.join(wd, 'activations')
  for site in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))):
    for name in sorted(os.listdir(os.path.join(root, site))):
      path = os.path.join(root, site, name)
      if name.endswith('.npz'):
        with np.load(path) as z:
          out[f'{site}/{name}'] = {k: z[k] for k in z.files}
      elif name.endswith('.json'):
        with open(path) as f:
          out[f'{site}/{name}'] = json.load(f)
      else:
        with open(path, 'rb') as f:
          out[f'{site}/{name}'] = f.read()
  return out


def _assert_same_store(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    if isinstance(value, dict) and value and isinstance(next(iter(value.values())), np.ndarray):
      assert sorted(got[key]) == sorted(value), key
      for k, v in value.items():
        np.testing.assert_array_equal(got[key][k], v, err_msg=f'{key} {k}')
    else:
      assert got[key] == value, key


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(the 1-process store, the 2-process workdir, its logs, its harvest.json, the overrides)."""
  root = tmp_path_factory.mktemp('harvest_mp')
  folder = str(root / 'model')
  vlm.make_tiny_qwen3_vl(folder)
  save_tiny_tokenizer(folder)
  images = root / 'images'
  images.mkdir()
  rng = np.random.default_rng(1)
  for i in range(N_IMAGES):
    Image.fromarray(rng.integers(0, 256, (30 + 5 * i, 40, 3), dtype=np.uint8)).save(
        images / f'im{i}.png')
  overrides = _overrides(folder, str(images))
  c = harvest_config.get_config()
  c.update_from_flattened_dict(overrides)
  harvest.run(c, str(root / 'one'))
  wd = root / 'two'
  codes, logs = _two_processes(wd, overrides)
  assert codes == [0, 0], '\n'.join(log[-3000:] for log in logs)
  with open(wd / 'activations' / 'harvest.json') as f:
    record = json.load(f)
  return _read_store(root / 'one'), wd, logs, record, overrides


def test_two_processes_equal_one_process(runs):
  one, wd, logs, record, _ = runs
  assert 'shard_00004.npy' in ' '.join(one) and len(one) == 2 * (3 * N_IMAGES + 3)
  _assert_same_store(_read_store(wd), one)
  assert record['chunks_run'] == N_IMAGES and record['processes'] == 2
  assert record['rows'] == {'vision/block_1': N_IMAGES * 16, 'vision/merger': N_IMAGES * 4}
  assert 'harvested 5 images' in logs[0]


def test_each_process_wrote_only_its_chunks(runs):
  _, _, logs, record, _ = runs
  assert record['chunks_run_by_process'] == [[0, 2, 4], [1, 3]]
  # each process's own account of what it harvested
  assert 'process 0 of 2: harvesting chunks [0, 2, 4]' in logs[0]
  assert 'process 1 of 2: harvesting chunks [1, 3]' in logs[1]
  assert 'process 1 of 2 done (harvested chunks [1, 3])' in logs[1]
  assert 'harvesting chunks' not in logs[0].replace('process 0 of 2: harvesting', '')


def test_restart_resumes_each_process_unfinished_chunks(runs, tmp_path):
  """As after a kill: chunk 2 (process 0's) and chunk 3 (process 1's) incomplete, no index."""
  one, wd, _, _, overrides = runs
  again = tmp_path / 'two'
  shutil.copytree(wd, again)
  site = again / 'activations' / 'vision_block_1'
  for name in ('shard_00002.idx.npz', 'shard_00003.npy', 'index.npz', 'images.json'):
    os.remove(site / name)
  codes, logs = _two_processes(again, overrides)
  assert codes == [0, 0], '\n'.join(log[-3000:] for log in logs)
  with open(again / 'activations' / 'harvest.json') as f:
    assert json.load(f)['chunks_run_by_process'] == [[2], [3]]
  _assert_same_store(_read_store(again), one)


def test_other_settings_fail_on_every_process(runs):
  _, wd, _, _, overrides = runs
  before = _read_store(wd)
  codes, logs = _two_processes(wd, {**overrides, 'image_size': 64})
  assert codes == [2, 2], '\n'.join(log[-3000:] for log in logs)
  for log in logs:
    assert 'holds a harvest made with other settings' in log and "'image_size'" in log, log
  _assert_same_store(_read_store(wd), before)  # nothing deleted or written


def test_a_workdir_not_shared_fails_on_every_process(runs, tmp_path):
  """Process 1 does not see process 0's store (here: another folder, as a host-local disk):
  both stop at once instead of process 0 waiting for chunks that never come."""
  _, _, _, _, overrides = runs
  codes, logs = _two_processes(tmp_path / 'host0', overrides, wd_1=tmp_path / 'host1')
  assert codes == [2, 2], '\n'.join(log[-3000:] for log in logs)
  assert 'process(es) [1] of this harvest could not open the store' in logs[0], logs[0]
  assert 'on a filesystem they all see' in logs[1], logs[1]
  assert not os.path.exists(tmp_path / 'host0' / 'activations' / 'harvest.json')
