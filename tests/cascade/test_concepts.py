"""The concept step's weak-row rule: features that fire at a tiny magnitude (top-k slot fillers)
join no concept; real features, rare or strong, are kept."""

import numpy as np

from csae_jax import config as config_lib
from csae_jax.cascade import concepts


def test_weak_rows_flags_fillers_only():
  rng = np.random.default_rng(0)
  real = rng.lognormal(np.log(0.6), 0.5, size=60)   # real features: magnitudes vary 5x and more
  fillers = rng.uniform(0.02, 0.05, size=15)
  code = np.concatenate([real, fillers])
  weak = concepts.weak_rows(code, 0.2)
  assert not weak[:60].any() and weak[60:].all()
  assert not concepts.weak_rows(code, 0.0).any()


def _two_families(rng, d=64, n=6, a=0.6):
  parents = np.linalg.qr(rng.normal(size=(d, 2)))[0].T
  rows, parent = [], []
  for p in range(2):
    for _ in range(n):
      u = rng.normal(size=d)
      u -= (parents @ u) @ parents
      u /= np.linalg.norm(u)
      rows.append(a * parents[p] + np.sqrt(1 - a * a) * u)
      parent.append(p)
  return np.array(rows), np.array(parent), parents


def test_build_leaves_weak_rows_unassigned():
  rng = np.random.default_rng(1)
  rows, parent, parents = _two_families(rng)
  # fillers: halfway between a child of each parent (what they look like in the suite)
  fill = rows[[0, 1, 2]] + rows[[6, 7, 8]]
  fill /= np.linalg.norm(fill, axis=1, keepdims=True)
  rows_rd = np.concatenate([rows, fill]).astype(np.float32)
  alive = np.arange(len(rows_rd))
  w_dec = parents.astype(np.float32)
  params2 = {'w_enc': w_dec.T.copy(), 'b_enc': np.zeros(2, np.float32), 'w_dec': w_dec,
             'b_dec': np.zeros(rows_rd.shape[1], np.float32)}
  s2 = config_lib.SAEConfig(n_latents=2, k=1, isolate_q=0.0)
  code_r = np.concatenate([np.full(len(rows), 0.6), np.full(len(fill), 0.03)])
  without, _, _ = concepts.build(params2, rows_rd, alive, s2)
  assigned = {m for c in without['concepts'] for m in c['members']}
  assert assigned & {12, 13, 14}  # the fillers join (and chain) the parents' concepts
  hier, _, info = concepts.build(params2, rows_rd, alive, s2, code_r=code_r)
  assert set(hier['unassigned']) >= {12, 13, 14} and info['level2/weak_rows'] == 3
  got = {m: i for i, c in enumerate(hier['concepts']) for m in c['members']}
  assert set(got) == set(range(12))  # every child still has its concept
  labels = np.array([got[m] for m in range(12)])
  assert len(set(labels[parent == 0])) == 1 and len(set(labels[parent == 1])) == 1
  assert labels[0] != labels[6]
