"""Co-activation counts and parents: hand-made codes with known answers, batching independence."""

import numpy as np
import pytest

from csae_jax.baselines import coactivation


def _hand_codes():
  """6 inputs; codes are real-valued (activity = code > 0, magnitude irrelevant).

  a0 fires on rows 0, 1, 2; b0 on rows 0, 1 and b1 on row 2  -> parent b0, P = 2/3
  a1 fires on rows 3, 4; b1 on row 3 and b2 on row 4         -> tie 1-1: lowest index b1, P = 1/2
  a2 never fires                                             -> -1
  a3 fires on row 5 only, where no b fires                   -> -1
  """
  a = np.zeros((6, 4), np.float32)
  a[[0, 1, 2], 0] = [0.01, 5.0, 0.3]
  a[[3, 4], 1] = [2.0, 0.02]
  a[5, 3] = 1.0
  a[0, 2] = -1.0  # negative: not active
  b = np.zeros((6, 3), np.float32)
  b[[0, 1], 0] = [7.0, 1e-3]
  b[[2, 3], 1] = [0.5, 0.5]
  b[4, 2] = 3.0
  return a, b


def test_parents_on_hand_made_codes():
  a, b = _hand_codes()
  counter = coactivation.CoactivationCounter(4, 3)
  counter.add(a, b)
  np.testing.assert_array_equal(counter.fires_a, [3, 2, 0, 1])
  np.testing.assert_array_equal(counter.fires_b, [2, 2, 1])
  np.testing.assert_array_equal(counter.counts,
                                [[2, 1, 0], [0, 1, 1], [0, 0, 0], [0, 0, 0]])
  assert counter.counts.dtype == np.int64 and counter.n_rows == 6
  parent, strength = coactivation.parents_by_coactivation(counter.counts, counter.fires_a)
  np.testing.assert_array_equal(parent, [0, 1, -1, -1])
  np.testing.assert_allclose(strength, [2 / 3, 1 / 2, 0, 0])


def test_alive_mask_removes_a_parent():
  a, b = _hand_codes()
  counter = coactivation.CoactivationCounter(4, 3)
  counter.add(a, b)
  parent, strength = coactivation.parents_by_coactivation(
      counter.counts, counter.fires_a, alive_a=np.array([True, False, True, True]))
  np.testing.assert_array_equal(parent, [0, -1, -1, -1])
  assert strength[1] == 0


def test_counts_match_numpy_and_do_not_depend_on_batching(monkeypatch):
  rng = np.random.default_rng(0)
  t, n_a, n_b = 203, 12, 7
  a = rng.random((t, n_a)) * (rng.random((t, n_a)) < 0.3)
  b = rng.random((t, n_b)) * (rng.random((t, n_b)) < 0.4)
  want = (a > 0).astype(np.int64).T @ (b > 0).astype(np.int64)
  one = coactivation.CoactivationCounter(n_a, n_b)
  one.add(a, b)
  np.testing.assert_array_equal(one.counts, want)
  # Odd-sized batches (padded to powers of two), and a device accumulator forced to flush to the
  # host every few rows: the totals must not change.
  monkeypatch.setattr(coactivation, '_MAX_DEVICE_ROWS', 60)
  many = coactivation.CoactivationCounter(n_a, n_b)
  for lo, hi in [(0, 1), (1, 50), (50, 51), (51, 130), (130, 203)]:
    many.add(a[lo:hi], b[lo:hi])
  np.testing.assert_array_equal(many.counts, want)
  np.testing.assert_array_equal(many.fires_a, (a > 0).sum(0))
  np.testing.assert_array_equal(many.fires_b, (b > 0).sum(0))
  assert many.n_rows == t
  # Reading the totals mid-stream does not disturb later accumulation.
  many.add(a[:10], b[:10])
  np.testing.assert_array_equal(many.counts, want + (a[:10] > 0).T.astype(int) @ (b[:10] > 0))


def test_value_errors_name_the_shapes():
  counter = coactivation.CoactivationCounter(4, 3)
  with pytest.raises(ValueError, match=r'\[t, 4\].*\[t, 3\].*\(5, 4\).*\(6, 3\)'):
    counter.add(np.zeros((5, 4)), np.zeros((6, 3)))
  with pytest.raises(ValueError, match=r'\(5, 3\)'):
    counter.add(np.zeros((5, 3)), np.zeros((5, 3)))
  with pytest.raises(ValueError, match='n_a = 0'):
    coactivation.CoactivationCounter(0, 3)
  with pytest.raises(ValueError, match=r'fires_a \[n_a\]'):
    coactivation.parents_by_coactivation(np.zeros((4, 3)), np.zeros(5))
  with pytest.raises(ValueError, match='alive_a'):
    coactivation.parents_by_coactivation(np.zeros((4, 3)), np.zeros(4), alive_a=np.ones(3))
