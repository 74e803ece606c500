"""Tests of csae_jax/saes/: exact k-th largest selection, the BatchTopK / TopK sparsifiers, the
inference threshold, shared geometry helpers and the training objective."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csae_jax import saes
from csae_jax.saes import batch_topk, common, objective, select, topk


def _relu_normal(shape, seed=0):
  return np.maximum(np.random.default_rng(seed).standard_normal(shape), 0).astype(np.float32)


def _kth_ref(x, k, axis=None):
  """k-th largest by a full sort (what lax.top_k's k-th value is; checked below)."""
  x = np.asarray(x)
  if axis is None:
    return np.sort(x.reshape(-1))[::-1][k - 1]
  return np.sort(x, axis=-1)[..., ::-1][..., k - 1]


# One compile per shape for all k (k is traced); the eager int-k path is exercised as well.
_kth = jax.jit(select.kth_largest, static_argnames='axis')


# ---- select.kth_largest ----------------------------------------------------------------------

@pytest.mark.parametrize('k', [1, 2, 17, 300])
def test_kth_largest_whole_array_matches_top_k(k):
  x = _relu_normal((16, 40), seed=k)
  assert (x > 0).sum() >= k
  got = np.asarray(_kth(jnp.asarray(x), k))
  assert got.shape == ()
  assert got == _kth_ref(x, k)
  assert got == np.asarray(jax.lax.top_k(jnp.asarray(x).reshape(-1), k)[0][k - 1])


@pytest.mark.parametrize('k', [1, 3, 40])
def test_kth_largest_strictly_positive_full_size(k):
  # Strictly positive data: the full-size k-th largest is the minimum, not 0.
  x = (np.abs(np.random.default_rng(1).standard_normal((8, 5))) + 0.1).astype(np.float32)
  got = np.asarray(_kth(jnp.asarray(x), k))
  assert got == _kth_ref(x, k)
  if k == 40:
    assert got == x.min() and got > 0


@pytest.mark.parametrize('k', [1, 4, 13, 40])
def test_kth_largest_per_row_matches_top_k(k):
  x = _relu_normal((32, 40), seed=100 + k)
  # Strictly positive rows for the full-size case, so the answer is a row minimum.
  if k == 40:
    x = x + 0.5
  got = np.asarray(_kth(jnp.asarray(x), k, axis=-1))
  assert got.shape == (32,)
  np.testing.assert_array_equal(got, _kth_ref(x, k, axis=-1))
  np.testing.assert_array_equal(got, np.asarray(jax.lax.top_k(jnp.asarray(x), k)[0][:, k - 1]))


def test_kth_largest_traced_k_under_jit():
  n_traces = []

  @jax.jit
  def f(x, k):
    n_traces.append(1)
    return select.kth_largest(x, k), select.kth_largest(x, k, axis=-1)

  x = _relu_normal((24, 64), seed=3) + 0.01
  for k in (1, 5, 33, 64):
    whole, rows = f(jnp.asarray(x), jnp.int32(k))
    assert np.asarray(whole) == _kth_ref(x, k)
    np.testing.assert_array_equal(np.asarray(rows), _kth_ref(x, k, axis=-1))
  assert len(n_traces) == 1  # k is data, not a compile-time constant


def test_kth_largest_early_stop_bound_and_exact_from_a_bound():
  """passes < 31: a lower bound with at least k entries at or above it, close to the k-th
  largest; kth_largest_from(lower) is exact again (also from 0 and from the exact value)."""
  x = jax.nn.relu(jax.random.normal(jax.random.key(7), (64, 100)))
  for k in (1, 17, 500, 3100, 5000):  # 5000 > the ~3200 positives: 0
    exact = float(select.kth_largest(x, k))
    lower = select.kth_largest(x, k, passes=20)
    assert float(lower) <= exact and int(jnp.sum(x >= lower)) >= k
    assert float(lower) >= exact * (1 - 1e-3)
    for lo in (lower, jnp.float32(0.0), jnp.float32(exact)):
      assert float(jax.jit(select.kth_largest_from)(x, k, lo)) == exact


def test_kth_largest_zero_when_too_few_positive():
  # The docstring's contract: exactly 0 (not a subnormal) when fewer than k entries are positive.
  x = np.zeros((3, 10), np.float32)
  x[0, :3] = [0.5, 2.0, 1.0]
  x[1, :6] = np.arange(1, 7)
  rows = np.asarray(select.kth_largest(jnp.asarray(x), 5, axis=-1))
  np.testing.assert_array_equal(rows, [0.0, 2.0, 0.0])
  assert float(select.kth_largest(jnp.asarray(x), 10)) == 0.0  # 9 positives in all
  assert float(select.kth_largest(jnp.asarray(x), 9)) == 0.5
  assert float(select.kth_largest(jnp.zeros(4), 1)) == 0.0
  # Full size of relu'd data (zeros present) is the same case: top_k's k-th value is 0.
  y = _relu_normal((16, 40), seed=9)
  assert float(select.kth_largest(jnp.asarray(y), y.size)) == float(_kth_ref(y, y.size)) == 0.0


def test_kth_largest_handles_tiny_and_huge_values():
  x = jnp.asarray([1e-30, 3e30, 7.0, 2e-38, 0.0], jnp.float32)  # all normal floats
  for k in range(1, 5):
    assert float(select.kth_largest(x, k)) == float(_kth_ref(np.asarray(x), k))  # eager, int k


def test_kth_largest_bad_axis():
  with pytest.raises(ValueError, match='axis'):
    select.kth_largest(jnp.ones((2, 3)), 1, axis=0)


# ---- sparsifiers -----------------------------------------------------------------------------

B, N, K = 64, 256, 8


def test_batch_topk_keeps_exactly_k_times_batch_largest():
  acts = jnp.asarray(_relu_normal((B, N), seed=5))
  codes = np.asarray(batch_topk.train_codes(acts, K))
  nz = codes != 0
  assert nz.sum() == K * B
  np.testing.assert_array_equal(codes[nz], np.asarray(acts)[nz])  # values pass through
  assert codes[nz].min() >= np.asarray(acts)[~nz].max()  # the largest ones are kept
  # Per-input sparsity adapts: not every row has exactly k.
  assert len(np.unique(nz.sum(1))) > 1


def test_topk_keeps_exactly_k_per_row():
  acts = jnp.asarray(_relu_normal((B, N), seed=6))
  codes = np.asarray(topk.topk_codes(acts, K))
  nz = codes != 0
  np.testing.assert_array_equal(nz.sum(1), K)
  a = np.asarray(acts)
  np.testing.assert_array_equal(codes[nz], a[nz])
  for r in range(B):
    assert codes[r][nz[r]].min() >= a[r][~nz[r]].max()
  np.testing.assert_array_equal(np.asarray(topk.ARCH.infer_codes({}, acts, K, 123.0)), codes)


def test_batch_topk_with_valid_mask():
  acts = jnp.asarray(_relu_normal((B, N), seed=7))
  valid = np.random.default_rng(0).random(B) < 0.6
  n_valid = int(valid.sum())
  assert 0 < n_valid < B

  @jax.jit
  def f(a, v):
    return batch_topk.train_codes(a, K, v)

  codes = np.asarray(f(acts, jnp.asarray(valid)))
  nz = codes != 0
  assert nz.sum() == K * n_valid
  assert not nz[~valid].any()
  # The kept ones are the largest among the valid rows.
  a_valid = np.asarray(acts)[valid]
  assert codes[valid][nz[valid]].min() >= a_valid[~nz[valid]].max()
  # A different mask under the same jit.
  valid2 = np.zeros(B, bool)
  valid2[:10] = True
  codes2 = np.asarray(f(acts, jnp.asarray(valid2)))
  assert (codes2 != 0).sum() == K * 10 and not (codes2[10:] != 0).any()


def test_batch_topk_with_traced_k():
  acts = jnp.asarray(_relu_normal((B, N), seed=8))
  f = jax.jit(batch_topk.train_codes)
  for k in (1, 3, 8):
    assert int(np.sum(np.asarray(f(acts, jnp.int32(k))) != 0)) == k * B


def test_batch_topk_infer_codes_uses_threshold():
  acts = jnp.asarray([[0.1, 0.5, 0.0, 2.0], [0.3, 0.29, 0.31, 0.0]], jnp.float32)
  got = np.asarray(batch_topk.infer_codes(acts, 0.3))
  np.testing.assert_array_equal(got, np.float32([[0, 0.5, 0, 2.0], [0, 0, 0.31, 0]]))


def test_update_threshold():
  codes1 = jnp.asarray([[0.0, 0.7, 0.4], [0.9, 0.0, 0.0]], jnp.float32)
  t0 = jnp.float32(-1.0)  # unset
  t1 = batch_topk.update_threshold(t0, codes1, 0.9, True)
  assert float(t1) == pytest.approx(0.4)  # first update: min positive code, no EMA with -1
  codes2 = jnp.asarray([[0.0, 2.0], [1.0, 0.0]], jnp.float32)
  t2 = batch_topk.update_threshold(t1, codes2, 0.9, True)
  assert float(t2) == pytest.approx(0.9 * 0.4 + 0.1 * 1.0)
  # Disabled: unchanged, whether or not it was set.
  assert float(batch_topk.update_threshold(t1, codes2, 0.9, False)) == pytest.approx(0.4)
  assert float(batch_topk.update_threshold(t0, codes2, 0.9, jnp.bool_(False))) == -1.0
  # No positive code: unchanged (no inf).
  zeros = jnp.zeros((2, 3), jnp.float32)
  assert float(batch_topk.update_threshold(t1, zeros, 0.9, True)) == pytest.approx(0.4)
  assert float(batch_topk.update_threshold(t0, zeros, 0.9, True)) == -1.0
  # TopK has no threshold.
  assert float(topk.ARCH.update_threshold(t1, codes2, 0.9, True)) == pytest.approx(0.4)


def test_get_arch():
  assert saes.get_arch('batch_topk') is batch_topk.ARCH
  assert saes.get_arch('topk') is topk.ARCH
  with pytest.raises(ValueError, match='unknown SAE arch'):
    saes.get_arch('gated')


# ---- common ----------------------------------------------------------------------------------

def test_normalize_rows():
  w = jnp.asarray(np.random.default_rng(0).standard_normal((10, 7)) * 5, jnp.float32)
  u = np.asarray(common.normalize_rows(w))
  np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-6)
  cos = np.sum(u * np.asarray(w), 1) / np.linalg.norm(np.asarray(w), axis=1)
  np.testing.assert_allclose(cos, 1.0, atol=1e-6)
  z = np.asarray(common.normalize_rows(jnp.zeros((2, 3))))
  assert np.all(np.isfinite(z))


