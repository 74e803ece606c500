"""Merging level-2 fragments: fragments of one concept merge, distinct (even correlated)
concepts do not, unassigned rows stay unassigned, and a concept cap forces the best merges."""

import numpy as np
import pytest
import sklearn.metrics

from csae_jax.cascade import merge


def _concepts(n_parents=6, children=(6, 3, 8, 4, 5, 7), a=0.64, corr=0.5, d=128, seed=0):
  """Unit children rows of parents whose pairs (0, 1), (2, 3), ... have cosine `corr`."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((d, n_parents)))
  p = q.T.copy()
  for i in range(1, n_parents, 2):
    p[i] = corr * p[i - 1] + np.sqrt(1 - corr ** 2) * p[i]
  parent_r = np.repeat(np.arange(n_parents), children[:n_parents])
  u = rng.standard_normal((len(parent_r), d))
  u -= np.sum(u * p[parent_r], 1, keepdims=True) * p[parent_r]
  u /= np.linalg.norm(u, axis=1, keepdims=True)
  rows = a * p[parent_r] + np.sqrt(1 - a * a) * u
  return rows / np.linalg.norm(rows, axis=1, keepdims=True), parent_r


def _fragment(parent_r, pieces, seed=0):
  """Split every parent's rows into `pieces` random fragments (singletons included)."""
  rng = np.random.default_rng(seed)
  return parent_r * pieces + rng.integers(0, pieces, len(parent_r))


@pytest.mark.parametrize("a", [0.55, 0.64, 0.8])
def test_fragments_of_one_concept_merge_back(a):
  rows, parent_r = _concepts(a=a)
  frag_r = _fragment(parent_r, 3)
  merged_r, info = merge.merge_labels(rows, frag_r, min_ratio=0.75)
  # the merged partition equals the true one (ids differ): same-parent <=> same label
  same_true = parent_r[:, None] == parent_r[None, :]
  same_merged = merged_r[:, None] == merged_r[None, :]
  np.testing.assert_array_equal(same_true, same_merged)
  assert len(info['ratios']) == len(np.unique(frag_r)) - len(np.unique(parent_r))


def test_correlated_concepts_stay_apart_and_cap_forces_the_closest_pair():
  rows, parent_r = _concepts(corr=0.5)
  merged_r, info = merge.merge_labels(rows, parent_r, min_ratio=0.75)
  np.testing.assert_array_equal(merged_r, parent_r)
  assert info['ratios'] == [] and info['groups'] == {}
  # capped at 5 concepts: one merge, and it joins a correlated pair (ratio ~ 0.5)
  capped_r, info = merge.merge_labels(rows, parent_r, min_ratio=0.75, max_concepts=5)
  assert len(np.unique(capped_r)) == 5
  (group,) = info['groups'].values()
  assert sorted(group) in ([0, 1], [2, 3], [4, 5])
  assert 0.3 < info['ratios'][0] < 0.7


def test_unassigned_rows_and_unrelated_singletons_stay():
  rows, parent_r = _concepts()
  rng = np.random.default_rng(3)
  junk = rng.standard_normal((10, rows.shape[1]))
  all_rows = np.concatenate([rows, junk / np.linalg.norm(junk, axis=1, keepdims=True)])
  labels = np.concatenate([parent_r, 100 + np.arange(10)])  # junk: singleton concepts
  labels[0] = -1
  merged, _ = merge.merge_labels(all_rows, labels, min_ratio=0.75)
  assert merged[0] == -1
  np.testing.assert_array_equal(merged[len(rows):], 100 + np.arange(10))
  np.testing.assert_array_equal(merged[1:len(rows)], parent_r[1:])


def test_refine_moves_strays_home_and_ejects_unrelated_members():
  rows, parent_r = _concepts()
  rng = np.random.default_rng(5)
  junk = rng.standard_normal((6, rows.shape[1]))
  all_rows = np.concatenate([rows, junk / np.linalg.norm(junk, axis=1, keepdims=True)])
  labels = np.concatenate([parent_r, np.repeat([0, 2], 3)])  # junk dumped into concepts 0, 2
  strays = [int(np.nonzero(parent_r == 1)[0][0]), int(np.nonzero(parent_r == 4)[0][0])]
  labels[strays] = [3, 5]                                     # two children in the wrong place
  refined, moved = merge.refine_labels(all_rows, labels, min_ratio=0.75)
  np.testing.assert_array_equal(refined[:len(rows)], parent_r)
  junk_labels = refined[len(rows):]
  assert len(set(junk_labels)) == 6 and not set(junk_labels) & set(parent_r)  # each alone
  assert moved >= 8  # (a stray junk row may hop once before it is ejected)


def test_measurably_distinct_concepts_stay_apart_above_the_ratio():
  # parents at cosine 0.8: their children's cross / within ratio passes 0.7, so the ratio alone
  # merges every pair; with 30 members each, within - cross is many standard errors, and the
  # z-test keeps all six apart. With 3 members each the difference is not measurable, and
  # the ratio decides again.
  rows, parent_r = _concepts(children=(30,) * 6, corr=0.8, d=192)
  by_ratio, _ = merge.merge_labels(rows, parent_r, min_ratio=0.7, max_z=None)
  assert len(np.unique(by_ratio)) == 3
  kept, info = merge.merge_labels(rows, parent_r, min_ratio=0.7, max_z=merge.MAX_Z)
  np.testing.assert_array_equal(kept, parent_r)
  assert info['pair_spread'] > 0
  few_rows, few_parent = _concepts(children=(3,) * 6, corr=0.8, d=192)
  few, _ = merge.merge_labels(few_rows, few_parent, min_ratio=0.7, max_z=merge.MAX_Z)
  assert len(np.unique(few)) < 6
  # forced by a cap, distinct concepts still merge (the closest pairs)
  capped, info = merge.merge_labels(rows, parent_r, min_ratio=0.7, max_concepts=3,
                                    max_z=merge.MAX_Z)
  assert len(np.unique(capped)) == 3 and info['distinct_merged'] == 3
  assert sorted(sorted(g) for g in info['groups'].values()) == [[0, 1], [2, 3], [4, 5]]


