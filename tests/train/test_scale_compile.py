"""At size, abstractly: a 1,048,576-latent, d = 2048 level 1 and its 524,288-latent level 2
compile for 8 devices with each device holding 1/8 of params and optimiser state. Nothing is
built: params come from `jax.eval_shape` of the init (8 GiB per matrix would not fit here)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csae_jax import config as config_lib
from csae_jax import sharding, stages
from csae_jax.train import footprint, optim
from csae_jax.train import state as state_lib

N1, D, B = 1 << 20, 2048, 1024
N2, ROWS = N1 // 2, 4096  # level 2: half the level-1 rows as latents; a 4096-row batch


def _sae(arch, n, k, batch):
  return config_lib.resolve_sae(config_lib.SAEConfig(arch=arch, n_latents=n, k=k), d=D,
                                n_latents=n, k=k, steps=1000, batch_size=batch, key='level1')


def _check(cs, n, batch_bytes):
  st = cs.state
  lead = st.params[next(iter(st.params))]['w_dec'].ndim - 2  # 1 for a stacked state
  # every per-latent leaf of params, Adam moments and counters holds n / 8 latents per device
  per_latent = [x for x in jax.tree.leaves((st.params, st.opt_state, st.since_fired,
                                            st.fire_rate)) if n in x.shape]
  assert len(per_latent) == 3 * 3 + 2  # (w_enc, b_enc, w_dec) x (param, mu, nu) + 2 counters
  for x in per_latent:
    axis = x.shape.index(n)
    assert x.sharding.spec[axis] == 'model'
    assert x.sharding.shard_shape(x.shape)[axis] == n // 8
  per_device = footprint.state_bytes(st)
  assert per_device < footprint.global_bytes(st) / 8 * 1.001  # only b_dec and scalars repeat
  mem = footprint.compiled_bytes(cs.compiled)
  # XLA's accounting agrees with the shapes: arguments = the state shards + the batch, and the
  # donated state is reused for the output (no second copy of the dictionary)
  assert mem['argument'] == per_device + batch_bytes
  assert mem['alias'] == per_device
  # the compiled step keeps the shardings it was given
  out_state = cs.compiled.output_shardings[0]
  level = next(iter(st.params))
  assert out_state.params[level]['w_dec'].spec[lead] == 'model'
  assert out_state.opt_state[1][0].mu[level]['w_enc'].spec[lead + 1] == 'model'
  assert out_state.params[level]['w_dec'].is_equivalent_to(
      st.params[level]['w_dec'].sharding, 2 + lead)
  # no gather of anything latent-sized, and no collective over the whole latent axis (the
  # all-reduces are per-shard counts and the [batch, d] partial decodes)
  colls = footprint.collectives(cs.compiled.as_text())
  assert all(c.max_elements < n // 8 for c in colls if c.op != 'all-reduce')
  assert not [c for c in colls if any(n in shape for shape in c.shapes)]
  return per_device, mem


def test_million_latent_level1_compiles_sharded_over_8_devices(n_devices):
  if n_devices != 8:
    pytest.fail(f'conftest should provide 8 fake devices, got {n_devices}')
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=1, model=8))
  sae = _sae('topk', N1, 32, B)
  opt = optim.make_optimizer(1e-3, 1000, 10, 0.8, 1.0)
  cs = footprint.compile_step(
      mesh, {'level1': stages.level_spec(sae, D, 1000)},
      lambda: {'level1': stages.init_sae(jax.random.key(0), sae, jnp.zeros((B, D)))}, opt, (B, D))
  per_device, _ = _check(cs, N1, B * D * 4)  # the batch: replicated over 'model'
  # params (w_enc, w_dec) + Adam (mu, nu): 6 float32 [n, d] matrices split 8 ways = 6 GiB; the
  # README's bytes-per-device table uses the analytic figure, checked here to the scalars' bytes
  assert 0 <= per_device - footprint.analytic_state_bytes(N1, D, 8) <= 64
  assert per_device == pytest.approx(6 * N1 * D * 4 / 8, rel=1e-3)


def test_half_million_latent_level2_compiles_sharded_over_8_devices():
  """Staged level 2 as `cascade/staged.py` runs it: a stacked (restarts = 1) vmapped step on a
  replicated batch of level-1 decoder rows, its latent axis split over 'model'."""
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=1, model=8))
  sae = _sae('topk', N2, 1, ROWS)
  opt = optim.make_optimizer(1e-3, 1000, 10, 0.8, 1.0)
  spec = stages.level_spec(sae, D, 1000)
  init = lambda: {'level2': stages.stack([stages.init_sae(jax.random.key(0), sae,
                                                          jnp.zeros((ROWS, D)))])}
  shapes = jax.eval_shape(init)
  st = state_lib.abstract_state(mesh, shapes, opt, stacked=True)
  from csae_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  fn, _ = step_lib.make_step({'level2': spec}, opt)
  rows_sharding = sharding.named(mesh, None, 'embed')
  jstep = step_lib.jit_step(jax.vmap(fn, in_axes=(0, None)), state_lib.shardings_of(st),
                            rows_sharding)
  compiled = jstep.lower(st, jax.ShapeDtypeStruct((ROWS, D), jnp.float32,
                                                  sharding=rows_sharding)).compile()
  per_device, _ = _check(footprint.CompiledStep(compiled, st, 0.0, 0.0), N2, ROWS * D * 4)
  assert per_device == pytest.approx(6 * N2 * D * 4 / 8, rel=1e-3)
