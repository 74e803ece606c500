"""Hierarchy-coherence metrics: HMS (hand-computed, guard, null), taxonomy, parent/child
structure and synthetic ground-truth recovery, each on a case whose answer is known."""

import numpy as np
import pytest

from csae_jax.config import SyntheticConfig
from csae_jax.evals import hierarchy as H
from csae_jax.sources.synthetic import SyntheticSource

S2, S5 = np.sqrt(2.0), np.sqrt(5.0)


def hier(groups: dict) -> dict:
  """hierarchy.json from {concept id: [members]}."""
  members = [m for ms in groups.values() for m in ms]
  return {'schema_version': 1, 'unassigned': [], 'alive': sorted(members),
          'concepts': [{'id': c, 'members': list(ms), 'weights': [1.0] * len(ms)}
                       for c, ms in groups.items()]}


# 3 images, 2-d embeddings; columns are features (hand-worked prototypes in the comments).
EMB_IE = np.array([[1., 0.], [0., 1.], [1., 1.]])
ACTS_IN = np.array([
    # f0      f1  f2  f3  f4
    [2.0,    0., 1., 0., 0.],
    [0.0,    1., 3., 0., 2.],
    [0.0,    1., 1., 4., 0.]])
# min-max weights: f0 [1,0,0] -> (1,0); f1 [0,1,1] -> (1,2)/2; f2 [0,1,0] -> (0,1);
# f3 [0,0,1] -> (1,1); f4 [0,1,0] -> (0,1).
# concept 0 = {f0, f1}: cos((1,0), (1,2)) = 1/sqrt5.
# concept 1 = {f2, f3, f4}: cos(f2,f3) = 1/sqrt2, cos(f2,f4) = 1, cos(f3,f4) = 1/sqrt2.
HMS_0, HMS_1 = 1 / S5, (2 / S2 + 1) / 3
LABELS = np.array([0, 0, 1, 1, 1])


def test_prototypes_and_hms_match_the_hand_computed_values():
  proto_ne, fired_n = H.prototypes(ACTS_IN, EMB_IE)
  assert fired_n.all()
  np.testing.assert_allclose(proto_ne, [[1, 0], [.5, 1], [0, 1], [1, 1], [0, 1]], atol=1e-7)
  h = H.hms(LABELS, proto_ne, fired_n)
  np.testing.assert_allclose(h['per_concept'], [HMS_0, HMS_1], atol=1e-7)
  assert h['mean'] == pytest.approx((HMS_0 + HMS_1) / 2)
  assert h['median'] == pytest.approx((HMS_0 + HMS_1) / 2)
  assert (h['min'], h['max']) == (pytest.approx(HMS_0), pytest.approx(HMS_1))
  assert h['concepts_ge2'] == 2 and h['coverage'] == 1.0 and h['excluded_never_fired'] == 0


def test_hms_matches_a_brute_force_pairwise_loop():
  rng = np.random.default_rng(0)
  proto_ne = rng.standard_normal((40, 7))
  labels_n = rng.integers(-1, 6, 40)
  h = H.hms(labels_n, proto_ne, np.ones(40, bool))
  u = proto_ne / np.linalg.norm(proto_ne, axis=1, keepdims=True)
  expect = []
  for c in range(6):
    m = np.nonzero(labels_n == c)[0]
    if len(m) >= 2:
      expect.append(np.mean([u[i] @ u[j] for i in m for j in m if i < j]))
  np.testing.assert_allclose(h['per_concept'], expect, atol=1e-10)


