"""The algebra of each intervention on constructed cases, against a numpy re-statement of the
SAE inference rules; positions; jit reuse across concepts; the edits split of the ports."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csae_jax.steering import interventions as iv
from csae_jax.vlms import edits as edits_lib

D, N = 16, 40


def random_sae(arch: str, seed: int = 0) -> iv.SAE:
  rng = np.random.default_rng(seed)
  w_dec = rng.standard_normal((N, D)).astype(np.float32)
  w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
  params = {'w_enc': w_dec.T.copy(), 'b_enc': 0.1 * rng.standard_normal(N).astype(np.float32),
            'w_dec': w_dec, 'b_dec': 0.1 * rng.standard_normal(D).astype(np.float32)}
  if arch == 'jumprelu':
    params['log_threshold'] = np.log(rng.uniform(0.2, 0.8, N)).astype(np.float32)
  return iv.SAE({k: jnp.asarray(v) for k, v in params.items()}, 0.5, arch, 5)


def np_codes(sae: iv.SAE, x: np.ndarray) -> np.ndarray:
  """The inference rules written out again: threshold / per-row top-k / per-latent threshold."""
  p = {k: np.asarray(v, np.float64) for k, v in sae.params.items()}
  pre = np.maximum((x - p['b_dec']) @ p['w_enc'] + p['b_enc'], 0)
  if sae.arch in ('batch_topk', 'matryoshka'):
    return np.where(pre > sae.threshold, pre, 0)
  if sae.arch == 'topk':
    kth = np.sort(pre, axis=1)[:, -sae.k][:, None]
    return np.where((pre >= kth) & (pre > 0), pre, 0)
  if sae.arch == 'jumprelu':
    return np.where(pre > np.exp(p['log_threshold']), pre, 0)
  raise AssertionError(sae.arch)


def _x(t=12, seed=1):
  return np.random.default_rng(seed).standard_normal((t, D)).astype(np.float32) * 1.5


ARCHS = ['batch_topk', 'topk', 'jumprelu', 'matryoshka']
MEMBERS = [3, 7, 19]


@pytest.mark.parametrize('arch', ARCHS)
def test_clamp_clamp_error_ablate_algebra(arch):
  sae, x = random_sae(arch), _x()
  f = np_codes(sae, x)
  assert (f > 0).any(1).all() and (f == 0).any()  # the rule really sparsifies
  w, b = np.asarray(sae.params['w_dec'], np.float64), np.asarray(sae.params['b_dec'], np.float64)
  f_clamped = f.copy()
  f_clamped[:, MEMBERS] = 2.5
  got = np.asarray(iv.make(sae, MEMBERS, mode='clamp', value=2.5)(jnp.asarray(x)))
  np.testing.assert_allclose(got, f_clamped @ w + b, atol=1e-4)
  got = np.asarray(iv.make(sae, MEMBERS, mode='clamp_error', value=-2.5)(jnp.asarray(x)))
  f_neg = f.copy()
  f_neg[:, MEMBERS] = -2.5
  np.testing.assert_allclose(got, x + (f_neg - f) @ w, atol=1e-4)
  # ablation removes exactly the members' contribution f[m] W_dec[m], error term kept
  got = np.asarray(iv.make(sae, MEMBERS, mode='ablate')(jnp.asarray(x)))
  np.testing.assert_allclose(got, x - f[:, MEMBERS] @ w[MEMBERS], atol=1e-4)
  # ... so the SAE's reconstruction of the rest is what remains: x - x' == member part
  assert np.abs(f[:, MEMBERS]).sum() > 0  # the members were active: the check is not vacuous
  # per-member values
  vals = np.array([1.0, -2.0, 3.0], np.float32)
  got = np.asarray(iv.make(sae, MEMBERS, mode='clamp', value=vals)(jnp.asarray(x)))
  f_v = f.copy()
  f_v[:, MEMBERS] = vals
  np.testing.assert_allclose(got, f_v @ w + b, atol=1e-4)


@pytest.mark.parametrize('arch', ARCHS)
def test_strength_zero_is_the_identity(arch):
  sae, x = random_sae(arch), jnp.asarray(_x())
  for mode in ('clamp_error', 'ablate', 'add'):
    out = iv.make(sae, MEMBERS, mode=mode, value=4.0, strength=0.0)(x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
    full = iv.make(sae, MEMBERS, mode=mode, value=4.0)(x)
    assert np.abs(np.asarray(full) - np.asarray(x)).max() > 0.1, mode
  # clamp at strength 0 is the plain reconstruction
  f = np_codes(sae, np.asarray(x))
  out = iv.make(sae, MEMBERS, mode='clamp', value=4.0, strength=0.0)(x)
  np.testing.assert_allclose(np.asarray(out), f @ np.asarray(sae.params['w_dec']) +
                             np.asarray(sae.params['b_dec']), atol=1e-4)
  # half strength of clamp_error moves the member codes half way to the value
  half = iv.make(sae, MEMBERS, mode='clamp_error', value=4.0, strength=0.5)(x)
  w = np.asarray(sae.params['w_dec'])
  np.testing.assert_allclose(np.asarray(half), np.asarray(x) + 0.5 * (4.0 - f[:, MEMBERS]) @
                             w[MEMBERS], atol=1e-4)


def test_add_moves_along_the_unit_member_direction():
  sae, x = random_sae('batch_topk'), _x()
  w = np.asarray(sae.params['w_dec'])[MEMBERS].sum(0)
  got = np.asarray(iv.make(sae, MEMBERS, mode='add', value=-3.0)(jnp.asarray(x)))
  np.testing.assert_allclose(got, x - 3.0 * w / np.linalg.norm(w), atol=1e-5)
  direction = np.eye(D, dtype=np.float32)[2] * 7  # any direction, normalised
  got = np.asarray(iv.make(sae, MEMBERS, mode='add', value=2.0, direction=direction)(x))
  np.testing.assert_allclose(got - x, np.broadcast_to(2.0 * np.eye(D)[2], x.shape), atol=1e-6)


def test_only_the_chosen_positions_change():
  sae = random_sae('topk')
  x_nd = jnp.asarray(_x(3 * 6))  # a vision site: 3 images x 6 patch rows
  pos = [1, 4]
  e = iv.make(sae, MEMBERS, mode='clamp', value=3.0, positions=pos, n_tokens=6)
  full = np.asarray(iv.make(sae, MEMBERS, mode='clamp', value=3.0)(x_nd))
  got = np.asarray(e(x_nd))
  chosen = np.isin(np.arange(18) % 6, pos)
  np.testing.assert_array_equal(got[~chosen], np.asarray(x_nd)[~chosen])
  np.testing.assert_array_equal(got[chosen], full[chosen])
  assert np.abs(got[chosen] - np.asarray(x_nd)[chosen]).min() > 0
  # a text site [B, S, D]: prompt positions; a decode step [B, 1, D] is left alone
  x_bsd = jnp.asarray(_x(2 * 6).reshape(2, 6, D))
  got = np.asarray(e(x_bsd))
  np.testing.assert_array_equal(got[:, [0, 2, 3, 5]], np.asarray(x_bsd)[:, [0, 2, 3, 5]])
  assert np.abs(got[:, pos] - np.asarray(x_bsd)[:, pos]).min() > 0
  step = x_bsd[:, :1]
  np.testing.assert_array_equal(np.asarray(e(step)), np.asarray(step))
  with pytest.raises(ValueError, match='positions cover 6 tokens'):
    e(x_bsd[:, :4])


def test_one_compilation_for_every_concept_and_value():
  """Members, values and strength are traced: new concepts of any size reuse the program."""
  sae, x = random_sae('batch_topk'), jnp.asarray(_x())

  @jax.jit
  def apply(edit, x):
    return edit(x)

  outs = [apply(iv.make(sae, m, mode='clamp', value=v), x)
          for m, v in (([1, 2], 1.0), ([5], -2.0), (list(range(20)), 3.0))]
  assert apply._cache_size() == 1
  np.testing.assert_allclose(np.asarray(outs[1]),
                             np.asarray(iv.make(sae, [5], mode='clamp', value=-2.0)(x)), atol=1e-6)
  apply(iv.make(sae, [1], mode='clamp_error', value=1.0), x)
  assert apply._cache_size() == 2  # the mode is static


def test_edits_split_plain_functions_static_pytrees_traced():
  sae = random_sae('batch_topk')
  f = lambda h: h * 2  # noqa: E731
  e = iv.make(sae, MEMBERS, value=1.0)
  static, leaves = edits_lib.split({'b': e, 'a': f})
  assert [s[0] for s in static] == ['a', 'b'] and static[0][1] is f and not static[0][2]
  assert static[1][2] and len(leaves) == 1
  _, leaves2 = edits_lib.split({'a': f, 'b': iv.make(sae, [0], value=-5.0)})
  assert edits_lib.split({'a': f, 'b': iv.make(sae, [0], value=-5.0)})[0] == static  # same key
  merged = edits_lib.merge(static, leaves2)
  x = jnp.asarray(_x())
  np.testing.assert_allclose(np.asarray(merged['b'](x)),
                             np.asarray(iv.make(sae, [0], value=-5.0)(x)), atol=1e-6)
  with pytest.raises(ValueError, match='non-array leaves'):
    edits_lib.split({'a': jax.tree_util.Partial(lambda s, h: h, 'text')})
  with pytest.raises(ValueError, match='not a function'):
    edits_lib.split({'a': 3})


def test_bad_inputs_say_what_is_wrong(tmp_path):
  sae = random_sae('batch_topk')
  with pytest.raises(ValueError, match='member ids'):
    iv.make(sae, [N], value=1.0)
  with pytest.raises(ValueError, match='at least one member'):
    iv.make(sae, [], value=1.0)
  with pytest.raises(ValueError, match='steering mode'):
    iv.make(sae, [1], mode='clamp_all')
  with pytest.raises(ValueError, match='d = 16'):
    iv.make(sae, [1], value=1.0)(jnp.zeros((4, 8)))
  with pytest.raises(ValueError, match='one per member'):
    iv.make(sae, [1, 2], value=np.ones(3))
  with pytest.raises(ValueError, match='positions'):
    iv.make(sae, [1], value=1.0, positions=[9], n_tokens=6)
  with pytest.raises(ValueError, match='no exported SAE'):
    iv.load_sae(str(tmp_path))
