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


def test_evaluate_bar_counts_the_rows_a_source_announces(monkeypatch):
  """The eval pass's bar gets its total from a source's eval_batches (so it has an ETA) and
  advances by every batch's rows."""
  from csae_jax.config import SyntheticConfig
  from csae_jax.sources import synthetic
  seen = []

  class Bar:
    def __init__(self, total=None, **kw):
      self.total, self.n = total, 0
      seen.append(self)

    def update(self, n):
      self.n += n

    def close(self):
      pass

  monkeypatch.setattr(recon, 'tqdm', Bar)
  src = synthetic.SyntheticSource(SyntheticConfig(), batch_size=64, seed=0)
  d = src.d
  params = {'w_enc': jnp.eye(d, dtype=jnp.float32), 'b_enc': jnp.zeros(d),
            'w_dec': jnp.eye(d, dtype=jnp.float32), 'b_dec': jnp.zeros(d)}
  ev = recon.evaluate(params, src.eval_batches(1000, 300), 0.0, arch='topk', k=4)
  assert ev['n_rows'] == 1000 and (seen[0].total, seen[0].n) == (1000, 1000)
  recon.evaluate(params, [np.ones((5, d), np.float32)] * 3, 0.0, arch='topk', k=4)
  assert (seen[1].total, seen[1].n) == (15, 15)  # a list: its rows are counted
