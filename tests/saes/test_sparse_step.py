"""The k-sparse custom-VJP step (saes/sparse.py): its selection is the dense one exactly (also when
a row overflows its BatchTopK candidates), and its loss and gradients equal the dense step's
across shapes, over several decode chunks and with AuxK on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csae_jax.saes import batch_topk, codes, common, objective, sparse, topk


def _pair_set(p: sparse.Pairs):
  v, r, c = (np.asarray(a) for a in p)
  return {(int(i), int(j)): float(x) for x, i, j in zip(v, r, c) if x > 0}


def _dense_set(codes_bn):
  codes = np.asarray(codes_bn)
  return {(int(i), int(j)): float(codes[i, j]) for i, j in zip(*np.nonzero(codes))}


def _overflows(acts_bn, k):
  """True when some row's last BatchTopK candidate reaches the candidates' threshold (the case
  the exact fallback serves)."""
  m = min(acts_bn.shape[1], sparse.CANDIDATES_PER_K * k)
  cand = np.sort(np.asarray(acts_bn), -1)[:, ::-1][:, :m]
  thr = np.sort(cand.reshape(-1))[::-1][k * acts_bn.shape[0] - 1]
  return bool(np.max(cand[:, -1]) >= thr)


@pytest.mark.parametrize('path', ['blocks', 'candidates'])
@pytest.mark.parametrize('overflow', [False, True])
def test_batch_selection_is_the_dense_batch_topk_exactly(monkeypatch, overflow, path):
  b, n, k = 32, 512, 4
  if path == 'candidates':
    monkeypatch.setattr(sparse, 'BLOCK_MIN_PER_K', 10**6)
  assert sparse.use_blocks(n, k) == (path == 'blocks')
  acts = jax.nn.relu(jax.random.normal(jax.random.key(0), (b, n)))
  if overflow:  # row 3 holds far more than its candidates' worth of the batch's largest entries
    acts = acts.at[3, :200].set(10.0 + jax.random.uniform(jax.random.key(9), (200,)))
  assert _overflows(acts, k) == overflow
  got = _pair_set(jax.jit(sparse.select_batch, static_argnums=1)(acts, k))
  want = _dense_set(batch_topk.train_codes(acts, k))
  assert got == want and len(got) == k * b


def _blocks_case(case):
  """[B, n] activations for the block-maxima selection, k = 3."""
  b, n = 16, 1000  # 1000 = 62.5 blocks: the last one padded
  acts = jax.nn.relu(jax.random.normal(jax.random.key(11), (b, n)))
  if case == 'sparse':  # fewer positive entries than the batch's k B: all of them kept
    u = jax.random.uniform(jax.random.key(12), (b, n))
    acts = jnp.where(u < 0.002, 0.1 + u, 0.0)
  if case == 'tail':  # the largest entries in the padded last block and at the very end
    acts = acts.at[:, -8:].set(5.0 + jax.random.uniform(jax.random.key(13), (b, 8)))
  if case == 'ties':  # k B = 3 B large entries in 2 B blocks, then 23 blocks a row tied at 1.0:
    # the bound lands on the tie, so every tied block is live (more than the room: the fallback)
    big = 2.0 + jax.random.uniform(jax.random.key(14), (b, 3))
    acts = jnp.minimum(acts, 0.5).at[:, 16:400:16].set(1.0)
    acts = acts.at[:, jnp.array([0, 1, 32])].set(big)
  return acts


@pytest.mark.parametrize('case', ['random', 'sparse', 'tail', 'ties'])
def test_block_selection_is_exact(case):
  """The block-maxima BatchTopK and TopK give the dense selection exactly: on a padded last
  block, with fewer positives than k B, and (BatchTopK) on the tie that overfills the live
  blocks' room, where the exact fallback over the whole batch runs."""
  k = 3
  acts = _blocks_case(case)
  b, n = acts.shape
  assert sparse.use_blocks(n, k)
  live = jax.jit(sparse.live_blocks, static_argnums=1)(acts, k)
  assert (int(live.n_live) > live.cap) == (case == 'ties')
  got = _pair_set(jax.jit(sparse.select_batch, static_argnums=1)(acts, k))
  want = _dense_set(batch_topk.train_codes(acts, k))
  assert got == want
  assert len(got) == (int(jnp.sum(acts > 0)) if case == 'sparse' else k * b)
  if case != 'ties':  # (rows tied at their k-th entry have no unique top k)
    assert _pair_set(sparse.select_rows(acts, k)) == _dense_set(topk.topk_codes(acts, k))


