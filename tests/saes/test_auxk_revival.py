"""AuxK revives planted dead latents on a toy problem; without it they stay dead.

Toy: 12 orthogonal atoms; latents 0-7 start on atoms 0-7, latents 8-15 start in random
directions with encoders scaled by 1e-3, so under BatchTopK (k=2, fewer than the ~2.8
represented atoms per input) they never win a slot: dead, and with no reconstruction gradient.
Atoms 8-11 are represented by nobody, so only AuxK can teach the dead latents to cover them.
"""

import jax
import jax.numpy as jnp
import numpy as np

from csae_jax import config as config_lib
from csae_jax import sharding
from csae_jax.saes import objective
from csae_jax.train import optim
from csae_jax.train import state as state_lib
from csae_jax.train import step as step_lib

D, N, B, K, N_ATOMS = 16, 16, 128, 2, 12


def _train(auxk_weight: float, steps: int = 300):
  rng = np.random.default_rng(0)
  atoms = np.linalg.qr(rng.standard_normal((D, D)))[0][:N_ATOMS].astype(np.float32)
  w_dec = np.concatenate([atoms[:8], rng.standard_normal((N - 8, D)).astype(np.float32)])
  w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
  w_enc = w_dec.T.copy()
  w_enc[:, 8:] *= 1e-3
  params = {'level1': {'w_enc': jnp.asarray(w_enc), 'b_enc': jnp.zeros(N),
                       'w_dec': jnp.asarray(w_dec), 'b_dec': jnp.zeros(D)}}
  hyper = objective.SAEHyper(arch='batch_topk', k=K, k_aux=8, auxk_weight=auxk_weight,
                             dead_tokens=2 * B, k_anneal_steps=0, d=D)
  spec = step_lib.LevelSpec(hyper, 0.99, 0)
  mesh = sharding.make_mesh(config_lib.MeshConfig(), devices=jax.devices()[:1])
  opt = optim.make_optimizer(3e-3, steps, 10, 0.9, 1.0)
  st = state_lib.create(mesh, params, opt)
  fn = jax.jit(step_lib.make_step({'level1': spec}, opt)[0])
  fires = np.zeros(N, np.int64)
  for s in range(steps):
    active = rng.random((B, N_ATOMS)) < 0.35
    x = (active * rng.uniform(0.5, 1.5, (B, N_ATOMS))) @ atoms
    st, m = fn(st, jnp.asarray(x, jnp.float32))
    if s >= steps - 50:  # training codes of the last 50 steps
      st_codes = np.asarray(st.since_fired['level1']) == 0
      fires += st_codes
  return fires, float(m['level1/fvu'])


def test_auxk_revives_planted_dead_latents():
  fires_none, fvu_none = _train(auxk_weight=0.0)
  fires_aux, fvu_aux = _train(auxk_weight=1 / 32)
  assert fires_none[8:].sum() == 0   # without AuxK the planted latents never come back
  assert (fires_aux[8:] > 0).sum() >= 3  # AuxK revives them to cover the missing atoms
  assert fvu_aux < 0.8 * fvu_none    # and the reconstruction improves clearly
