"""Tests of csae_jax/sources/synthetic.py: exact ground truth, sampling rules, determinism,
sharding over processes, normalisation and the export round trip."""

import dataclasses
import os

import numpy as np
import pytest

from csae_jax.config import SyntheticConfig
from csae_jax.sources import arrays, synthetic

CFG = SyntheticConfig(d=32, n_parents=8, n_children=3, child_parent_cos=0.6, p_parent=0.3,
                      parent_emission=0.0, noise_std=0.02, seed=11)


def _cfg(**kw):
  return dataclasses.replace(CFG, **kw)


def _src(cfg=CFG, batch_size=256, seed=0, **kw):
  return synthetic.SyntheticSource(cfg, batch_size=batch_size, seed=seed, **kw)


# ---- ground truth ----------------------------------------------------------------------------

@pytest.mark.parametrize('a', [0.0, 0.3, 0.6, 0.9])
def test_ground_truth_geometry(a):
  cfg = _cfg(child_parent_cos=a)
  t = synthetic.make_ground_truth(cfg)
  k, c, d = cfg.n_parents, cfg.n_children, cfg.d
  assert t.parents_kd.shape == (k, d) and t.children_cd.shape == (k * c, d)
  assert t.children_cd.dtype == np.float32
  np.testing.assert_array_equal(t.parent_of_child_c, np.repeat(np.arange(k), c))
  np.testing.assert_allclose(np.linalg.norm(t.children_cd, axis=1), 1.0, atol=1e-5)
  # Orthonormal parents (K <= d).
  np.testing.assert_allclose(t.parents_kd @ t.parents_kd.T, np.eye(k), atol=1e-5)
  cos_c = np.sum(t.children_cd * t.parents_kd[t.parent_of_child_c], axis=1)
  np.testing.assert_allclose(cos_c, a, atol=1e-5)


def test_zero_cos_children_orthogonal_to_parent_and_distinct():
  t = synthetic.make_ground_truth(_cfg(child_parent_cos=0.0))
  cos_c = np.sum(t.children_cd * t.parents_kd[t.parent_of_child_c], axis=1)
  np.testing.assert_allclose(cos_c, 0.0, atol=1e-5)
  # Children are distinct directions (not collapsed onto each other).
  g = t.children_cd @ t.children_cd.T
  assert np.max(np.abs(g - np.diag(np.diag(g)))) < 0.99