def test_block_selection_from_pre_activations():
  """The k-sparse step hands the selection PreActs(pre, b) (the ReLU left to XLA to fuse): the
  same pairs as from relu(pre + b) itself, on a padded last block too."""
  b, n, k = 16, 1000, 3
  pre = jax.random.normal(jax.random.key(16), (b, n))
  bias = jax.random.normal(jax.random.key(17), (n,)) - 1.0
  acts = jax.nn.relu(pre + bias)
  lazy = sparse.PreActs(pre, bias)
  for select, dense in ((sparse.select_batch, batch_topk.train_codes), (sparse.select_rows,
                                                                        topk.topk_codes)):
    got = _pair_set(jax.jit(select, static_argnums=1)(lazy, k))
    assert got == _dense_set(dense(acts, k)) and len(got) == k * b


def test_compact_is_nonzero():
  mask = jax.random.uniform(jax.random.key(15), (37, 53)) < 0.1
  for size in (5, int(jnp.sum(mask)), 400):
    pos, count = sparse.compact(mask, size)
    np.testing.assert_array_equal(np.asarray(pos),
                                  np.asarray(jnp.nonzero(mask.reshape(-1), size=size,
                                                         fill_value=0)[0]))
    assert int(count) == int(jnp.sum(mask))


def test_row_selection_is_each_rows_top_k():
  acts = jax.nn.relu(jax.random.normal(jax.random.key(1), (8, 64)))
  got = _pair_set(sparse.select_rows(acts, 5))
  a = np.asarray(acts)
  want = {(i, int(j)): float(a[i, j]) for i in range(8) for j in np.argsort(-a[i])[:5]}
  assert got == want