def test_guard_excludes_never_firing_features_that_would_otherwise_score_cosine_one():
  acts_in = np.concatenate([ACTS_IN, np.zeros((3, 3))], axis=1)  # f5, f6, f7 never fire
  labels_n = np.array([0, 0, 1, 1, 1, 2, 2, 0])  # f5, f6 are siblings; f7 joins concept 0
  proto_ne, fired_n = H.prototypes(acts_in, EMB_IE)
  np.testing.assert_array_equal(fired_n, [1, 1, 1, 1, 1, 0, 0, 0])
  assert np.isnan(proto_ne[5:]).all()
  h = H.hms(labels_n, proto_ne, fired_n)
  np.testing.assert_allclose(h['per_concept'], [HMS_0, HMS_1])  # concept 2 is not scored
  assert h['excluded_never_fired'] == 3 and h['concepts_ge2'] == 2
  # The reference rule (uniform weights when max == min) gives f5..f7 the mean embedding:
  # concept 2 scores cosine 1 and concept 0 changes, inflating the mean.
  ref_ne = proto_ne.copy()
  ref_ne[5:] = EMB_IE.mean(0)
  ref = H.hms(labels_n, ref_ne, np.ones(8, bool))
  assert ref['per_concept'][2] == pytest.approx(1.0)
  assert ref['mean'] > h['mean'] + 0.1


def test_accumulator_is_batch_invariant_and_marks_images_without_tokens():
  rng = np.random.default_rng(1)
  codes_tn = rng.random((30, 5)) * (rng.random((30, 5)) < 0.4)
  image_t = rng.integers(0, 4, 30)  # image 4 of 5 receives no token
  acc = H.PerImageAccumulator(5, 5)
  for s in (slice(0, 7), slice(7, 8), slice(8, 30)):
    acc.add(codes_tn[s], image_t[s])
  acts_in = acc.mean()
  np.testing.assert_allclose(acts_in, H.per_image_activations(codes_tn, image_t, 5), rtol=1e-6)
  for i in range(4):
    np.testing.assert_allclose(acts_in[i], codes_tn[image_t == i].mean(0), rtol=1e-5)
  assert np.isnan(acts_in[4]).all()
  # the token-less image is ignored, not treated as an image with zero activation
  emb_ie = rng.standard_normal((5, 3))
  p_all, f_all = H.prototypes(acts_in, emb_ie)
  p_4, f_4 = H.prototypes(acts_in[:4], emb_ie[:4])
  np.testing.assert_allclose(p_all[f_all], p_4[f_4])
  with pytest.raises(ValueError, match='image ids'):
    acc.add(codes_tn[:2], np.array([0, 5]))
  with pytest.raises(ValueError, match='codes_tn'):
    acc.add(codes_tn[:, :3], image_t)


def _clustered_protos(rng, n_clusters=8, per=6, e=16, noise=0.6):
  centre_ke = rng.standard_normal((n_clusters, e))
  labels_n = np.repeat(np.arange(n_clusters), per)
  return centre_ke[labels_n] + noise * rng.standard_normal((len(labels_n), e)), labels_n


def test_null_mean_equals_the_pool_average_cosine_and_random_partitions_sit_at_the_null():
  rng = np.random.default_rng(2)
  proto_ne, planted_n = _clustered_protos(rng)
  fired_n = np.ones(len(proto_ne), bool)
  # E[mean pairwise cosine of a random block] = the average over all pairs of the pool.
  u = proto_ne / np.linalg.norm(proto_ne, axis=1, keepdims=True)
  cos = u @ u.T
  pool_mean = cos[np.triu_indices(len(u), 1)].mean()
  null = H.hms_null(planted_n, proto_ne, fired_n, n_perm=400, seed=0)
  assert null['null_mean'] == pytest.approx(pool_mean, abs=4 * null['null_std'] / 20)
  z = []
  for seed in range(6):  # random groupings of the same features: observed ~ null
    shuffled = np.random.default_rng(100 + seed).permutation(planted_n)
    r = H.hms_null(shuffled, proto_ne, fired_n, n_perm=100, seed=seed)
    z.append((r['observed'] - r['null_mean']) / r['null_std'])
    assert 1 / 101 <= r['p_value'] <= 1
  assert np.max(np.abs(z)) < 3.5 and abs(np.mean(z)) < 1.5
  # the planted grouping beats every permutation
  assert null['observed'] - null['null_mean'] > 5 * null['null_std']
  assert null['p_value'] == pytest.approx(1 / 401)


