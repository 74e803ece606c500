"""Tests of csae_jax/cascade/hierarchy.py (parent assignment, hierarchy.json), and the label-free
(csae_jax/evals/structure.py) and ground-truth (csae_jax/evals/synthetic.py) hierarchy scores."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from csae_jax.cascade import hierarchy
from csae_jax.config import SyntheticConfig
from csae_jax.evals import stability, structure
from csae_jax.evals import synthetic as synth_eval
from csae_jax.sources.synthetic import make_ground_truth

D = 16


def _eye(i, d=D):
  e = np.zeros(d, np.float32)
  e[i] = 1.0
  return e


def _level2(dirs_rd):
  """A level-2 SAE whose encoder columns / decoder rows are the given unit directions."""
  dirs = np.asarray(dirs_rd, np.float32)
  n2 = len(dirs)
  return {'w_enc': jnp.asarray(dirs.T), 'b_enc': jnp.zeros(n2), 'w_dec': jnp.asarray(dirs),
          'b_dec': jnp.zeros(D)}


# ---- assign_parents --------------------------------------------------------------------------

def test_assign_parents_nearest_direction_and_unassigned():
  rng = np.random.default_rng(0)
  # Level-2 directions: coordinate axes 0..3 (orthonormal), so scores are exact cosines.
  params2 = _level2([_eye(r) for r in range(4)])
  rows, want = [], []
  for r in (2, 0, 3, 1, 2, 0):
    v = 0.9 * _eye(r) + 0.1 * rng.standard_normal(D).astype(np.float32) * (np.arange(D) >= 4)
    rows.append(v / np.linalg.norm(v))
    want.append(r)
  rows.append(_eye(10))           # orthogonal to every direction: score 0 -> unassigned
  want.append(-1)
  rows.append(-_eye(1))           # anti-aligned: ReLU score 0 -> unassigned
  want.append(-1)
  rows.append(0.0005 * _eye(3) + _eye(9))  # positive but below threshold 1e-3
  want.append(-1)
  parent, strength = hierarchy.assign_parents(params2, np.stack(rows), 1e-3)
  np.testing.assert_array_equal(parent, want)
  assert parent.dtype == np.int64 and strength.shape == (len(rows),)
  rows_arr = np.stack(rows)
  for i, r in enumerate(want[:6]):
    assert strength[i] == pytest.approx(float(rows_arr[i, r]), abs=1e-5)
  assert strength[6] == 0.0 and strength[8] == pytest.approx(0.0005, abs=1e-6)
  # A lower threshold now assigns the weak row.
  parent_lo, _ = hierarchy.assign_parents(params2, rows_arr, 1e-4)
  assert parent_lo[8] == 3 and parent_lo[6] == -1


def test_assign_parents_uses_biases():
  params2 = _level2([_eye(0), _eye(1)])
  params2['b_dec'] = jnp.asarray(_eye(0))  # subtracting e0 kills the score of rows along e0
  params2['b_enc'] = jnp.asarray([0.0, 0.25])
  parent, strength = hierarchy.assign_parents(params2, np.stack([_eye(0), _eye(5)]), 1e-3)
  # Row e0: (e0 - e0) -> scores [0, 0.25]; row e5: (e5 - e0) -> [-1, 0.25] relu -> [0, 0.25].
  np.testing.assert_array_equal(parent, [1, 1])
  np.testing.assert_allclose(strength, [0.25, 0.25], atol=1e-6)
  np.testing.assert_allclose(np.asarray(hierarchy.row_scores(params2, jnp.asarray(_eye(1)))),
                             [0.0, 1.25], atol=1e-6)


# ---- build / labels --------------------------------------------------------------------------

def _example():
  parent = np.array([1, 0, 1, -1, 1, 0, 2, 3, -1])
  strength = np.array([0.2, 0.9, 0.8, 0.0, 0.5, 0.3, 0.7, 0.4, 0.0001])
  alive = np.array([3, 5, 8, 9, 11, 20, 21, 30, 31])
  return parent, strength, alive


def test_build_hierarchy():
  parent, strength, alive = _example()
  h = hierarchy.build(parent, strength, alive)
  assert h['schema_version'] == hierarchy.SCHEMA_VERSION
  ids = [c['id'] for c in h['concepts']]
  assert ids == [1, 0, 2, 3]  # by size desc; ties by id
  by_id = {c['id']: c for c in h['concepts']}
  assert by_id[1]['members'] == [8, 11, 3]  # strengths 0.8, 0.5, 0.2
  assert by_id[1]['weights'] == [0.8, 0.5, 0.2]
  assert by_id[0]['members'] == [5, 20]
  assert by_id[2]['members'] == [21] and by_id[3]['members'] == [30]
  sizes = [len(c['members']) for c in h['concepts']]
  assert sizes == sorted(sizes, reverse=True)
  for c in h['concepts']:
    assert c['weights'] == sorted(c['weights'], reverse=True)
  assert h['unassigned'] == [9, 31]
  assert h['alive'] == sorted(alive.tolist())
  # Every alive feature is either a member of exactly one concept or unassigned.
  members = [m for c in h['concepts'] for m in c['members']]
  assert sorted(members + h['unassigned']) == sorted(alive.tolist())
  # json-serialisable as is (plain ints/floats).
  assert json.loads(json.dumps(h)) == h


def test_labels_inverse_of_build():
  parent, strength, alive = _example()
  h = hierarchy.build(parent, strength, alive)
  lab = hierarchy.labels(h, 40)
  assert lab.shape == (40,)
  np.testing.assert_array_equal(lab[alive], parent)  # unassigned -> -1
  dead = np.setdiff1d(np.arange(40), alive)
  assert np.all(lab[dead] == -1)


def test_build_empty():
  h = hierarchy.build(np.array([-1, -1]), np.zeros(2), np.array([4, 7]))
  assert h['concepts'] == [] and h['unassigned'] == [4, 7]
  assert np.all(hierarchy.labels(h, 10) == -1)


# ---- evals.structure -------------------------------------------------------------------------

def _orthogonal_rows(n, d=32, seed=0):
  q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, n)))
  return q.T.astype(np.float32) * 3.0  # not unit: stats must normalise


def _hier_from_groups(groups, alive=None):
  concepts = [{'id': i, 'members': list(g), 'weights': [1.0] * len(g)}
              for i, g in enumerate(groups)]
  members = sorted(m for g in groups for m in g)
  alive = members if alive is None else alive
  return {'schema_version': 1, 'concepts': concepts,
          'unassigned': sorted(set(alive) - set(members)), 'alive': sorted(alive)}


def test_structure_collapsed_by_one_big_concept():
  w = _orthogonal_rows(20)
  groups = [list(range(16)), [16, 17], [18], [19]]  # 80 % in concept 0
  s = structure.stats(_hier_from_groups(groups), w, n2=10)
  assert s['level2/largest_concept_share'] == pytest.approx(0.8)
  assert s['level2/near_duplicate_sibling_frac'] == 0.0
  assert s['level2/collapsed'] is True
  assert s['level2/concepts_used'] == 4 and s['level2/concepts_ge2'] == 2
  assert s['level2/concepts_used_frac'] == pytest.approx(0.4)
  assert s['level2/coverage'] == 1.0
  assert s['level1/near_duplicate_pairs'] == 0


def test_structure_collapsed_by_near_duplicate_siblings():
  base = _orthogonal_rows(5)
  w = np.repeat(base, 2, axis=0)  # rows 2i and 2i+1 identical
  groups = [[2 * i, 2 * i + 1] for i in range(5)]  # balanced: largest share 0.2
  s = structure.stats(_hier_from_groups(groups), w, n2=5)
  assert s['level2/largest_concept_share'] == pytest.approx(0.2)
  assert s['level2/near_duplicate_sibling_frac'] == pytest.approx(1.0)
  assert s['level2/intra_concept_cos'] == pytest.approx(1.0, abs=1e-5)
  assert s['level2/collapsed'] is True
  assert s['level1/near_duplicate_pairs'] == 5


def test_structure_balanced_orthogonal_not_collapsed():
  w = _orthogonal_rows(24)
  groups = [list(range(4 * i, 4 * i + 4)) for i in range(5)]  # 20 assigned, 4 unassigned
  h = _hier_from_groups(groups, alive=list(range(24)))
  s = structure.stats(h, w, n2=8)
  assert s['level2/collapsed'] is False
  assert s['level2/largest_concept_share'] == pytest.approx(0.2)
  assert s['level2/near_duplicate_sibling_frac'] == 0.0
  assert s['level2/intra_concept_cos'] == pytest.approx(0.0, abs=1e-5)
  assert s['level2/coverage'] == pytest.approx(20 / 24)
  assert s['level2/concepts_used_frac'] == pytest.approx(5 / 8)


def test_structure_empty_hierarchy():
  w = _orthogonal_rows(4)
  s = structure.stats(_hier_from_groups([], alive=[0, 1, 2, 3]), w, n2=4)
  assert s['level2/concepts_used'] == 0 and s['level2/coverage'] == 0.0
  assert s['level2/collapsed'] is False


# ---- evals.synthetic -------------------------------------------------------------------------

_TRUTH = make_ground_truth(SyntheticConfig(d=32, n_parents=8, n_children=6, seed=3))


def _dictionary(n_extra=12, seed=0):
  """True children shuffled among random extra rows; returns (w_dec, feature id of child c)."""
  rng = np.random.default_rng(seed)
  c = len(_TRUTH.children_cd)
  extra = rng.standard_normal((n_extra, 32)).astype(np.float32)
  w = np.concatenate([_TRUTH.children_cd * rng.uniform(0.5, 2, (c, 1)), extra]).astype(np.float32)
  perm = rng.permutation(len(w))
  w_shuffled = np.empty_like(w)
  w_shuffled[perm] = w
  return w_shuffled, perm[:c]


def test_perfect_recovery_scores_one():
  w, feat_of_child = _dictionary()
  n = len(w)
  concept = np.full(n, -1)
  # Concept ids are arbitrary labels (a permutation, offset): scores must not depend on them.
  relabel = np.random.default_rng(1).permutation(8) + 100
  concept[feat_of_child] = relabel[_TRUTH.parent_of_child_c]
  s = synth_eval.scores(_TRUTH.children_cd, _TRUTH.parent_of_child_c, w, np.ones(n, bool), concept)
  assert s['synthetic/child_mcc'] == pytest.approx(1.0, abs=1e-5)
  assert s['synthetic/child_mean_max_cos'] == pytest.approx(1.0, abs=1e-5)
  assert s['synthetic/children_recovered_0.9'] == 1.0
  assert s['synthetic/parent_ari'] == pytest.approx(1.0)
  assert s['synthetic/parent_nmi'] == pytest.approx(1.0)
  feat, matched, _ = synth_eval.match_children(_TRUTH.children_cd, w, np.ones(n, bool))
  np.testing.assert_array_equal(feat, feat_of_child)


def test_shuffled_concepts_score_near_zero():
  w, feat_of_child = _dictionary()
  concept = np.full(len(w), -1)
  shuffled = np.random.default_rng(2).permutation(_TRUTH.parent_of_child_c)
  concept[feat_of_child] = shuffled
  s = synth_eval.scores(_TRUTH.children_cd, _TRUTH.parent_of_child_c, w, np.ones(len(w), bool),
                        concept)
  assert s['synthetic/child_mcc'] == pytest.approx(1.0, abs=1e-5)  # children still recovered
  assert abs(s['synthetic/parent_ari']) < 0.3
  assert s['synthetic/parent_nmi'] < 0.6


def test_unassigned_children_are_singletons():
  w, feat_of_child = _dictionary()
  concept = np.full(len(w), -1)
  concept[feat_of_child] = _TRUTH.parent_of_child_c
  # All children of parent 0 unassigned: as one shared "-1" group they would still score ARI 1.
  concept[feat_of_child[_TRUTH.parent_of_child_c == 0]] = -1
  s = synth_eval.scores(_TRUTH.children_cd, _TRUTH.parent_of_child_c, w, np.ones(len(w), bool),
                        concept)
  assert s['synthetic/parent_ari'] < 1.0 - 1e-6
  assert s['synthetic/parent_nmi'] < 1.0 - 1e-6
  assert s['synthetic/parent_ari'] > 0.5  # the other 7 parents are still perfect


def test_dead_features_are_not_matched():
  w, feat_of_child = _dictionary()
  alive = np.ones(len(w), bool)
  alive[feat_of_child[:3]] = False
  feat, matched, _ = synth_eval.match_children(_TRUTH.children_cd, w, alive)
  assert not np.isin(feat, feat_of_child[:3]).any()
  assert np.all(alive[feat[feat >= 0]])
  concept = np.full(len(w), 0)
  s = synth_eval.scores(_TRUTH.children_cd, _TRUTH.parent_of_child_c, w, alive, concept)
  assert s['synthetic/children_recovered_0.9'] == pytest.approx(1 - 3 / 48)
  assert s['synthetic/child_mcc'] < 0.99
  # No alive features at all.
  feat, matched, mx = synth_eval.match_children(_TRUTH.children_cd, w, np.zeros(len(w), bool))
  assert np.all(feat == -1) and not matched.any() and not mx.any()


def test_fewer_alive_features_than_children():
  w, feat_of_child = _dictionary()
  alive = np.zeros(len(w), bool)
  alive[feat_of_child[:10]] = True
  feat, matched, _ = synth_eval.match_children(_TRUTH.children_cd, w, alive)
  assert (feat >= 0).sum() == 10
  np.testing.assert_array_equal(feat[:10], feat_of_child[:10])
  assert np.all(feat[10:] == -1) and np.all(matched[10:] == 0)


# ---- signals for real data (no ground truth) ---------------------------------------------------

def test_signal_near_duplicate_level1_features_fire_only_on_copies():
  w = _orthogonal_rows(12)
  groups = [list(range(6)), list(range(6, 12))]
  clean = structure.stats(_hier_from_groups(groups), w, n2=2)
  assert clean['level1/near_duplicate_pairs'] == 0 and clean['level1/near_duplicate_frac'] == 0
  w_dup = w.copy()
  w_dup[1] = w[0] + 0.01 * w[5]  # a near-copy of feature 0, and an exact copy of feature 7
  w_dup[8] = w[7]
  s = structure.stats(_hier_from_groups(groups), w_dup, n2=2)
  assert s['level1/near_duplicate_pairs'] == 2
  assert s['level1/near_duplicate_frac'] == pytest.approx(4 / 12)


def test_signal_near_duplicate_concepts_fires_on_a_concept_cut_in_two():
  w = _orthogonal_rows(8)
  groups = [[0, 1], [2, 3], [4, 5], [6, 7]]
  w2 = _orthogonal_rows(4)
  s = structure.stats(_hier_from_groups(groups), w, n2=4, w_dec2_md=w2)
  assert s['level2/near_duplicate_concepts'] == 0
  w2_cut = w2.copy()
  w2_cut[3] = w2[1] * 2.0  # concept 3 points where concept 1 does (norms do not matter)
  s = structure.stats(_hier_from_groups(groups), w, n2=4, w_dec2_md=w2_cut)
  assert s['level2/near_duplicate_concepts'] == 1


def test_signal_concept_shares_and_effective_concepts():
  w = _orthogonal_rows(20)
  even = structure.stats(_hier_from_groups([list(range(5 * i, 5 * i + 5)) for i in range(4)]),
                         w, n2=4)
  assert even['level2/concept_share_max'] == pytest.approx(0.25)
  assert even['level2/effective_concepts'] == pytest.approx(4.0)
  skewed = structure.stats(_hier_from_groups([list(range(17)), [17], [18], [19]]), w, n2=4)
  assert skewed['level2/concept_share_max'] == pytest.approx(0.85)
  assert skewed['level2/concept_share_p50'] == pytest.approx(0.05)
  assert 1.0 < skewed['level2/effective_concepts'] < 2.0


def test_signal_seed_stability_same_grouping_vs_shuffled():
  rng = np.random.default_rng(0)
  w = _orthogonal_rows(24)
  groups = [list(range(6 * i, 6 * i + 6)) for i in range(4)]
  h = _hier_from_groups(groups)
  # run b: the same features in another order and slightly moved, the same grouping
  perm = rng.permutation(24)
  w_b = w[perm] + 0.01 * rng.standard_normal(w.shape)
  inv = np.argsort(perm)
  h_b = _hier_from_groups([[int(inv[m]) for m in g] for g in groups])
  same = stability.hierarchy_stability(w, h, w_b, h_b)
  assert same['stability/feature_match'] == 1.0
  assert same['stability/concept_ari'] == pytest.approx(1.0)
  # run b groups the same features at random: ARI near 0
  labels = rng.permutation(np.repeat(np.arange(4), 6))
  h_rand = _hier_from_groups([[int(inv[m]) for m in np.nonzero(labels == c)[0]] for c in range(4)])
  shuffled = stability.hierarchy_stability(w, h, w_b, h_rand)
  assert shuffled['stability/concept_ari'] < 0.3
  # run b found other features: nothing matches
  other = stability.hierarchy_stability(w, h, rng.standard_normal(w.shape), h_b)
  assert other['stability/feature_match'] < 0.2