@pytest.mark.parametrize('arch,b,d,n,k,overflow,code_l1', [
    ('topk', 24, 16, 96, 5, False, 0.0),
    ('batch_topk', 24, 16, 96, 5, False, 0.0),
    ('batch_topk', 32, 8, 300, 3, True, 0.0),
    ('topk', 24, 16, 96, 5, False, 0.3),       # the code L1 through the custom VJP's values
    ('batch_topk', 32, 8, 300, 3, True, 0.3),
])
@pytest.mark.parametrize('aux', ['dense_full', 'dense_compact', 'dense_few', 'pairs'])
def test_sparse_loss_and_grads_match_dense_over_chunks(monkeypatch, arch, b, d, n, k, overflow,
                                                       code_l1, aux):
  # Chunks of 7 pairs: the scatter loops run many chunks and pad the last one. AuxK on its dense
  # GEMM path (over all latents: half of them dead; compacted: n / 8 dead, more than k_aux;
  # few: k_aux / 2 dead, all kept without a top-k) and on the pair path.
  monkeypatch.setattr(sparse, 'CHUNK_BYTES', 7 * 4 * d)
  monkeypatch.setattr(sparse, 'AUX_DENSE_RATIO', 0 if aux == 'pairs' else 10**6)
  assert sparse.aux_is_dense(2 * k, n) == (aux != 'pairs')
  n_dead = {'dense_compact': n // 8, 'dense_few': k}.get(aux, n // 2)
  assert (n_dead <= n // sparse.AUX_COMPACT_DIV) == aux.startswith(('dense_compact', 'dense_few'))
  assert (n_dead <= sparse.aux_widths(2 * k, n).few) == (aux == 'dense_few')
  params = common.init_params(jax.random.key(2), d, n)
  params['b_dec'] = jnp.linspace(-0.5, 0.5, d)
  x = jax.random.normal(jax.random.key(3), (b, d))
  if overflow:  # one input far off the others: its row takes most of the batch's budget
    x = x.at[0].mul(40.0)
    acts = common.pre_acts(params, x)
    assert _overflows(acts, k)
  since = jnp.where(jnp.arange(n) < n - n_dead, 0, 10**6)  # the last n_dead dead: AuxK runs
  h = objective.SAEHyper(arch=arch, k=k, k_aux=2 * k, auxk_weight=1 / 32, dead_tokens=100,
                         k_anneal_steps=0, d=d, code_l1=code_l1)
  assert objective.uses_sparse_step(h._replace(sparse_decode=True))

  def loss(p, sp):
    out = objective.sae_loss(h._replace(sparse_decode=sp), p, since, x, 5)
    return out.loss, (out.aux, out.l0, out.sparsity, out.codes)

  (ld, (ad, l0d, sd, codes)), gd = jax.jit(jax.value_and_grad(loss, has_aux=True),
                                             static_argnums=1)(params, False)
  (ls, (as_, l0s, ss, _)), gs = jax.jit(jax.value_and_grad(loss, has_aux=True),
                                        static_argnums=1)(params, True)
  # the code L1 by hand: code_l1 / sqrt(k) x mean over rows of sum_i f_i ||d_i||
  norms = np.linalg.norm(np.asarray(params['w_dec']), axis=-1)
  want = code_l1 / np.sqrt(k) * np.mean(np.asarray(codes) @ norms)
  assert float(sd) == pytest.approx(want, rel=1e-5, abs=1e-9)
  assert float(ss) == pytest.approx(want, rel=1e-5, abs=1e-9)
  assert float(ad) > 0 and float(as_) == pytest.approx(float(ad), rel=1e-5)
  assert float(l0s) == pytest.approx(float(l0d)) and float(ls) == pytest.approx(float(ld), rel=1e-5)
  for key in ('w_enc', 'b_enc', 'w_dec', 'b_dec'):
    np.testing.assert_allclose(np.asarray(gs[key]), np.asarray(gd[key]), rtol=1e-4, atol=1e-6,
                               err_msg=key)
  # the input's gradient too (joint mode trains level 2 on level-1 rows that keep theirs)
  gx = [jax.jit(jax.grad(lambda xx, sp: objective.sae_loss(h._replace(sparse_decode=sp), params,
                                                           since, xx, 5).loss),
                static_argnums=1)(x, sp) for sp in (False, True)]
  np.testing.assert_allclose(np.asarray(gx[1]), np.asarray(gx[0]), rtol=1e-4, atol=1e-6)


def test_top_k_stays_on_the_topk_kernel_next_to_a_cond():
  """The optimization barrier keeps XLA from turning top_k into a full sort when a `lax.cond`
  reads its values (the 14x slowdown sparse.top_k documents)."""
  def f(a):
    v, _ = sparse.top_k(a, 8)
    return jax.lax.cond(v[0, 0] > 0, lambda t: t + 1, lambda t: t - 1, v[0, 0])

  hlo = jax.jit(f).lower(jnp.ones((16, 256))).compile().as_text()
  assert ' sort(' not in hlo


@pytest.mark.parametrize('overflow', [False, True])
@pytest.mark.parametrize('masked', [False, True])
def test_top_k_selection_equals_the_bisection(overflow, masked):
  """SAEHyper.select_top_k (unsharded latents): TopK and BatchTopK pick the same codes as the
  bisection, with the BatchTopK candidates overflowing (the fallback) and with a traced row mask
  (joint mode's live atoms)."""
  b, n, k = 32, 512, 4
  acts = jax.nn.relu(jax.random.normal(jax.random.key(0), (b, n)))
  if overflow:
    acts = acts.at[3, :200].set(10.0 + jax.random.uniform(jax.random.key(9), (200,)))
  assert _overflows(acts, k) == overflow
  valid = (jnp.arange(b) % 3 != 1) if masked else None
  n_rows = int(jnp.sum(valid)) if masked else b
  for fast, slow, kept in (
      (lambda a, v: batch_topk.train_codes(a, k, v, True),
       lambda a, v: batch_topk.train_codes(a, k, v, False), k * n_rows),
      (lambda a, v: topk.topk_codes(a, k, True), lambda a, v: topk.topk_codes(a, k, False),
       k * b)):
    got, want = jax.jit(fast)(acts, valid), jax.jit(slow)(acts, valid)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert int(jnp.sum(got > 0)) == kept


@pytest.mark.parametrize('arch', ['topk', 'batch_topk', 'matryoshka'])
def test_top_k_selection_trains_exactly_like_the_bisection(arch):
  """The dense step's loss and gradients (AuxK engaged) with select_top_k on and off: the same
  bit for bit, so the choice per mesh changes speed only."""
  d, n, b, k = 16, 128, 24, 4
  params = common.init_params(jax.random.key(2), d, n)
  x = jax.random.normal(jax.random.key(3), (b, d))
  since = jnp.where(jnp.arange(n) < n // 2, 0, 10**6)
  h = objective.SAEHyper(arch=arch, k=k, k_aux=2 * k, auxk_weight=1 / 32, dead_tokens=100,
                         k_anneal_steps=0, d=d, groups=(32, 96) if arch == 'matryoshka' else ())

  def loss(p, fast):
    return objective.sae_loss(h._replace(select_top_k=fast), p, since, x, 5).loss

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  (l_fast, g_fast), (l_slow, g_slow) = grad(params, True), grad(params, False)
  assert float(l_fast) == float(l_slow)
  for a, c in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_slow)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize('batch', [False, True])
def test_pair_statistics_equal_the_dense_codes(batch):
  """codes.*: firing counts, the smallest positive code, active per row and a row mask give the
  same on the sparse step's pairs (padding included: BatchTopK rows hold fewer than k) as on the
  dense codes, so the step keeps the same counters without building [B, n]."""
  b, n, k = 24, 96, 5
  acts = jax.nn.relu(jax.random.normal(jax.random.key(4), (b, n)) - 0.5)
  acts = acts.at[2].set(0.0)  # a row with nothing positive: pairs of value 0
  pairs = (sparse.select_batch if batch else sparse.select_rows)(acts, k)
  dense = (batch_topk.train_codes(acts, k) if batch else topk.topk_codes(acts, k))
  valid = jnp.arange(b) % 4 != 3
  for p, c in ((pairs, dense), (codes.mask_rows(pairs, valid), codes.mask_rows(dense, valid))):
    np.testing.assert_array_equal(np.asarray(codes.dense(p, b, n)), np.asarray(c))
    np.testing.assert_array_equal(np.asarray(codes.fire_counts(p, n)),
                                  np.asarray(codes.fire_counts(c, n)))
    np.testing.assert_array_equal(np.asarray(codes.fired(p, n)), np.asarray(jnp.any(c > 0, 0)))
    np.testing.assert_array_equal(np.asarray(codes.active_per_row(p, b)),
                                  np.sum(np.asarray(c) > 0, -1))
    assert float(codes.min_positive(p)) == float(np.min(np.asarray(c)[np.asarray(c) > 0]))
  assert float(codes.min_positive(jnp.zeros((3, 4)))) == np.inf


@pytest.mark.parametrize('arch,joint', [('topk', False), ('batch_topk', False),
                                        ('batch_topk', True)])
def test_sparse_train_step_keeps_the_dense_steps_state(arch, joint):
  """Three jitted train steps (AuxK engaged from step 2, threshold EMA on): the k-sparse step's
  params, Adam moments, dead-latent counters, firing rates and threshold match the dense step's
  (the counters exactly). joint: the CSAE joint step (level 2 on level 1's live rows from step 1,
  its gradient reaching W_dec), level 1 on the sparse step."""
  from csae_jax import config as config_lib, sharding  # pylint: disable=g-import-not-at-top
  from csae_jax.train import optim, state as state_lib, step as step_lib
  d, n, b, k = 16, 128, 32, 3
  mesh = sharding.make_mesh(config_lib.MeshConfig())
  opt = optim.make_optimizer(1e-2, 100, 0, 0.8, 1.0)
  x = jax.random.normal(jax.random.key(5), (3, b, d))
  states = []
  for sp in (False, True):
    h = objective.SAEHyper(arch=arch, k=k, k_aux=2 * k, auxk_weight=1 / 32, dead_tokens=b,
                           k_anneal_steps=0, d=d, sparse_decode=sp)
    params = {'level1': common.init_params(jax.random.key(6), d, n)}
    levels = {'level1': step_lib.LevelSpec(h, 0.9, 0)}
    jspec = None
    if joint:
      params['level2'] = common.init_params(jax.random.key(7), d, 12)
      levels['level2'] = step_lib.LevelSpec(objective.SAEHyper(
          arch='topk', k=1, k_aux=4, auxk_weight=1 / 32, dead_tokens=n, k_anneal_steps=0, d=d),
          0.9, 0)
      jspec = step_lib.JointSpec(0.5, 1, 'none')
    st = state_lib.create(mesh, params, opt)
    fn, _ = step_lib.make_step(levels, opt, jspec)
    jstep = jax.jit(fn)
    for i in range(3):
      st, _ = jstep(st, x[i])
    states.append(st)
  dense, sp = states
  assert int(jnp.sum(dense.since_fired['level1'] >= b)) > 0  # AuxK had dead latents to train
  for name in dense.since_fired:
    np.testing.assert_array_equal(np.asarray(sp.since_fired[name]),
                                  np.asarray(dense.since_fired[name]))
  # Level 2 (joint) trains on level 1's rows, which differ in their last bits between the two
  # steps: its top-1 choice for a near-tied row may flip (measured: one row, moving two b_enc
  # entries by 4e-6), so its leaves get a looser tolerance. Level 1, whose W_dec also takes level
  # 2's gradient, is held to the tight one.
  for a, c in ((sp.fire_rate, dense.fire_rate), (sp.threshold, dense.threshold),
               (sp.params, dense.params), (sp.opt_state, dense.opt_state)):
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(c)):
      tol = (dict(rtol=2e-3, atol=2e-5) if 'level2' in jax.tree_util.keystr(path)
             else dict(rtol=2e-4, atol=2e-6))
      np.testing.assert_allclose(np.asarray(u), np.asarray(v), err_msg=jax.tree_util.keystr(path),
                                 **tol)