def test_remove_parallel_grad():
  rng = np.random.default_rng(1)
  w = common.normalize_rows(jnp.asarray(rng.standard_normal((12, 9)), jnp.float32))
  g = jnp.asarray(rng.standard_normal((12, 9)), jnp.float32)
  out = np.asarray(common.remove_parallel_grad(g, w))
  w, g = np.asarray(w), np.asarray(g)
  np.testing.assert_allclose(np.sum(out * w, 1), 0.0, atol=1e-5)
  # Only the parallel part was removed: the difference is along w.
  diff = g - out
  np.testing.assert_allclose(diff - np.sum(diff * w, 1, keepdims=True) * w, 0.0, atol=1e-5)
  # A gradient already orthogonal is unchanged.
  np.testing.assert_allclose(np.asarray(common.remove_parallel_grad(out, w)), out, atol=1e-5)


def test_geometric_median_is_robust_to_outliers():
  rng = np.random.default_rng(2)
  centre = np.array([1.0, -2.0, 3.0, 0.5], np.float32)
  pts = centre + 0.1 * rng.standard_normal((50, 4)).astype(np.float32)
  pts = np.concatenate([pts, np.full((3, 4), 1000.0, np.float32)])
  med = np.asarray(common.geometric_median(jnp.asarray(pts)))
  mean = pts.mean(0)
  assert np.linalg.norm(med - centre) < 0.2
  assert np.linalg.norm(mean - centre) > 10


