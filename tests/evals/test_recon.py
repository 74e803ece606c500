"""Reconstruction statistics of one SAE: FVU, cosine, L0, dead / dense fractions, densities."""

import jax.numpy as jnp
import numpy as np
import pytest

from csae_jax.evals import recon


def test_densities_dead_and_dense_fractions_on_a_known_case():
  eye = jnp.eye(4, dtype=jnp.float32)
  params = {'w_enc': eye, 'b_enc': jnp.zeros(4), 'w_dec': eye, 'b_dec': jnp.zeros(4)}
  n = 200
  x = np.zeros((n, 4), np.float32)
  x[:, 0] = 1.0                 # fires on every input
  x[: n // 2, 1] = 2.0          # on half
  x[: n // 20, 2] = 0.5         # on 5%
  batches = [x[:120], x[120:]]  # the totals must not depend on batching
  ev = recon.evaluate(params, batches, -1.0, arch='batch_topk', k=2)
  np.testing.assert_allclose(ev['density_n'], [1.0, 0.5, 0.05, 0.0])
  assert ev['dead_frac'] == 0.25 and ev['dense_frac'] == 0.5
  assert ev['fvu'] == pytest.approx(0.0, abs=1e-6) and ev['cos'] == pytest.approx(1.0)
  assert ev['l0'] == pytest.approx(1 + 0.5 + 0.05)
  # a threshold above 1 silences latent 0 (and 2): reconstruction error appears
  ev2 = recon.evaluate(params, batches, 1.5, arch='batch_topk', k=2)
  np.testing.assert_allclose(ev2['density_n'], [0.0, 0.5, 0.0, 0.0])
  assert ev2['fvu'] > 0.5
