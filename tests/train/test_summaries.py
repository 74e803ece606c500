"""TensorBoard output of a short pipeline run, read back with TensorBoard's own event
accumulator: the expected tags, each logged step once and in order, equal to history.jsonl; a
run killed after a checkpoint and resumed continues the same stream (the kept steps with their
first run's wall times, the lost ones once)."""

import json
import os

import numpy as np

from csae_jax import modes
from experiments.configs import csae

TAGS = {'level1': ('level1/loss', 'level1/fvu', 'level1/l0', 'level1/dead_frac'),
        'level2': ('level2/loss', 'level2/fvu')}


def _cfg():
  c = csae.get_config('small')
  c.update_from_flattened_dict({
      'train.steps': 60, 'train.log_every': 10, 'train.checkpoint_every': 20,
      'level2.steps': 40, 'level2.restarts': 1, 'data.eval_rows': 512,
      'train.batch_size': 128, 'level1.n_latents': 64})
  return c


def _scalars(wd: str, stage: str) -> dict[str, list]:
  """tag -> [ScalarEvent(wall_time, step, value)], as TensorBoard loads WD/tensorboard/<stage>."""
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(os.path.join(wd, 'tensorboard', stage),
                                           size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  return {t: list(acc.Scalars(t)) for t in acc.Tags()['scalars']}


def _history(wd: str, stage: str) -> list[dict]:
  with open(os.path.join(wd, stage, 'history.jsonl')) as f:
    return [json.loads(line) for line in f]


class _Kill(Exception):
  pass


def _kill_at(step):
  def hook(done, state):
    if done == step:
      raise _Kill(step)
  return hook


def test_event_files_hold_the_curves_and_a_resumed_run_continues_them(tmp_path):
  wd = str(tmp_path)
  try:  # dies in level 1 after its step-40 checkpoint; step 50 was logged, then lost
    modes.run(_cfg(), wd, hooks=[_kill_at(55)])
  except _Kill:
    pass
  else:
    raise AssertionError('the hook did not stop the run')
  first = _scalars(wd, 'level1')
  assert [e.step for e in first['level1/loss']] == [10, 20, 30, 40, 50]

  modes.run(_cfg(), wd)
  # `tensorboard --logdir WD` finds one run per stage
  from tensorboard.backend.event_processing import plugin_event_multiplexer
  mux = plugin_event_multiplexer.EventMultiplexer().AddRunsFromDirectory(wd)
  assert sorted(mux.Runs()) == [os.path.join('tensorboard', s) for s in TAGS]
  for stage, tags in TAGS.items():
    files = os.listdir(os.path.join(wd, 'tensorboard', stage))
    assert len(files) == 1 and files[0].startswith('events.out.tfevents.'), files
    got, rows = _scalars(wd, stage), _history(wd, stage)
    assert set(tags) <= set(got), (stage, sorted(got))
    for tag in tags:  # every logged row once, at its step, with its value (float32 on disk)
      steps = [e.step for e in got[tag]]
      assert steps == [r['step'] for r in rows] and steps == sorted(set(steps)), (stage, tag)
      np.testing.assert_allclose([e.value for e in got[tag]], [r[tag] for r in rows], rtol=1e-6)
  # level 1 was resumed at 40: steps up to 40 are the killed run's events (its wall times),
  # 50 was written again by the resumed run, after them
  resumed = {e.step: e for e in _scalars(wd, 'level1')['level1/loss']}
  assert sorted(resumed) == [10, 20, 30, 40, 50, 60]
  for e in first['level1/loss'][:4]:
    assert (resumed[e.step].wall_time, resumed[e.step].value) == (e.wall_time, e.value)
  assert resumed[50].wall_time > first['level1/loss'][-1].wall_time