def test_geometric_median_weights_and_symmetry():
  pts = jnp.asarray([[1.0, 0], [-1, 0], [0, 1], [0, -1]], jnp.float32)
  np.testing.assert_allclose(np.asarray(common.geometric_median(pts)), 0.0, atol=1e-4)
  # Heavy weight on one point pulls the median onto it (majority weight).
  w = jnp.asarray([10.0, 1, 1, 1])
  np.testing.assert_allclose(np.asarray(common.geometric_median(pts, weights_n=w)), [1.0, 0.0],
                             atol=1e-3)


_init = jax.jit(common.init_params, static_argnums=(1, 2))


def test_init_params():
  p = _init(jax.random.key(0), 16, 40)
  assert p['w_enc'].shape == (16, 40) and p['w_dec'].shape == (40, 16)
  assert p['b_enc'].shape == (40,) and p['b_dec'].shape == (16,)
  np.testing.assert_array_equal(np.asarray(p['w_enc']), np.asarray(p['w_dec']).T)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(p['w_dec']), axis=1), 1.0, atol=1e-5)
  assert not np.any(np.asarray(p['b_enc'])) and not np.any(np.asarray(p['b_dec']))
  # Different keys give different dictionaries.
  q = _init(jax.random.key(1), 16, 40)
  assert not np.allclose(np.asarray(p['w_dec']), np.asarray(q['w_dec']))