def test_ground_truth_more_parents_than_d():
  cfg = _cfg(d=4, n_parents=10, n_children=2)
  t = synthetic.make_ground_truth(cfg)
  np.testing.assert_allclose(np.linalg.norm(t.parents_kd, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(t.children_cd, axis=1), 1.0, atol=1e-5)
  cos_c = np.sum(t.children_cd * t.parents_kd[t.parent_of_child_c], axis=1)
  np.testing.assert_allclose(cos_c, cfg.child_parent_cos, atol=1e-5)


def test_ground_truth_depends_on_seed_only():
  a = synthetic.make_ground_truth(CFG)
  b = synthetic.make_ground_truth(CFG)
  c = synthetic.make_ground_truth(_cfg(seed=12))
  np.testing.assert_array_equal(a.children_cd, b.children_cd)
  assert not np.allclose(a.children_cd, c.children_cd)


# ---- sampling --------------------------------------------------------------------------------

def test_siblings_exclusive_and_coef_matches_activity():
  src = _src()
  n = 4000
  _, coef_nc, active_nk = src.sample(np.random.default_rng(0), n)
  k, c = CFG.n_parents, CFG.n_children
  nz_nkc = coef_nc.reshape(n, k, c) != 0
  per_parent = nz_nkc.sum(-1)
  assert per_parent.max() == 1  # at most one child per parent (and some parent fires)
  np.testing.assert_array_equal(per_parent == 1, active_nk)  # exactly one iff active
  assert np.all(coef_nc >= 0)
  # Every child gets used.
  assert np.all(nz_nkc.any(0))


def test_parent_activity_rate():
  src = _src()
  n = 4000
  _, _, active_nk = src.sample(np.random.default_rng(1), n)
  p = CFG.p_parent
  std = np.sqrt(p * (1 - p) / active_nk.size)
  assert abs(active_nk.mean() - p) < 5 * std
  # Per parent as well (each parent is independently active with probability p).
  std_k = np.sqrt(p * (1 - p) / n)
  assert np.all(np.abs(active_nk.mean(0) - p) < 5 * std_k)


def test_scenes_keep_marginals_and_make_scene_members_co_occur():
  cfg = _cfg(n_parents=8, scene_size=4, scene_cooccur=0.8, p_parent=0.25)
  _, _, active_nk = _src(cfg).sample(np.random.default_rng(0), 40000)
  np.testing.assert_allclose(active_nk.mean(0), 0.25, atol=0.01)
  corr_kk = np.corrcoef(active_nk.T)
  # Members of one scene (parents 0-3): corr(leader, member) = c; two members: c^2.
  np.testing.assert_allclose(corr_kk[0, 1:4], 0.8, atol=0.02)
  np.testing.assert_allclose(corr_kk[1, 2:4], 0.64, atol=0.03)
  # Different scenes stay independent.
  assert np.abs(corr_kk[:4, 4:]).max() < 0.03


def test_scenes_off_leave_the_data_unchanged():
  base = _src().sample(np.random.default_rng(3), 500)[0]
  for kw in ({'scene_size': 2}, {'scene_cooccur': 0.9}):
    np.testing.assert_array_equal(_src(_cfg(**kw)).sample(np.random.default_rng(3), 500)[0],
                                  base)


def test_no_emission_no_noise_x_is_child_combination():
  src = _src(_cfg(noise_std=0.0, parent_emission=0.0))
  x_nd, coef_nc, _ = src.sample(np.random.default_rng(2), 500)
  np.testing.assert_allclose(x_nd, coef_nc @ src.truth.children_cd, atol=1e-5)


def test_noise_is_added():
  src = _src(_cfg(noise_std=0.1, parent_emission=0.0))
  x_nd, coef_nc, _ = src.sample(np.random.default_rng(2), 2000)
  resid = x_nd - coef_nc @ src.truth.children_cd
  assert abs(resid.std() - 0.1) < 0.01
  assert abs(resid.mean()) < 0.01


def test_full_parent_emission_adds_every_active_parent():
  src = _src(_cfg(noise_std=0.0, parent_emission=1.0))
  x_nd, coef_nc, active_nk = src.sample(np.random.default_rng(3), 1000)
  resid_nd = x_nd - coef_nc @ src.truth.children_cd
  # Parents are orthonormal: the residual's parent coordinates are the emitted magnitudes.
  pcoef_nk = resid_nd @ src.truth.parents_kd.T
  assert np.all(pcoef_nk[active_nk] > 1e-2)
  np.testing.assert_allclose(pcoef_nk[~active_nk], 0.0, atol=1e-4)
  # And nothing outside the parent span.
  np.testing.assert_allclose(pcoef_nk @ src.truth.parents_kd, resid_nd, atol=1e-4)


def test_partial_parent_emission_rate():
  src = _src(_cfg(noise_std=0.0, parent_emission=0.5))
  x_nd, coef_nc, active_nk = src.sample(np.random.default_rng(4), 4000)
  pcoef_nk = (x_nd - coef_nc @ src.truth.children_cd) @ src.truth.parents_kd.T
  emitted_nk = pcoef_nk > 1e-3
  assert not np.any(emitted_nk & ~active_nk)
  rate = emitted_nk[active_nk].mean()
  n_act = active_nk.sum()
  assert abs(rate - 0.5) < 5 * np.sqrt(0.25 / n_act)


# ---- the robustness knobs (benchmarks/robustness.py): each one's marginals ---------------------

def test_unequal_branching_counts_and_exclusive_siblings():
  cfg = _cfg(n_parents=12, n_children=2, n_children_max=9)
  src = _src(cfg)
  counts_k = synthetic.branching(cfg)
  assert counts_k.min() >= 2 and counts_k.max() <= 9 and len(set(counts_k)) > 2  # unequal
  t = src.truth
  assert len(t.children_cd) == counts_k.sum()
  np.testing.assert_array_equal(np.bincount(t.parent_of_child_c), counts_k)
  cos_c = np.sum(t.children_cd * t.parents_kd[t.parent_of_child_c], axis=1)
  np.testing.assert_allclose(cos_c, cfg.child_parent_cos, atol=1e-5)
  _, coef_nc, active_nk = src.sample(np.random.default_rng(0), 20000)
  fired_nk = np.stack([(coef_nc[:, t.parent_of_child_c == k] > 0).sum(1) for k in range(12)], 1)
  np.testing.assert_array_equal(fired_nk, active_nk.astype(int))  # exactly one child if active
  # the child is uniform among the parent's C_i children
  for k in (int(np.argmax(counts_k)), int(np.argmin(counts_k))):
    use_c = (coef_nc[:, t.parent_of_child_c == k] > 0).sum(0) / active_nk[:, k].sum()
    np.testing.assert_allclose(use_c, 1 / counts_k[k], atol=4 * np.sqrt(1 / active_nk[:, k].sum()))
  assert src.n_atoms == counts_k.sum()


def test_correlated_parents_pairs_have_the_cosine_and_others_stay_orthogonal():
  t = synthetic.make_ground_truth(_cfg(parent_corr=0.55))
  g = t.parents_kd @ t.parents_kd.T
  target = np.eye(8)
  for i in range(0, 8, 2):
    target[i, i + 1] = target[i + 1, i] = 0.55
  np.testing.assert_allclose(g, target, atol=1e-5)
  cos_c = np.sum(t.children_cd * t.parents_kd[t.parent_of_child_c], axis=1)
  np.testing.assert_allclose(cos_c, CFG.child_parent_cos, atol=1e-5)  # own (mixed) parent


@pytest.mark.parametrize('mean', [0.6, 1.8, 3.5])
def test_poisson_number_of_active_parents(mean):
  src = _src(_cfg(active_count='poisson', mean_active=mean))
  _, _, active_nk = src.sample(np.random.default_rng(1), 40000)
  m_n = active_nk.sum(1)
  capped = np.minimum(np.random.default_rng(0).poisson(mean, 400000), 8)
  assert abs(m_n.mean() - capped.mean()) < 0.03
  assert abs(m_n.var() - capped.var()) < 0.06
  np.testing.assert_allclose(active_nk.mean(0), m_n.mean() / 8, atol=0.01)  # uniform parents


def test_fixed_number_of_active_parents_and_expected_count():
  src = _src(_cfg(active_count='fixed', mean_active=3))
  _, _, active_nk = src.sample(np.random.default_rng(2), 5000)
  assert np.all(active_nk.sum(1) == 3)
  np.testing.assert_allclose(active_nk.mean(0), 3 / 8, atol=0.03)
  from csae_jax import config as config_lib
  assert config_lib.mean_active_parents(src.cfg) == 3
  assert config_lib.mean_active_parents(CFG) == pytest.approx(8 * 0.3)


def test_anisotropic_noise_per_dimension_std():
  cfg = _cfg(noise_std=0.02, noise_std_max=0.1)
  src = _src(cfg)
  std_d = synthetic.noise_std_d(cfg)
  assert std_d.shape == (CFG.d,) and std_d.min() == pytest.approx(0.02)
  assert std_d.max() == pytest.approx(0.1)
  x_nd, coef_nc, _ = src.sample(np.random.default_rng(3), 40000)
  resid_nd = x_nd - coef_nc @ src.truth.children_cd
  np.testing.assert_allclose(resid_nd.std(0), std_d, rtol=0.03)
  assert np.corrcoef(std_d, np.arange(CFG.d))[0, 1] < 0.9  # a random order of the dimensions


def test_magnitude_tail_is_lognormal_sigma():
  for sigma in (0.25, 1.0):
    src = _src(_cfg(log_mag_std=sigma, noise_std=0.0))
    _, coef_nc, _ = src.sample(np.random.default_rng(4), 20000)
    logs = np.log(coef_nc[coef_nc > 0])
    assert abs(logs.std() - sigma) < 0.02 and abs(logs.mean()) < 0.02


def test_new_knobs_off_leave_the_data_unchanged():
  base = _src().sample(np.random.default_rng(3), 500)[0]
  for kw in ({'n_children_max': CFG.n_children}, {'noise_std_max': CFG.noise_std},
             {'mean_active': 5.0}, {'parent_corr': 0.0}):
    np.testing.assert_array_equal(_src(_cfg(**kw)).sample(np.random.default_rng(3), 500)[0],
                                  base)


@pytest.mark.parametrize('kw, match', [
    ({'n_children_max': 2}, 'n_children_max'), ({'parent_corr': 1.0}, 'parent_corr'),
    ({'active_count': 'sometimes'}, 'active_count'),
    ({'active_count': 'fixed', 'mean_active': 9}, 'mean_active'),
    ({'noise_std_max': 0.01}, 'noise_std_max')])
def test_bad_knob_values_name_the_key(kw, match):
  from csae_jax import config as config_lib
  with pytest.raises(ValueError, match=match):
    config_lib.validate_synthetic(_cfg(**kw))


# ---- determinism and disjoint streams --------------------------------------------------------

def test_batches_deterministic_per_step():
  a, b = _src(), _src()
  np.testing.assert_array_equal(a.batch(3), b.batch(3))
  assert a.batch(3).shape == (256, CFG.d) and a.batch(3).dtype == np.float32
  assert not np.allclose(a.batch(3), a.batch(4))
  assert not np.allclose(a.batch(3), _src(seed=1).batch(3))
  # Resumable: the batch at a step does not depend on what was read before.
  c = _src()
  for s in range(5):
    c.batch(s)
  np.testing.assert_array_equal(c.batch(3), a.batch(3))


def test_eval_batches_disjoint_from_training():
  src = _src(batch_size=64)
  evals = list(src.eval_batches(200, 64))
  assert [e.shape[0] for e in evals] == [64, 64, 64, 8]
  ev = np.concatenate(evals)
  # Deterministic.
  np.testing.assert_array_equal(ev, np.concatenate(list(src.eval_batches(200, 64))))
  train = np.concatenate([src.global_batch(s) for s in range(50)])
  # No evaluation row equals any training row.
  d2 = (np.sum(ev ** 2, 1)[:, None] + np.sum(train ** 2, 1)[None] - 2 * ev @ train.T)
  assert d2.min() > 1e-6
  for i, e in enumerate(evals[:3]):
    for s in range(50):
      assert not np.allclose(e, src.global_batch(s))


def test_process_slices_concatenate_to_global_batch():
  full = _src(batch_size=64)
  p0 = _src(batch_size=64, process_index=0, process_count=2)
  p1 = _src(batch_size=64, process_index=1, process_count=2)
  for step in (0, 7):
    b0, b1 = p0.batch(step), p1.batch(step)
    assert b0.shape == b1.shape == (32, CFG.d)
    np.testing.assert_array_equal(np.concatenate([b0, b1]), full.global_batch(step))
    np.testing.assert_array_equal(full.batch(step), full.global_batch(step))


def test_batch_size_not_divisible_by_processes_raises():
  with pytest.raises(ValueError, match='divisible'):
    _src(batch_size=63, process_count=2)


def test_normalised_mean_squared_norm_is_one():
  for cfg in (CFG, _cfg(parent_emission=1.0, noise_std=0.1)):
    src = _src(cfg, batch_size=4096)
    msq = np.mean(np.sum(src.global_batch(5) ** 2, -1))
    assert abs(msq - 1.0) < 0.05
  # Scale is a property of the data, not of the training seed.
  assert _src(seed=0).scale == _src(seed=9).scale
  assert _src(scale=2.5).scale == 2.5


def test_n_atoms_and_fingerprint():
  assert _src().n_atoms == CFG.n_parents * CFG.n_children
  assert _src(_cfg(parent_emission=0.5)).n_atoms == CFG.n_parents * (CFG.n_children + 1)
  assert _src().fingerprint == _src().fingerprint
  assert _src().fingerprint != _src(_cfg(seed=12)).fingerprint
  m = _src().manifest()
  assert m['kind'] == 'synthetic' and m['d'] == CFG.d


# ---- export round trip -----------------------------------------------------------------------

def test_write_then_read_back(tmp_path):
  src = _src()
  n, rps = 250, 100
  out = str(tmp_path / 'export')
  paths = src.write(out, n, rows_per_shard=rps)
  assert len(paths) == 3 and all(os.path.exists(p) for p in paths)
  raw = np.concatenate([
      src.sample(np.random.default_rng([src.seed, i]), min(rps, n - start))[0]
      for i, start in enumerate(range(0, n, rps))])
  assert raw.shape == (n, CFG.d)
  arr = arrays.ArraySource(out, batch_size=8, seed=0)
  assert arr.n_rows == n and arr.d == CFG.d
  np.testing.assert_array_equal(arr.read_rows(np.arange(n)), raw)
  # Normalisation computed by the reader agrees with the synthetic source's.
  assert arr.scale == pytest.approx(src.scale, rel=0.1)
  gt = np.load(os.path.join(out, 'ground_truth.npz'))
  np.testing.assert_array_equal(gt['parents_kd'], src.truth.parents_kd)
  np.testing.assert_array_equal(gt['children_cd'], src.truth.children_cd)
  np.testing.assert_array_equal(gt['parent_of_child_c'], src.truth.parent_of_child_c)
  assert not any(name.endswith('.tmp.npz') or name.startswith('.') for name in os.listdir(out))
