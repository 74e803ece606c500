"""Defining properties of the relu_l1, jumprelu and matryoshka SAEs, and that every architecture
trains (at level 1 and as the level-2 SAE) far better than a trivial baseline."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csae_jax import export, modes, stages
from csae_jax.cascade import level1 as level1_lib
from csae_jax.saes import codes, common, jumprelu, matryoshka, objective, relu_l1
from experiments.configs import csae


def _hyper(**kw):
  base = dict(arch='jumprelu', k=2, k_aux=2, auxk_weight=0.0, dead_tokens=10**9,
              k_anneal_steps=0, d=4)
  return objective.SAEHyper(**{**base, **kw})


def test_jumprelu_threshold_gets_the_straight_through_gradient():
  eps = 0.1
  theta = jnp.asarray([0.5, 0.5], jnp.float32)
  # column 0: two pre-activations inside the kernel window around theta, one outside
  z = jnp.asarray([[0.52, 0.9], [0.47, 0.2], [0.9, 0.49]], jnp.float32)
  g_theta = jax.grad(lambda t: jnp.sum(jumprelu.jump(z, t, eps)))(theta)
  # d/dtheta sum z H(z - theta) ~ -(theta / eps) * #{|z - theta| < eps / 2}
  np.testing.assert_allclose(np.asarray(g_theta), [-(0.5 / eps) * 2, -(0.5 / eps) * 1], rtol=1e-6)
  g_z = jax.grad(lambda zz: jnp.sum(jumprelu.jump(zz, theta, eps)))(z)
  np.testing.assert_array_equal(np.asarray(g_z), np.asarray(z > theta, np.float32))
  g_l0 = jax.grad(lambda t: jnp.sum(jumprelu.heaviside(z, t, eps)))(theta)
  np.testing.assert_allclose(np.asarray(g_l0), [-(1 / eps) * 2, -(1 / eps) * 1], rtol=1e-6)


def test_jumprelu_l0_loss_pushes_thresholds_up_when_too_dense():
  params = {**common.init_params(jax.random.key(0), 4, 8),
            'log_threshold': jnp.full((8,), jnp.log(0.1), jnp.float32)}
  acts = jax.nn.relu(jax.random.normal(jax.random.key(1), (64, 8))) * 0.2 + 0.05
  h = _hyper(k=1, l0_coeff=1.0, target_l0=1.0, bandwidth=0.05)
  g = jax.grad(lambda p: jumprelu.sparsity_loss(p, acts, None, h, 10, None))(params)
  assert np.all(np.asarray(g['log_threshold']) <= 0) and np.any(np.asarray(g['log_threshold']) < 0)


def test_matryoshka_loss_is_the_mean_of_prefix_reconstructions():
  key = jax.random.key(0)
  params = common.init_params(key, 6, 10)
  params['b_dec'] = jnp.arange(6, dtype=jnp.float32) * 0.1
  codes = jax.nn.relu(jax.random.normal(jax.random.key(1), (5, 10)))
  x = jax.random.normal(jax.random.key(2), (5, 6))
  groups = (3, 3, 4)
  got = np.asarray(matryoshka.prefix_losses(params, codes, x, None, groups))
  for g, m in enumerate((3, 6, 10)):
    x_hat = np.asarray(codes[:, :m] @ params['w_dec'][:m] + params['b_dec'])
    np.testing.assert_allclose(got[g], np.mean(np.sum((x_hat - np.asarray(x)) ** 2, -1)),
                               rtol=1e-5)
  h = _hyper(arch='matryoshka', groups=groups)
  total = matryoshka.ARCH.recon_loss(params, codes, x, None, h)
  np.testing.assert_allclose(float(total), got.mean(), rtol=1e-6)


def test_relu_l1_penalty_is_weighted_by_decoder_norms():
  params = common.init_params(jax.random.key(0), 4, 6)
  codes = jax.nn.relu(jax.random.normal(jax.random.key(1), (8, 6)))
  h = _hyper(arch='relu_l1', l1_coeff=0.5)
  base = float(relu_l1.sparsity_loss(params, codes, codes, h, 100, None))
  np.testing.assert_allclose(base, 0.5 * float(jnp.mean(jnp.sum(codes, -1))), rtol=1e-6)
  # Growing row i by c and shrinking its code by 1/c leaves x_hat and the penalty unchanged.
  c = jnp.asarray([3.0, 1, 1, 0.5, 1, 2])
  scaled = {**params, 'w_dec': params['w_dec'] * c[:, None]}
  np.testing.assert_allclose(float(relu_l1.sparsity_loss(scaled, None, codes / c, h, 100, None)),
                             base, rtol=1e-5)
  # the coefficient warms up linearly
  hw = h._replace(sparsity_warmup_steps=100)
  np.testing.assert_allclose(float(relu_l1.sparsity_loss(params, codes, codes, hw, 25, None)),
                             0.25 * base, rtol=1e-6)


def _small(arch_level1='batch_topk', **kw):
  c = csae.get_config('small')
  c.train.steps = 400
  c.level2.steps = 200
  c.level2.restarts = 2
  c.data.eval_rows = 4096
  c.level1.arch = arch_level1
  c.update_from_flattened_dict(kw)
  return c


ARCHS = ['relu_l1', 'jumprelu', 'matryoshka', 'topk', 'batch_topk']


@pytest.mark.parametrize('arch', ARCHS)
def test_every_arch_trains_at_level1_far_better_than_the_mean(tmp_path, arch):
  m = modes.run(_small(arch), str(tmp_path))
  # Trivial baseline: predicting the mean has FVU 1; a sparse code of ~k atoms must do far better.
  assert m['level1/fvu'] < 0.15, m
  assert 1 <= m['level1/l0'] <= 12, m
  assert m['synthetic/child_mcc'] > 0.8, m
  # the export is input-space with unit rows whatever the arch (relu_l1's norms are folded)
  w1 = np.load(os.path.join(tmp_path, 'export', 'level1_decoder.npy'))
  np.testing.assert_allclose(np.linalg.norm(w1, axis=1), 1.0, atol=1e-5)
  params, _, _, _ = export.load_sae(os.path.join(tmp_path, 'export', 'level1_sae.npz'))
  assert ('log_threshold' in params) == (arch == 'jumprelu')


@pytest.fixture(scope='module')
def level1_done(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp('l1'))
  modes.run(_small(), wd)
  return wd


@pytest.mark.parametrize('arch', ['relu_l1', 'jumprelu', 'matryoshka', 'topk'])
def test_every_arch_trains_as_the_level2_sae(tmp_path, level1_done, arch):
  wd = str(tmp_path / 'wd')
  shutil.copytree(level1_done, wd)  # reuse the finished level-1 stage
  cfg = _small(**{'level2.arch': arch})
  cfg.overwrite = True
  m = modes.run(cfg, wd)
  # Trivial baseline for rows: b_dec alone (variance explained 0). Grouping must beat chance.
  assert m['level2/variance_explained'] > 0.3, m
  assert m['synthetic/parent_ari'] > 0.3, m


def _sparse_matches_dense(h):
  """Loss and gradients of sparse (gather) decoding equal dense decoding; returns the sparse
  loss output. 40 latents, 10 of them dead, so AuxK is on."""
  params = common.init_params(jax.random.key(0), 12, 40)
  params['b_dec'] = jnp.linspace(-1, 1, 12)
  x = jax.random.normal(jax.random.key(1), (16, 12))
  since = jnp.where(jnp.arange(40) < 30, 0, 10**6)
  dense = jax.value_and_grad(lambda p: objective.sae_loss(h, p, since, x, 5).loss)
  sparse = jax.value_and_grad(
      lambda p: objective.sae_loss(h._replace(sparse_decode=True), p, since, x, 5).loss)
  (ld, gd), (ls, gs) = dense(params), sparse(params)
  assert float(ld) == pytest.approx(float(ls), rel=1e-5)
  for key in ('w_enc', 'b_enc', 'w_dec', 'b_dec'):
    np.testing.assert_allclose(np.asarray(gd[key]), np.asarray(gs[key]), rtol=1e-4, atol=1e-6)
  return objective.sae_loss(h._replace(sparse_decode=True), params, since, x, 5)


def test_sparse_gather_decoding_matches_dense_topk():
  out = _sparse_matches_dense(
      _hyper(arch='topk', k=4, k_aux=6, auxk_weight=1 / 32, dead_tokens=100, d=12))
  assert np.all(np.asarray(codes.active_per_row(out.codes, 16)) <= 4)


def test_batch_topk_threshold_encode_matches_training_l0_within_10_percent(tmp_path):
  """Exported BatchTopK = JumpReLU with the learned threshold: on held-out inputs its L0 is
  within 10% of the training k."""
  c = _small()
  c.train.steps = 1200
  cfg, source, mesh = stages.setup(c, str(tmp_path))
  ev = level1_lib.train(cfg, source, mesh, str(tmp_path))[0].ev
  assert abs(ev['l0'] - cfg.level1.k) / cfg.level1.k < 0.1, ev['l0']


@pytest.mark.parametrize('arch', ['batch_topk', 'matryoshka'])
def test_sparse_decoding_matches_dense_for_batch_level_selection(arch):
  out = _sparse_matches_dense(_hyper(arch=arch, k=3, k_aux=6, auxk_weight=1 / 32,
                                     dead_tokens=100, d=12, groups=(10, 30)))
  assert int(np.sum(np.asarray(codes.active_per_row(out.codes, 16)))) == 3 * 16
