"""Latent sharding: batch over 'data', dictionary entries over 'model'.

On 8 fake devices, the train step of TopK and BatchTopK (AuxK on, and engaged: latents go dead
after one step) on meshes 1x8, 2x4, 4x2, 8x1 reproduces the 1-device step; params, Adam moments
and counters hold 1/model of the latent axis per device; and the compiled step gathers no
[batch, n_latents] (or any n_latents-sized) array: the k-th largest search only all-reduces counts.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csae_jax import config as config_lib
from csae_jax import sharding, stages
from csae_jax.train import footprint, optim
from csae_jax.train import state as state_lib
from csae_jax.train import step as step_lib

D, N, B, K, STEPS = 16, 256, 32, 2, 3
LR = 1e-2
MESHES = ((1, 8), (2, 4), (4, 2), (8, 1))


def _spec(arch, sparse_decode=False):
  sae = config_lib.resolve_sae(config_lib.SAEConfig(arch=arch, n_latents=N, k=K), d=D,
                               n_latents=N, k=K, steps=40, batch_size=B, key='level1')
  spec = stages.level_spec(sae, D, 40, sparse_decode=sparse_decode)
  # dead after one batch without firing: AuxK runs from step 2 on, in every mesh alike
  return spec._replace(hyper=spec.hyper._replace(k_anneal_steps=0, dead_tokens=B),
                       threshold_start=0)


def _batches():
  rng = np.random.default_rng(0)
  atoms = rng.standard_normal((2 * N, D)).astype(np.float32)
  return [((rng.random((B, 2 * N)) * (rng.random((B, 2 * N)) < 0.05)) @ atoms).astype(np.float32)
          for _ in range(STEPS)]


def _setup(mesh, arch, sparse_decode=False):
  opt = optim.make_optimizer(LR, 40, 1, 0.8, 1.0)
  sae = dataclasses.replace(config_lib.SAEConfig(n_latents=N), decoder_init='random')
  st = state_lib.create(mesh, {'level1': stages.init_sae(jax.random.key(0), sae, _batches()[0])},
                        opt)
  fn, _ = step_lib.make_step({'level1': _spec(arch, sparse_decode)}, opt)
  batch_sharding = sharding.named(mesh, 'batch', 'embed')
  return st, step_lib.jit_step(fn, state_lib.shardings_of(st), batch_sharding), batch_sharding


def _train(mesh, arch):
  st, jstep, batch_sharding = _setup(mesh, arch)
  for x in _batches():
    st, metrics = jstep(st, jax.device_put(x, batch_sharding))
  jax.block_until_ready(metrics)
  return st, metrics


@functools.lru_cache(maxsize=None)
def _reference(arch):
  st, m = _train(sharding.make_mesh(config_lib.MeshConfig(), devices=jax.devices()[:1]), arch)
  return jax.device_get(st), jax.device_get(m)


@pytest.mark.parametrize('arch', ['topk', 'batch_topk'])
@pytest.mark.parametrize('data,model', MESHES)
def test_sharded_steps_equal_the_single_device_steps(n_devices, arch, data, model):
  if n_devices != 8:
    pytest.fail(f'conftest should provide 8 fake devices, got {n_devices}')
  ref, ref_m = _reference(arch)
  st, m = _train(sharding.make_mesh(config_lib.MeshConfig(data=data, model=model)), arch)
  assert float(ref_m['level1/aux']) > 0  # AuxK really ran (dead latents after step 1)
  # Not bit-exact: the sharded reductions (batch sums over 'data', decode partial sums over
  # 'model') add in another order. The selections agree (same l0, same firing counters).
  np.testing.assert_array_equal(np.asarray(st.since_fired['level1']),
                                ref.since_fired['level1'])
  assert int(st.step) == STEPS
  # Params get atol = 2% of one Adam step (LR): Adam's update m / (sqrt(v) + eps) turns a
  # gradient entry at float-noise level (a sum that cancels to ~1e-10, summed in another order
  # on each mesh) into a step of a fraction of lr. Measured on 1x8 BatchTopK: 1.1e-4 on w_enc
  # (1.1% of a step) at the step where AuxK first engages, with no selection margin below 3e-4
  # relative; the Adam moments themselves agree to 1e-6.
  for name, a, b, atol in [('params', st.params, ref.params, 2e-2 * LR),
                           ('opt_state', st.opt_state, ref.opt_state, 1e-6),
                           ('fire_rate', st.fire_rate, ref.fire_rate, 1e-6),
                           ('threshold', st.threshold, ref.threshold, 1e-6)]:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_allclose(np.asarray(x), y, rtol=1e-4, atol=atol, err_msg=name)
  np.testing.assert_allclose(float(m['loss']), float(ref_m['loss']), rtol=1e-5)

  # every per-latent leaf is split over 'model': each device holds N / model entries of it
  lat = {'w_enc': 1, 'b_enc': 0, 'w_dec': 0}
  mu, nu = st.opt_state[1][0].mu['level1'], st.opt_state[1][0].nu['level1']
  for tree in (st.params['level1'], mu, nu):
    for name, axis in lat.items():
      leaf = tree[name]
      assert leaf.sharding.spec[axis] == 'model', (name, leaf.sharding.spec)
      assert {s.data.shape[axis] for s in leaf.addressable_shards} == {N // model}
  for leaf in (st.since_fired['level1'], st.fire_rate['level1']):
    assert leaf.sharding.spec[0] == 'model'
    assert {s.data.shape[0] for s in leaf.addressable_shards} == {N // model}


def _gathers_of_latents(arch, sparse_decode):
  """Collectives of the compiled 2x4 step that move an array with >= N elements other than by
  all-reduce (gradient sums of the 1/4-sized shards are all-reduces, and allowed)."""
  st, jstep, batch_sharding = _setup(sharding.make_mesh(config_lib.MeshConfig(data=2, model=4)),
                                     arch, sparse_decode)
  x = jax.ShapeDtypeStruct((B, D), jnp.float32, sharding=batch_sharding)
  hlo = jstep.lower(state_lib.abstract(st), x).compile().as_text()
  colls = footprint.collectives(hlo)
  assert any(c.op == 'all-reduce' for c in colls)  # the parser reads this HLO
  big_reduce = [c for c in colls if c.op == 'all-reduce' and c.max_elements >= N * D]
  return [c for c in colls if c.op != 'all-reduce' and c.max_elements >= N], big_reduce


@pytest.mark.parametrize('arch', ['topk', 'batch_topk'])
def test_step_gathers_no_latent_sized_array(arch):
  gathers, big_reduce = _gathers_of_latents(arch, sparse_decode=False)
  assert gathers == []
  assert big_reduce == []  # no all-reduce of a whole [n, d] dictionary gradient either


def test_the_check_catches_a_gathering_step():
  """The k-sparse custom-VJP step (train.sparse_decode) runs `lax.top_k` on the latent axis,
  which XLA's partitioner gathers: the check above must see it (and setup refuses it)."""
  gathers, _ = _gathers_of_latents('topk', sparse_decode=True)
  assert any(c.op == 'all-gather' and (B // 2, N) in c.shapes for c in gathers), gathers


def test_config_refuses_sparse_decode_on_a_latent_sharded_mesh():
  cfg = config_lib.Config()
  ok = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, sparse_decode=True))
  config_lib.validate(ok)  # model = 1: allowed
  bad = dataclasses.replace(ok, mesh=config_lib.MeshConfig(model=2))
  with pytest.raises(ValueError, match='sparse_decode.*mesh.model = 2'):
    config_lib.validate(bad)


