"""The vectorised index permutation behind the activation stream's shuffle."""

import numpy as np
import pytest
import scipy.stats

from csae_jax.sources.permutation import Permutation


@pytest.mark.parametrize('n', [1, 2, 3, 4, 5, 17, 64, 65, 1000, 4097, 65536, 99991])
def test_is_a_bijection_of_0_n(n):
  out = Permutation(n, seed=3)(np.arange(n))
  np.testing.assert_array_equal(np.sort(out), np.arange(n))


def test_pure_function_of_n_seed_and_index():
  p, q = Permutation(1000, 'a'), Permutation(1000, 'a')
  i = np.array([5, 999, 0, 5, 17])
  np.testing.assert_array_equal(p(i), q(i))
  np.testing.assert_array_equal(p(i)[[0, 3]], [p(np.array([5]))[0]] * 2)  # any order, repeats
  np.testing.assert_array_equal(p(i[2:3]), p(np.arange(1000))[0:1])
  assert not np.array_equal(p(np.arange(1000)), Permutation(1000, 'b')(np.arange(1000)))
  assert not np.array_equal(p(np.arange(1000)), Permutation(1001, 'a')(np.arange(1000)))


def test_positions_are_uniform_over_seeds():
  # Where index 0 and index n - 1 land over 2,000 seeds: uniform over 20 bins (chi-square);
  # a permutation that kept any structure (identity-like, reversed, a fixed offset) fails.
  n, seeds = 100, 2000
  for i in (0, n - 1):
    land = np.array([Permutation(n, s)(np.array([i]))[0] for s in range(seeds)])
    counts = np.bincount(land // 5, minlength=20)
    assert scipy.stats.chisquare(counts).pvalue > 1e-4, counts
  # and neighbouring indices are not mapped to neighbours
  out = Permutation(100_000, 0)(np.arange(100_000))
  assert abs(np.corrcoef(np.arange(100_000), out)[0, 1]) < 0.02
  assert np.median(np.abs(np.diff(out))) > 10_000


def test_bad_input_names_the_range():
  with pytest.raises(ValueError, match='n >= 1'):
    Permutation(0, 1)
  with pytest.raises(ValueError, match=r'\[0, 10\)'):
    Permutation(10, 1)(np.array([3, 10]))
  with pytest.raises(ValueError, match=r'\[0, 10\)'):
    Permutation(10, 1)(np.array([-1]))
