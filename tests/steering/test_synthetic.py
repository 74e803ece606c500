"""The synthetic steering benchmark end to end (short training): steering a concept group moves
its parent's readout probability the right way, far more than a random set of the same size."""

import json
import os

from csae_jax.steering import synthetic


def test_group_steering_moves_the_parent_readout(tmp_path):
  out = synthetic.run(dict(seeds='0', modes='clamp,ablate', arms='none,random,single,concept',
                           steps=300, level2_steps=300, n_eval=512, n_readout=4096),
                      str(tmp_path))
  assert out['readout_accuracy'][0] > 0.95 and out['n_concepts'][0] >= 8
  clamp = out['modes']['clamp']['mean']
  assert clamp['concept']['dp_insert'] > 0.3 and clamp['concept']['dp_suppress'] < -0.3
  assert clamp['concept']['appeared_pct'] > clamp['none']['appeared_pct'] + 30
  # a random set of the same size moves the parent far less (a short-trained level 1 still
  # shares some of the parent's direction, so not nothing)
  assert clamp['concept']['dp_insert'] > clamp['random']['dp_insert'] + 0.3
  assert clamp['concept']['dp_suppress'] < clamp['random']['dp_suppress'] - 0.3
  assert clamp['concept']['removed_pct'] > clamp['random']['removed_pct'] + 30
  ablate = out['modes']['ablate']['mean']
  assert 'dp_insert' not in ablate['concept'] and ablate['concept']['dp_suppress'] < 0
  with open(os.path.join(tmp_path, 'steer_synthetic', 'results.json')) as f:
    assert json.load(f)['seeds'] == [0]
  assert 'appeared %' in (tmp_path / 'steer_synthetic' / 'results.md').read_text()
