"""Learning-rate schedules: warmup from 0, then the named shape."""

import numpy as np
import pytest

from csae_jax.train import optim


def _at(kind, steps=(0, 5, 10, 50, 80, 90, 99)):
  s = optim.lr_schedule(1.0, 100, 10, 0.8, kind)
  return [float(s(i)) for i in steps]


def test_linear_decay_is_warmup_constant_then_linear():
  np.testing.assert_allclose(_at('linear_decay'), [0, 0.5, 1, 1, 1, 0.5, 0.05], atol=1e-6)


def test_cosine_decays_from_the_end_of_warmup():
  v = _at('cosine')
  np.testing.assert_allclose(v[:3], [0, 0.5, 1], atol=1e-6)
  assert v[3] == pytest.approx(0.5 * (1 + np.cos(np.pi * 40 / 90)), abs=1e-6)
  assert v[-1] < 0.01 and all(a >= b for a, b in zip(v[2:], v[3:]))


def test_constant_stays_after_warmup():
  np.testing.assert_allclose(_at('constant'), [0, 0.5, 1, 1, 1, 1, 1], atol=1e-6)


def test_unknown_schedule_is_refused():
  with pytest.raises(ValueError, match="lr_schedule = 'step'"):
    optim.lr_schedule(1.0, 100, 10, 0.8, 'step')