def test_init_params_from_rows():
  rows = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32) * 3
  p = _init(jax.random.key(0), 16, 12, rows_nd=jnp.asarray(rows))
  w = np.asarray(p['w_dec'])
  np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-5)
  unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
  cos = np.sum(w * unit[np.arange(12) % 5], 1)
  assert np.all(cos > 0.999)
  np.testing.assert_array_equal(np.asarray(p['w_enc']), w.T)


def test_pre_acts_and_decode():
  rng = np.random.default_rng(4)
  p = {k: jnp.asarray(v, jnp.float32) for k, v in dict(
      w_enc=rng.standard_normal((6, 5)), b_enc=rng.standard_normal(5),
      w_dec=rng.standard_normal((5, 6)), b_dec=rng.standard_normal(6)).items()}
  x = rng.standard_normal((3, 6)).astype(np.float32)
  pa = np.asarray(common.pre_acts(p, jnp.asarray(x)))
  ref = np.maximum((x - np.asarray(p['b_dec'])) @ np.asarray(p['w_enc']) + np.asarray(p['b_enc']),
                   0)
  np.testing.assert_allclose(pa, ref, atol=1e-5)
  np.testing.assert_allclose(np.asarray(common.decode(p, jnp.asarray(pa))),
                             pa @ np.asarray(p['w_dec']) + np.asarray(p['b_dec']), atol=1e-5)


# ---- objective -------------------------------------------------------------------------------

# Jitted once per SAEHyper (static): eager op-by-op dispatch of the loss is several times slower.
_loss = jax.jit(objective.sae_loss, static_argnums=0)


def _hyper(arch='batch_topk', k=4, d=32, auxk=1 / 32, dead=100, anneal=0, k_aux=16):
  return objective.SAEHyper(arch=arch, k=k, k_aux=k_aux, auxk_weight=auxk, dead_tokens=dead,
                            k_anneal_steps=anneal, d=d)