def test_p_value_is_one_when_every_partition_ties():
  proto_ne = np.tile([[1.0, 2.0]], (6, 1))  # identical prototypes: every grouping scores 1
  r = H.hms_null(np.array([0, 0, 0, 1, 1, 1]), proto_ne, np.ones(6, bool), n_perm=20)
  assert r['observed'] == pytest.approx(1.0) and r['p_value'] == 1.0


def test_hms_report_on_images_separates_a_coherent_hierarchy_from_a_shuffled_one():
  rng = np.random.default_rng(3)
  n_cls, per_cls, feats = 6, 20, 4  # each feature fires on images of one class
  cls_i = np.repeat(np.arange(n_cls), per_cls)
  emb_ie = rng.standard_normal((n_cls, 8))[cls_i] + 0.5 * rng.standard_normal((len(cls_i), 8))
  cls_n = np.repeat(np.arange(n_cls), feats)
  acts_in = (cls_i[:, None] == cls_n[None, :]) * rng.random((len(cls_i), len(cls_n)))
  good = hier({c: list(np.nonzero(cls_n == c)[0]) for c in range(n_cls)})
  flat, per = H.hms_report(good, acts_in, emb_ie, n_perm=100, seed=0)
  assert flat['hms/concepts_ge2'] == n_cls and len(per) == n_cls
  assert flat['hms/minus_null'] > 0.3 and flat['hms/p_value'] < 0.05
  assert flat['hms/mean'] == pytest.approx(per.mean())
  assert flat['hms/minus_null'] == pytest.approx(flat['hms/mean'] - flat['hms/null_mean'])
  perm_n = rng.permutation(cls_n)
  bad = hier({c: list(np.nonzero(perm_n == c)[0]) for c in range(n_cls)})
  flat_bad, _ = H.hms_report(bad, acts_in, emb_ie, n_perm=100, seed=0)
  assert abs(flat_bad['hms/minus_null']) < 3 * flat_bad['hms/null_std']
  assert flat_bad['hms/null_mean'] == pytest.approx(flat['hms/null_mean'], abs=0.02)


def test_taxonomy_on_a_constructed_case():
  coarse_of_fine = np.array([0, 0, 1, 1])
  fine_i = np.array([0, 0, 1, 1, 2, 2, 3, 3, -1])  # image 8 has no label
  acts_in = np.zeros((9, 5))
  for f in range(4):
    acts_in[fine_i == f, f] = 1.0  # feature f fires on fine label f only (purity 1)
  acts_in[8, :4] = 50.0            # the unlabelled image is ignored
  acts_in[[0, 4], 4] = [3.0, 1.0]  # f4: mass 3 on fine 0, 1 on fine 2 -> purity 0.75
  good = H.taxonomy(hier({0: [0, 1], 1: [2, 3]}), acts_in, fine_i, coarse_of_fine, n_perm=50)
  bad = H.taxonomy(hier({0: [0, 2], 1: [1, 3]}), acts_in, fine_i, coarse_of_fine, n_perm=50)
  assert good['taxonomy/coarse_agree'] == 1.0 and bad['taxonomy/coarse_agree'] == 0.0
  assert good['taxonomy/purity_mean'] == pytest.approx((4 + 0.75) / 5)
  assert good['taxonomy/fired'] == 5 and good['taxonomy/concepts_ge2'] == 2
  # 4 features, 2 per coarse label, split into 2 pairs: 1 of the 3 pairings agrees fully.
  assert good['taxonomy/null_mean'] == pytest.approx(1 / 3, abs=0.2)
  # f4 (dominant fine 0, coarse 0) with f0 and f2: pairs (0,4) agree, (0,2), (2,4) do not.
  mixed = H.taxonomy(hier({0: [0, 2, 4]}), acts_in, fine_i, coarse_of_fine, n_perm=10)
  assert mixed['taxonomy/coarse_agree'] == pytest.approx(1 / 3)
  with pytest.raises(ValueError, match='coarse_of_fine'):
    H.taxonomy(hier({0: [0, 1]}), acts_in, fine_i, coarse_of_fine[:2], n_perm=5)


