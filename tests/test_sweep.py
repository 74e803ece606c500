"""mode=sweep, sweep.level=2: level-2 SAEs of different seeds, learning rates and sizes n2 share
one vmapped step (smaller dictionaries padded with masked latents), and each member trains as
the same level 2 trained alone would."""

import dataclasses
import json

import numpy as np
import pytest

from csae_jax import config as config_lib
from csae_jax import modes, stages
from csae_jax.cascade import level1 as level1_lib
from csae_jax.cascade import staged
from experiments.configs import csae


def tiny(**overrides):
  c = csae.get_config('small')
  c.train.steps = 60
  c.train.batch_size = 256
  c.train.checkpoint_every = 60
  c.train.log_every = 20
  c.data.eval_rows = 1024
  c.level2.steps = 20
  c.level2.oversplit = 1.0  # trains n2 latents, not half the rows: the sizes differ
  c.mode = 'sweep'
  c.sweep.level = 2
  c.update_from_flattened_dict(overrides)
  return c


def test_each_vmapped_level2_member_equals_its_own_run(tmp_path):
  wd = str(tmp_path / 'wd')
  # seed 1 (not the base 0), two learning rates (lr_scale != 1), two sizes (4 is padded to 7).
  # Four members: with 8 on this CPU, XLA's batched matmuls sum in another order and Adam turns
  # that float noise into ~lr-sized differences, padding or not (an 8-member stack of one n2
  # differs from its alone runs the same way, as level2.restarts = 8 does).
  m = modes.run(tiny(**{'sweep.seeds': '1', 'sweep.lr': '2e-3,5e-3', 'sweep.n2': '4,7'}), wd)
  rows = m['sweep/results']
  assert [(r['seeds'], r['lr'], r['n2']) for r in rows] == [
      (1, lr, n) for lr in (2e-3, 5e-3) for n in (4, 7)]
  assert [r['latents_trained'] for r in rows] == [4, 7, 4, 7]
  with open(f'{wd}/sweep_level2/results.json') as f:
    assert json.load(f) == rows
  decoders = np.load(f'{wd}/sweep_level2/decoders.npz')
  # the same level 1 (its finished stage, restored), then each member alone: a level 2 with
  # that seed, lr and n2 and one restart, on the same rows
  cfg, source, mesh = stages.setup(tiny(), wd)
  l1, _, _ = level1_lib.train(cfg, source, mesh, wd)
  _, rows_rd = l1.alive_rows()
  for r in rows:
    cfg_r = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, seed=r['seeds']),
        level2=dataclasses.replace(cfg.level2, lr=r['lr'], n_latents=r['n2'], restarts=1))
    alone = staged.train(cfg_r, source, mesh, str(tmp_path / f'alone{r["member"]}'), rows_rd, {})
    w_nd = np.asarray(alone.params['w_dec'])
    assert w_nd.shape == decoders[f'member_{r["member"]}'].shape
    # float tolerance (measured max difference 1.1e-7); a padding latent taking part, or the
    # member's seed / lr not being its own, moves rows by > 1e-3
    np.testing.assert_allclose(decoders[f'member_{r["member"]}'], w_nd, rtol=0, atol=1e-6)
    assert r['fvu'] == pytest.approx(alone.metrics['level2/fvu'], abs=1e-6)
  assert not np.allclose(decoders['member_0'], decoders['member_2'], atol=1e-3)  # lr differs


def test_level2_sweep_rejects_what_it_cannot_stack(tmp_path):
  with pytest.raises(ValueError, match=r'sweep\.k does not apply to sweep\.level = 2'):
    config_lib.from_config_dict(tiny(**{'sweep.k': '2,3'}))
  with pytest.raises(ValueError, match=r'sweep\.n2 .* must hold integers'):
    config_lib.from_config_dict(tiny(**{'sweep.n2': '4.5'}))
  with pytest.raises(ValueError, match=r"level2.arch = 'matryoshka'"):
    modes.run(tiny(**{'sweep.n2': '4,6', 'level2.arch': 'matryoshka'}), str(tmp_path / 'm'))