def test_cap_without_merge_dissolves_the_least_evidence_instead_of_mixing_concepts():
  # six parents in correlated pairs plus a tight 2-row stray group; cap at 6 concepts
  rows, parent_r = _concepts(children=(8, 8, 8, 8, 8, 8), corr=0.5, d=128)
  rng = np.random.default_rng(5)
  v = rng.standard_normal(128)
  stray = v + 0.3 * rng.standard_normal((2, 128))
  all_rows = np.concatenate([rows, stray / np.linalg.norm(stray, axis=1, keepdims=True)])
  labels = np.concatenate([parent_r, [6, 6]])
  kept, info = merge.dissolve_or_merge_to(all_rows, labels, 6, merge=False)
  np.testing.assert_array_equal(kept[:len(rows)], parent_r)  # every parent intact
  assert (kept[len(rows):] == -1).all() and info == {'dissolved': 1, 'forced_merges': 0}
  # merge=True (the paper's rule, no merge step before it): the closest pair merges instead
  merged, info = merge.dissolve_or_merge_to(all_rows, labels, 6, merge=True)
  assert info['forced_merges'] == 1 and len(np.unique(merged)) == 6


def test_z_tested_band_merges_fragments_below_the_ratio_but_not_distinct_concepts():
  # fragments of one parent with ratio in [0.5, 0.7) (a parent row among some fragments' members
  # makes them look less alike) merge; correlated parents at a ratio in the band stay apart
  rows, parent_r = _concepts(children=(30,) * 6, corr=0.8, d=192)
  # correlated pairs' ratio is ~0.8 here: put them in the band by asking for ratio >= 0.9
  kept, _ = merge.merge_labels(rows, parent_r, min_ratio=0.5, max_z=merge.MAX_Z, z_below=0.9)
  np.testing.assert_array_equal(kept, parent_r)
  frag_r = _fragment(parent_r, 3)
  merged, _ = merge.merge_labels(rows, frag_r, min_ratio=0.5, max_z=merge.MAX_Z, z_below=0.9)
  same_true = parent_r[:, None] == parent_r[None, :]
  np.testing.assert_array_equal(merged[:, None] == merged[None, :], same_true)
  # above z_below the z-test is not asked: the correlated pairs merge by their ratio
  fused, _ = merge.merge_labels(rows, parent_r, min_ratio=0.5, max_z=merge.MAX_Z, z_below=0.7)
  assert len(np.unique(fused)) == 3


def _family(rng, n_parents, n_children, d, child_cos, parent_corr=0.0):
  """Unit child rows of n_parents parents (optionally correlated), parent-major."""
  base = rng.normal(size=(1, d))
  parents = rng.normal(size=(n_parents, d)) + np.sqrt(parent_corr / (1 - parent_corr + 1e-9)) * base * (parent_corr > 0)
  parents /= np.linalg.norm(parents, axis=1, keepdims=True)
  rows = []
  for p in parents:
    noise = rng.normal(size=(n_children, d))
    noise -= noise @ p[:, None] * p[None]
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    rows.append(child_cos * p + np.sqrt(1 - child_cos ** 2) * noise)
  return np.concatenate(rows), np.repeat(np.arange(n_parents), n_children)


def test_isolated_rows_flags_rows_without_a_sibling_and_keeps_siblings():
  rng = np.random.default_rng(0)
  d = 96
  children, _ = _family(rng, 8, 5, d, 0.6)
  # noise features that tile the space: orthogonal to each other and to the children's span
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  span = np.linalg.qr(children.T)[0]
  comp = q[:, :40] - span @ (span.T @ q[:, :40])
  comp = np.linalg.qr(comp)[0].T[:30]
  rows = np.concatenate([children, comp])
  iso = merge.isolated_rows(rows, 0.5)
  assert not iso[:40].any()
  assert iso[40:].mean() > 0.9
  assert not merge.isolated_rows(rows, 0.0).any()


def test_split_labels_separates_two_concepts_in_one_label_and_keeps_one_concept_whole():
  rng = np.random.default_rng(1)
  rows, parent = _family(rng, 2, 8, 128, 0.7, parent_corr=0.6)
  cos_parents = np.corrcoef(rows[parent == 0].mean(0), rows[parent == 1].mean(0))[0, 1]
  assert 0.3 < cos_parents < 0.95  # correlated, not identical
  one = np.zeros(len(rows), np.int64)
  split, n = merge.split_labels(rows, one, 0.5, max_z=3.0, z_below=0.7)
  assert n == 1
  assert sklearn.metrics.adjusted_rand_score(parent, split) == 1.0
  whole, n = merge.split_labels(rows[parent == 0], one[parent == 0], 0.5, max_z=3.0,
                                z_below=0.7)
  assert n == 0 and (whole == 0).all()