def test_taxonomy_beats_its_null_when_concepts_follow_the_coarse_labels():
  n_coarse, fine_per, imgs = 4, 3, 2
  coarse_of_fine = np.repeat(np.arange(n_coarse), fine_per)
  fine_i = np.repeat(np.arange(n_coarse * fine_per), imgs)
  feat_fine = np.repeat(np.arange(n_coarse * fine_per), 2)  # 2 features per fine label
  acts_in = (fine_i[:, None] == feat_fine[None, :]).astype(float)
  groups = {c: list(np.nonzero(coarse_of_fine[feat_fine] == c)[0]) for c in range(n_coarse)}
  r = H.taxonomy(hier(groups), acts_in, fine_i, coarse_of_fine, n_perm=200, seed=1)
  assert r['taxonomy/coarse_agree'] == 1.0 and r['taxonomy/p_value'] == pytest.approx(1 / 201)
  # chance that a random pair of the 24 features shares the coarse label: 5 / 23
  assert r['taxonomy/null_mean'] == pytest.approx(5 / 23, abs=0.03)


def test_parent_child_stats_on_constructed_codes():
  rng = np.random.default_rng(4)
  child_tn = (rng.random((200, 5)) < 0.3) * rng.random((200, 5))
  h = hier({0: [0, 1], 2: [2, 3]})  # feature 4 unassigned; parent latent 1 unused
  parent_tm = np.zeros((200, 3))
  parent_tm[:, 0] = child_tn[:, :2].max(1)  # fires exactly when a child fires
  parent_tm[:, 2] = child_tn[:, 2:4].sum(1)
  r = H.parent_child_stats(h, child_tn, parent_tm)
  assert r['parent_child/p_parent_given_child_mean'] == 1.0
  assert r['parent_child/p_parent_given_child_median'] == 1.0
  assert r['parent_child/hamming_mean'] == 0.0
  assert r['parent_child/children_scored'] == 4 and r['parent_child/concepts'] == 2
  # parent 2 now fires only with child 2: child 3 alone is a miss and a Hamming error
  parent_tm[:, 2] = child_tn[:, 2]
  r = H.parent_child_stats(h, child_tn, parent_tm)
  a2, a3 = child_tn[:, 2] > 0, child_tn[:, 3] > 0
  p3 = np.mean(a2[a3])
  assert r['parent_child/p_parent_given_child_mean'] == pytest.approx((3 + p3) / 4)
  assert r['parent_child/hamming_mean'] == pytest.approx(np.mean(a3 & ~a2) / 2)
  # parent 0 also fires on 10 tokens where neither child does: Hamming errors, P unchanged
  quiet = np.nonzero(child_tn[:, :2].max(1) == 0)[0][:10]
  parent_tm[quiet, 0] = 1.0
  r = H.parent_child_stats(h, child_tn, parent_tm)
  assert r['parent_child/p_parent_given_child_mean'] == pytest.approx((3 + p3) / 4)
  assert r['parent_child/hamming_mean'] == pytest.approx((10 / 200 + np.mean(a3 & ~a2)) / 2)
  acc = H.ParentChildAccumulator(h, 5, 3)
  for s in range(0, 200, 64):
    acc.add(child_tn[s:s + 64], parent_tm[s:s + 64])
  assert acc.result() == r
  with pytest.raises(ValueError, match='concept id 2'):
    H.parent_child_stats(h, child_tn, parent_tm[:, :2])


def test_parent_mcc_is_one_for_the_true_parents_permuted():
  rng = np.random.default_rng(5)
  parents_kd = rng.standard_normal((6, 10))
  parents_kd /= np.linalg.norm(parents_kd, axis=1, keepdims=True)
  extra = rng.standard_normal((3, 10))
  dec_md = np.concatenate([3.0 * parents_kd[rng.permutation(6)], extra])  # scale is irrelevant
  assert H.parent_mcc(dec_md, parents_kd) == pytest.approx(1.0)
  assert H.parent_mcc(-dec_md, parents_kd) < 0.5  # signed cosine: flipped directions lose
  assert H.parent_mcc(rng.standard_normal((9, 10)), parents_kd) < 0.8
  assert H.parent_mcc(dec_md[:3], parents_kd) == pytest.approx(0.5)  # unmatched parents: 0


