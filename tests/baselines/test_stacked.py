"""Stacked SAE: parents from a hand-made level-2 decoder; the code source's shape, sparsity,
scale and purity; a tiny level-2 SAE trained on it with the shared loop reduces its loss."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from csae_jax import checkpoint as ckpt_lib
from csae_jax import config as config_lib
from csae_jax import sharding, stages
from csae_jax.baselines import stacked
from csae_jax.evals import recon
from csae_jax.saes import common
from csae_jax.sources import synthetic
from csae_jax.train import loop, optim

D, K1, B = 16, 2, 32
SYN = config_lib.SyntheticConfig(d=D, n_parents=4, n_children=3, p_parent=0.4)


def test_parents_from_hand_made_decoder_columns():
  w_mn = np.array([[0.1, -0.5, 0.3, 0.2, 0.0],
                   [0.9, -0.1, 0.3, -0.1, 0.0],
                   [0.2, 0.0, -1.0, 0.7, -2.0]])
  parent, strength = stacked.parents_from_decoder_columns(w_mn)
  # col 0 -> row 1; col 1 all <= 0 -> -1; col 2 tie 0.3 / 0.3 -> lowest row; col 3 -> row 2;
  # col 4 all <= 0 (zeros count as non-positive) -> -1
  np.testing.assert_array_equal(parent, [1, -1, 0, 2, -1])
  np.testing.assert_allclose(strength, [0.9, 0.0, 0.3, 0.7, 0.0])
  with pytest.raises(ValueError, match=r'\[m, n1\].*\(0, 5\)'):
    stacked.parents_from_decoder_columns(np.zeros((0, 5)))


def _source(seed=0):
  return synthetic.SyntheticSource(SYN, batch_size=B, seed=seed)


def _level1(source):
  """A TopK level 1 whose decoder rows are the true child directions (12 latents)."""
  return common.init_params(jax.random.key(0), D, 12, rows_nd=source.truth.children_cd)


def test_code_source_shape_sparsity_scale_and_purity():
  src = _source()
  p1 = _level1(src)
  codes = stacked.CodeSource(src, p1, 0.0, 'topk', K1)
  assert codes.d == 12
  c3 = codes.batch(3)
  assert c3.shape == (B, 12) and c3.dtype == np.float32
  nnz_b = np.sum(c3 > 0, axis=1)
  assert np.all(c3 >= 0) and np.all(nnz_b <= K1) and np.any(nnz_b == K1)
  # a pure function of the step: a fresh source gives the same batch, another step differs
  np.testing.assert_array_equal(stacked.CodeSource(_source(), p1, 0.0, 'topk', K1).batch(3), c3)
  assert not np.array_equal(codes.batch(4), c3)
  np.testing.assert_array_equal(codes.global_batch(3), c3)  # one process: local = global
  # codes = the level-1 inference codes of the parent's batch, times one scalar
  want = np.asarray(recon.encode(p1, src.batch(3), 0.0, arch='topk', k=K1)) * codes.scale
  np.testing.assert_allclose(c3, want, rtol=1e-6)
  # unit mean squared norm over the rows the scale was estimated on (the first 16 batches)
  sample = np.concatenate([codes.batch(s) for s in range(stacked._SCALE_BATCHES)])
  assert np.mean(np.sum(sample.astype(np.float64) ** 2, 1)) == pytest.approx(1.0, rel=1e-5)
  shapes = [e.shape for e in codes.eval_batches(70, B)]
  assert shapes == [(B, 12), (B, 12), (6, 12)]
  m = json.loads(json.dumps(codes.manifest()))  # JSON-serialisable, as stage manifests need
  assert m['parent'] == json.loads(json.dumps(src.manifest())) and m['d'] == 12


def test_code_source_fingerprint_follows_parent_data_and_level1():
  src = _source()
  p1 = _level1(src)
  fp = stacked.CodeSource(src, p1, 0.5, 'batch_topk', K1).fingerprint
  assert stacked.CodeSource(_source(), _level1(src), 0.5, 'batch_topk', K1).fingerprint == fp
  p1b = {**p1, 'b_enc': p1['b_enc'].at[0].set(1e-3)}
  other_data = synthetic.SyntheticSource(dataclasses.replace(SYN, noise_std=0.05), batch_size=B,
                                         seed=0)
  others = [stacked.CodeSource(src, p1b, 0.5, 'batch_topk', K1),
            stacked.CodeSource(src, p1, 0.25, 'batch_topk', K1),
            stacked.CodeSource(src, p1, 0.5, 'topk', K1),
            stacked.CodeSource(other_data, p1, 0.5, 'batch_topk', K1, scale=1.0)]
  assert len({fp, *(o.fingerprint for o in others)}) == 5


def test_code_source_value_errors():
  src = _source()
  wrong_d = common.init_params(jax.random.key(0), D + 1, 12)
  with pytest.raises(ValueError, match=r'w_enc \[16, n1\].*\(17, 12\)'):
    stacked.CodeSource(src, wrong_d, 0.0, 'topk', K1)
  with pytest.raises(ValueError, match='all-zero codes'):
    stacked.CodeSource(src, _level1(src), 1e9, 'batch_topk', K1)


def test_tiny_stacked_level2_trains_on_codes_and_reduces_its_loss(tmp_path):
  src = _source()
  codes = stacked.CodeSource(src, _level1(src), 0.0, 'topk', K1)
  steps, n2 = 48, 4
  sae = config_lib.resolve_sae(config_lib.SAEConfig(arch='topk', n_latents=n2, k=1),
                               d=codes.d, n_latents=n2, k=1, steps=steps, batch_size=B,
                               key='level1')
  spec = stages.level_spec(sae, codes.d, steps)
  mesh = sharding.make_mesh(config_lib.MeshConfig())
  stage = ckpt_lib.Stage(str(tmp_path), 'stacked', keep=1, overwrite=False, manifest={
      'config_hash': 'test', 'data_fingerprint': codes.fingerprint, 'data': codes.manifest()})
  # host copy: the train state's jitted step donates (deletes) the buffers it was built from
  init = jax.device_get(stages.init_sae(jax.random.key(1), sae, codes.global_batch(0)))
  res = loop.fit(stage=stage, mesh=mesh, levels={'level2': spec},
                 init_params=lambda: {'level2': init},
                 optimizer=optim.make_optimizer(1e-2, steps, 4, 0.8, 1.0), source=codes,
                 steps=steps, log_every=8, checkpoint_every=steps)
  stage.close()
  assert res.n_traces == 1 and int(res.state.step) == steps
  losses = [h['loss'] for h in res.history]
  assert losses[-1] < losses[0]

  def fvu(p):
    return recon.evaluate(p, codes.eval_batches(256, 128), 0.0, arch='topk', k=1)['fvu']
  assert fvu(res.state.params['level2']) < fvu(init)
