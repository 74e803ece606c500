"""Decoder-row clustering: planted groups are recovered exactly by all three methods, results are
deterministic and canonical, strengths are cosines to the unit cluster directions."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from csae_jax.baselines import clustering

METHODS = {'agglomerative': lambda rows, k, seed: clustering.agglomerative(rows, k),
           'spectral': clustering.spectral, 'kmeans': clustering.kmeans}


def _planted(per_group, n_groups, d, noise, seed=0):
  """Rows = noisy copies of n_groups orthonormal (if they fit) directions, shuffled, with
  arbitrary norms (the methods must not care)."""
  rng = np.random.default_rng(seed)
  g = rng.standard_normal((d, n_groups))
  dirs_kd = np.linalg.qr(g)[0].T if n_groups <= d else (g / np.linalg.norm(g, axis=0)).T
  truth_r = rng.permutation(np.repeat(np.arange(n_groups), per_group))
  rows_rd = dirs_kd[truth_r] + noise * rng.standard_normal((len(truth_r), d)) / np.sqrt(d)
  return rows_rd * rng.uniform(0.5, 3.0, (len(truth_r), 1)), truth_r, dirs_kd


@pytest.mark.parametrize('method', sorted(METHODS))
def test_recovers_planted_groups_deterministically(method):
  rows_rd, truth_r, dirs_kd = _planted(per_group=5, n_groups=4, d=16, noise=0.3)
  labels_r, strength_r, centres_kd = METHODS[method](rows_rd, 4, 0)
  assert adjusted_rand_score(truth_r, labels_r) == 1.0
  # canonical ids: numbered by first appearance
  _, first = np.unique(labels_r, return_index=True)
  np.testing.assert_array_equal(labels_r[np.sort(first)], np.arange(4))
  # unit directions, each the planted direction of its group; strength = cosine to it
  assert centres_kd.shape == (4, 16) and centres_kd.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(centres_kd, axis=1), 1.0, atol=1e-6)
  for c in range(4):
    true_dir = dirs_kd[truth_r[labels_r == c][0]]
    assert centres_kd[c] @ true_dir > 0.95
  u_rd = rows_rd / np.linalg.norm(rows_rd, axis=1, keepdims=True)
  np.testing.assert_allclose(strength_r, np.sum(u_rd * centres_kd[labels_r], 1), atol=1e-6)
  # same inputs and seed: the same result, bit for bit
  again = METHODS[method](rows_rd, 4, 0)
  for a, b in zip((labels_r, strength_r, centres_kd), again):
    np.testing.assert_array_equal(a, b)


def test_spectral_sparse_graph_beats_dense_affinity_on_many_small_groups():
  """Why `spectral` keeps only nearest neighbours: with 100 pairs of non-orthogonal directions
  in d = 32 the many small positive cosines of unrelated rows swamp the dense affinity."""
  rows_rd, truth_r, _ = _planted(per_group=2, n_groups=100, d=32, noise=0.6)
  sparse = adjusted_rand_score(truth_r, clustering.spectral(rows_rd, 100, 0)[0])
  dense = adjusted_rand_score(
      truth_r, clustering.spectral(rows_rd, 100, 0, n_neighbors=len(rows_rd) - 1)[0])
  assert sparse > 0.9 and sparse > dense + 0.1
  assert adjusted_rand_score(truth_r, clustering.agglomerative(rows_rd, 100)[0]) == 1.0


@pytest.mark.parametrize('method', sorted(METHODS))
def test_one_cluster_per_row_and_value_errors(method):
  rows_rd, _, _ = _planted(per_group=2, n_groups=3, d=8, noise=0.1)
  labels_r, strength_r, _ = METHODS[method](rows_rd, 6, 0)
  assert len(set(labels_r)) == 6
  np.testing.assert_allclose(strength_r, 1.0, atol=1e-6)
  with pytest.raises(ValueError, match=r'n_clusters = 7 .*number of rows \(6\)'):
    METHODS[method](rows_rd, 7, 0)
  with pytest.raises(ValueError, match=r'n_clusters = 0'):
    METHODS[method](rows_rd, 0, 0)
  with pytest.raises(ValueError, match=r'rows \[r, d\].*\(6,\)'):
    METHODS[method](rows_rd[:, 0], 2, 0)
