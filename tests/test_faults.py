"""Faults at scale: a corrupt newest checkpoint, a process killed inside an orbax save, and the
checkpoint fallback's edge cases (in-process, on a tiny state)."""

import glob
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csae_jax import checkpoint as ckpt_lib
from tests import cli_runs

# The run, with orbax's final rename (tmp dir -> step dir, the commit) replaced by a SIGKILL at
# one step of one stage: the process dies inside the save, as on a preemption.
KILL_IN_SAVE = '''
import os, runpy, signal, sys
from orbax.checkpoint._src.path import async_path
rename = async_path.rename
async def killing_rename(src, dst):
  if str(dst).endswith(os.environ['CSAE_KILL_AT']):
    os.kill(os.getpid(), signal.SIGKILL)
  return await rename(src, dst)
async_path.rename = killing_rename
sys.argv = ['experiments.run', *sys.argv[1:]]
runpy.run_module('experiments.run', run_name='__main__')
'''


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(cli_reference, tmp_path):
  ref_wd, ref_export = cli_reference
  wd = tmp_path / 'wd'
  shutil.copytree(ref_wd, wd)
  # flip bytes in the largest data file of level 1's newest checkpoint (orbax itself restores
  # such a file without complaint: the values are silently wrong)
  data = max(glob.glob(str(wd / 'level1' / 'ckpt' / '60' / '**' / 'd' / '*'), recursive=True),
             key=os.path.getsize)
  raw = bytearray(open(data, 'rb').read())
  raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(b ^ 0xFF for b in raw[len(raw) // 2:][:64])
  open(data, 'wb').write(raw)
  kept = cli_runs.commit_record(wd, 'level1', 40)
  r = cli_runs.run(f'--workdir={wd}')
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'Traceback' not in r.stderr
  assert cli_runs.commit_record(wd, 'level1', 40) == kept
  warning = [line for line in r.stderr.splitlines() if 'unreadable' in line]
  assert len(warning) == 1, r.stderr[-3000:]
  assert 'step 60' in warning[0] and os.path.relpath(data, wd / 'level1' / 'ckpt' / '60') in \
      warning[0] and 'resumed from step 40' in warning[0]
  assert len(os.listdir(wd / 'level1' / 'unreadable')) == 1  # kept for inspection
  assert ckpt_lib.verify_checksums(str(wd / 'level1' / 'ckpt' / '60')) == ''  # saved again
  cli_runs.same_exports(ref_export, wd / 'export')  # steps 41..60 retrained to the same result


def test_kill_inside_a_save_leaves_nothing_a_restart_picks(cli_reference, tmp_path):
  _, ref_export = cli_reference
  wd = tmp_path / 'wd'
  r = cli_runs.run(f'--workdir={wd}', code=KILL_IN_SAVE,
                   env_=cli_runs.env(CSAE_KILL_AT=os.path.join('level1', 'ckpt', '40')))
  assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
  ckpt = wd / 'level1' / 'ckpt'
  assert (ckpt / '20').exists()
  partial = [n for n in os.listdir(ckpt) if n.startswith('40.orbax-checkpoint-tmp')]
  assert len(partial) == 1 and not (ckpt / '40').exists()  # the half-written save is there
  kept = cli_runs.commit_record(wd, 'level1', 20)
  again = cli_runs.run(f'--workdir={wd}')
  assert cli_runs.commit_record(wd, 'level1', 20) == kept  # resumed from step 20
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'unreadable' not in again.stderr  # it was never a candidate
  assert not [n for n in os.listdir(ckpt) if 'tmp' in n]  # and is cleaned up
  cli_runs.same_exports(ref_export, wd / 'export')


def _stage(wd, keep=3):
  return ckpt_lib.Stage(str(wd), 'toy', manifest={'config_hash': 'h', 'data_fingerprint': 'f'},
                        keep=keep, overwrite=False)


def _toy_state(v):
  return {'w': jnp.full((64, 8), float(v)), 'step': jnp.asarray(v, jnp.int32)}


def test_fallback_without_checksums_and_when_nothing_restores(tmp_path, caplog):
  st = _stage(tmp_path)
  for s in (1, 2):
    st.save(s, _toy_state(s))
  abstract = jax.eval_shape(lambda: _toy_state(0))
  # newest: a checkpoint from before checksums existed, whose data file was cut short
  d2 = tmp_path / 'toy' / 'ckpt' / '2'
  os.remove(d2 / ckpt_lib.CHECKSUMS)
  for f in glob.glob(str(d2 / '**' / 'd' / '*'), recursive=True):
    open(f, 'wb').close()
  step, state = st.restore_latest(abstract)
  assert step == 1 and float(state['w'][0, 0]) == 1.0
  assert 'step 2 is unreadable: orbax cannot restore it' in caplog.text
  assert st.manager.all_steps() == [1]
  st.save(2, _toy_state(2))  # the step can be saved again
  # every checkpoint broken: a clear error, nothing moved
  for s in (1, 2):
    for f in glob.glob(str(tmp_path / 'toy' / 'ckpt' / str(s) / '**' / 'd' / '*'),
                       recursive=True):
      os.remove(f)
  with pytest.raises(ValueError, match=r'no checkpoint .* can be restored \(newest: step 2, '
                                       r'file .* is missing\).*overwrite'):
    st.restore_latest(abstract)
  assert sorted(st.manager.all_steps()) == [1, 2]
  st.close()