def _stacked_run(mesh):
  """Staged level 2's step: two restarts stacked and vmapped, rows replicated."""
  opt = optim.make_optimizer(LR, 40, 1, 0.8, 1.0)
  sae = dataclasses.replace(config_lib.SAEConfig(n_latents=N), decoder_init='random')
  rows = _batches()[0]
  params = {'level2': stages.stack([stages.init_sae(jax.random.key(i), sae, rows)
                                    for i in range(2)])}
  st = state_lib.create_stacked(mesh, params, opt)
  spec = _spec('topk')
  fn, _ = step_lib.make_step({'level2': spec}, opt)
  rows_sharding = sharding.named(mesh, None, 'embed')
  jstep = step_lib.jit_step(jax.vmap(fn, in_axes=(0, None)), state_lib.shardings_of(st),
                            rows_sharding)
  for x in _batches():
    st, m = jstep(st, jax.device_put(x, rows_sharding))
  jax.block_until_ready(m)
  return st, params, opt


def test_stacked_level2_shards_its_latents_and_matches_one_device():
  st1, _, _ = _stacked_run(sharding.make_mesh(config_lib.MeshConfig(), devices=jax.devices()[:1]))
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=2, model=4))
  st, params, opt = _stacked_run(mesh)
  w = st.params['level2']['w_dec']  # [R, n, d]
  assert w.sharding.spec[1] == 'model'
  assert {s.data.shape[1] for s in w.addressable_shards} == {N // 4}
  assert st.since_fired['level2'].sharding.spec[1] == 'model'
  np.testing.assert_array_equal(np.asarray(st.since_fired['level2']),
                                np.asarray(st1.since_fired['level2']))
  for x, y in zip(jax.tree.leaves(st.params), jax.tree.leaves(st1.params), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=2e-2 * LR)
  # the abstract state (what a 1M-latent step compiles against) has exactly these shardings
  abstract = state_lib.abstract_state(mesh, params, opt, stacked=True)
  for a, b in zip(jax.tree.leaves(abstract), jax.tree.leaves(st), strict=True):
    assert a.shape == b.shape and a.sharding.is_equivalent_to(b.sharding, len(b.shape))


def test_abstract_state_has_the_shardings_of_create():
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=2, model=4))
  st, _, _ = _setup(mesh, 'topk')
  opt = optim.make_optimizer(LR, 40, 1, 0.8, 1.0)
  abstract = state_lib.abstract_state(mesh, st.params, opt)
  assert jax.tree.structure(abstract) == jax.tree.structure(st)
  for a, b in zip(jax.tree.leaves(abstract), jax.tree.leaves(st), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert a.sharding.is_equivalent_to(b.sharding, len(b.shape))


def test_the_level1_stage_builds_a_latent_sharded_state_in_place(tmp_path, monkeypatch):
  """With mesh.model > 1 the level-1 stage builds its state shard by shard (`create_sharded`:
  no whole [n, d] matrix on any device) and gets the eager init's values (to the last bit of
  the row normalisation); with mesh.model = 1 it keeps the eager `create`."""
  from csae_jax.cascade import level1
  from experiments.configs import csae
  made = []
  real_sharded, real_create = state_lib.create_sharded, state_lib.create

  def sharded(mesh, init_params, optimizer):
    st = real_sharded(mesh, init_params, optimizer)
    eager = real_create(mesh, init_params(), optimizer)  # the reference values, same mesh
    for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(eager), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-7)
      assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
    shapes = {k: ({sh.data.shape for sh in v.addressable_shards}, v.shape)
              for k, v in st.params['level1'].items()}
    made.append(('sharded', shapes))  # now: the train step donates (deletes) these arrays
    return st

  def create(mesh, params, optimizer):
    made.append(('eager', None))
    return real_create(mesh, params, optimizer)
  monkeypatch.setattr(state_lib, 'create_sharded', sharded)
  monkeypatch.setattr(state_lib, 'create', create)
  for model in (4, 1):
    c = csae.get_config('small')
    c.update_from_flattened_dict({'mesh.model': model, 'train.steps': 4, 'train.batch_size': 64,
                                  'level1.n_latents': 64, 'data.eval_rows': 256})
    cfg, source, mesh = stages.setup(c, str(tmp_path / f'm{model}'))
    level1.train(cfg, source, mesh, str(tmp_path / f'm{model}'))
  assert [m for m, _ in made] == ['sharded', 'eager']
  for name in ('w_dec', 'w_enc', 'b_enc'):
    shard_shapes, shape = made[0][1][name]
    n_axis = 0 if name != 'w_enc' else 1
    assert shard_shapes == {tuple(64 // 4 if i == n_axis else s
                                  for i, s in enumerate(shape))}, (name, shard_shapes)