def test_sibling_precision_recall_f1_on_a_constructed_hierarchy():
  parent_c = np.array([0, 0, 0, 1, 1, 1])
  feat_c = np.array([10, 11, 12, 13, 14, -1])  # child 5 is not matched: left out
  h = hier({7: [10, 11, 13]})                   # features 12 and 14 unassigned: no siblings
  # predicted pairs among matched children: (0,1), (0,3), (1,3); true: (0,1), (0,2), (1,2),
  # (3,4); both: (0,1). P = 1/3, R = 1/4, F1 = 2/7.
  p, r, f1 = H.sibling_prf(h, feat_c, parent_c)
  assert (p, r, f1) == (pytest.approx(1 / 3), pytest.approx(1 / 4), pytest.approx(2 / 7))
  perfect = H.sibling_prf(hier({0: [10, 11, 12], 1: [13, 14]}), feat_c, parent_c)
  assert perfect == (1.0, 1.0, 1.0)


def test_parent_detection_f1():
  rng = np.random.default_rng(6)
  truth_tk = rng.random((300, 5)) < 0.2
  codes_tm = np.zeros((300, 7))
  perm = rng.permutation(7)[:5]
  codes_tm[:, perm] = truth_tk * rng.uniform(0.5, 2.0, (300, 5))
  assert H.parent_detection_f1(codes_tm, truth_tk) == pytest.approx(1.0)
  # two parents on disjoint tokens; latent 1 recovers parent 0 on half its tokens:
  # F1 = 2 * 2 / (4 + 2) = 2/3; parent 1 exact; mean 5/6.
  truth = np.zeros((8, 2), bool)
  truth[:4, 0] = truth[4:, 1] = True
  codes = np.zeros((8, 2))
  codes[:2, 1] = 1.0
  codes[4:, 0] = 1.0
  assert H.parent_detection_f1(codes, truth) == pytest.approx(5 / 6)
  assert H.parent_detection_f1(codes[:, :1], truth) == pytest.approx(1 / 2)  # one unmatched


def test_synthetic_hms_scores_the_true_grouping_above_a_shuffled_one():
  cfg = SyntheticConfig(d=32, n_parents=8, n_children=4, p_parent=0.25)
  src = SyntheticSource(cfg, batch_size=256, seed=0, scale=1.0)
  _, coef_tc, active_tk = src.sample(np.random.default_rng(0), 2000)
  parent_c = src.truth.parent_of_child_c
  true = hier({k: list(np.nonzero(parent_c == k)[0]) for k in range(cfg.n_parents)})
  flat, per = H.synthetic_hms(true, coef_tc, active_tk, n_perm=100, seed=0)
  assert flat['synthetic_hms/concepts_ge2'] == cfg.n_parents and len(per) == cfg.n_parents
  assert flat['synthetic_hms/minus_null'] > 0.2 and flat['synthetic_hms/p_value'] < 0.05
  shuffled_c = np.random.default_rng(1).permutation(parent_c)
  rand = hier({k: list(np.nonzero(shuffled_c == k)[0]) for k in range(cfg.n_parents)})
  flat_r, _ = H.synthetic_hms(rand, coef_tc, active_tk, n_perm=100, seed=0)
  assert abs(flat_r['synthetic_hms/minus_null']) < 3 * flat_r['synthetic_hms/null_std']
  assert flat['synthetic_hms/mean'] > flat_r['synthetic_hms/mean'] + 0.2
  # the true parent indicator is a perfect parent detector
  assert H.parent_detection_f1(active_tk.astype(float), active_tk) == pytest.approx(1.0)