def _perfect(d=32, n=24, b=64, k=4, seed=0):
  """Orthonormal atoms, inputs with exactly k of them, encoder = decoder^T, zero biases."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((d, n)))
  atoms = q.T.astype(np.float32)  # [n, d] orthonormal rows
  coef = np.zeros((b, n), np.float32)
  for r in range(b):
    coef[r, rng.choice(n, k, replace=False)] = rng.uniform(0.5, 2.0, k)
  x = coef @ atoms
  params = {'w_enc': jnp.asarray(atoms.T), 'b_enc': jnp.zeros(n), 'w_dec': jnp.asarray(atoms),
            'b_dec': jnp.zeros(d)}
  return params, jnp.asarray(x), coef


@pytest.mark.parametrize('arch', ['batch_topk', 'topk'])
def test_perfect_dictionary_reconstructs(arch):
  params, x, coef = _perfect()
  h = _hyper(arch=arch)
  out = _loss(h, params, jnp.zeros(24, jnp.int32), x, 0)
  assert float(out.recon) < 1e-8
  assert float(out.fvu) < 1e-8
  assert float(out.l0) == pytest.approx(4.0)
  np.testing.assert_allclose(np.asarray(out.codes), coef, atol=1e-5)
  assert float(out.aux) == 0.0  # nothing dead
  assert float(out.loss) == pytest.approx(float(out.recon), abs=1e-8)


def test_wrong_dictionary_has_error():
  params, x, _ = _perfect()
  params = dict(params, w_dec=jnp.roll(params['w_dec'], 1, axis=0))
  out = _loss(_hyper(), params, jnp.zeros(24, jnp.int32), x, 0)
  assert float(out.fvu) > 0.5


def test_auxk_zero_without_dead_and_positive_with_dead():
  rng = np.random.default_rng(5)
  d, n, b = 16, 48, 32
  params = _init(jax.random.key(3), d, n)
  x = jnp.asarray(rng.standard_normal((b, d)), jnp.float32)
  h = _hyper(k=2, d=d, dead=10, k_aux=8)
  alive = jnp.zeros(n, jnp.int32)
  out = _loss(h, params, alive, x, 0)
  assert float(out.aux) == 0.0
  assert float(out.recon) > 0
  since = jnp.asarray(np.where(np.arange(n) % 2 == 0, 100, 0), jnp.int32)  # half are dead
  out2 = _loss(h, params, since, x, 0)
  assert float(out2.aux) > 0
  assert float(out2.recon) == pytest.approx(float(out.recon))
  assert float(out2.loss) == pytest.approx(float(out2.recon) + h.auxk_weight * float(out2.aux),
                                           rel=1e-5)
  # The AuxK gradient reaches only dead latents' decoder rows.
  g = jax.jit(jax.grad(lambda p: objective.sae_loss(h, p, since, x, 0).aux))(params)
  gnorm = np.linalg.norm(np.asarray(g['w_dec']), axis=1)
  dead = np.asarray(since) >= h.dead_tokens
  assert np.all(gnorm[~dead] == 0) and np.any(gnorm[dead] > 0)
  # auxk_weight = 0: no aux term at all.
  out3 = _loss(h._replace(auxk_weight=0.0), params, since, x, 0)
  assert float(out3.aux) == 0.0 and float(out3.loss) == pytest.approx(float(out3.recon))


def test_k_at_anneals_linearly():
  h = _hyper(k=4, d=64, anneal=100)
  assert int(objective.k_at(h, 0)) == 64
  assert int(objective.k_at(h, 50)) == 34
  assert int(objective.k_at(h, 25)) == 49
  assert int(objective.k_at(h, 100)) == 4
  assert int(objective.k_at(h, 1000)) == 4
  ks = np.asarray(objective.k_at(h, jnp.arange(101)))
  assert np.all(np.diff(ks) <= 0) and ks[0] == 64 and ks[-1] == 4  # monotone
  # Traced step.
  f = jax.jit(lambda s: objective.k_at(h, s))
  assert int(f(jnp.int32(50))) == 34 and int(f(jnp.int32(0))) == 64
  # No annealing: k itself.
  assert objective.k_at(_hyper(k=4, d=64, anneal=0), 0) == 4


def test_sae_loss_anneals_sparsity_with_step():
  rng = np.random.default_rng(6)
  d, n, b = 16, 64, 32
  params = _init(jax.random.key(4), d, n)
  x = jnp.asarray(rng.standard_normal((b, d)), jnp.float32)
  h = _hyper(arch='topk', k=2, d=d, anneal=10, auxk=0.0)
  since = jnp.zeros(n, jnp.int32)
  l0_start = float(_loss(h, params, since, x, 0).l0)
  l0_end = float(_loss(h, params, since, x, 10).l0)
  assert l0_end == pytest.approx(2.0)
  assert l0_start > 8  # starts at up to d = 16 per input (fewer only where < 16 are positive)


def test_sae_loss_valid_mask_ignores_padding_rows():
  params, x, _ = _perfect(b=32)
  x_pad = jnp.concatenate([x, 100.0 * jnp.ones((8, x.shape[1]))])
  valid = jnp.asarray([True] * 32 + [False] * 8)
  out = _loss(_hyper(), params, jnp.zeros(24, jnp.int32), x_pad, 0, valid_b=valid)
  assert float(out.recon) < 1e-8
  assert float(out.l0) == pytest.approx(4.0)
  assert not np.any(np.asarray(out.codes)[32:])
