"""The concept hierarchy: each alive level-1 feature's parent is its strongest level-2 latent.

parent(j) = argmax_r ReLU(W_enc2^T (w_j - b_dec2) + b_enc2)_r for alive j whose max exceeds a
threshold (the paper's rule, 1e-3). The per-row score is written for one row and vmapped over the
decoder rows, so the same function serves a single feature in a report.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from csae_jax.saes import common

SCHEMA_VERSION = 1


def row_scores(params2: common.Params, w_d: jax.Array) -> jax.Array:
  """[n2] level-2 scores of one level-1 decoder row."""
  return common.pre_acts(params2, w_d[None, :])[0]


@jax.jit
def _assign(params2, rows_rd):
  scores_rn = jax.vmap(row_scores, in_axes=(None, 0))(params2, rows_rd)
  return jnp.argmax(scores_rn, -1), jnp.max(scores_rn, -1)


def assign_parents(params2: common.Params, rows_rd: np.ndarray, threshold: float
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(parent_r, strength_r): parent index per row, -1 where the max score <= threshold."""
  parent_r, strength_r = jax.device_get(_assign(params2, jnp.asarray(rows_rd)))
  parent_r = np.where(strength_r > threshold, parent_r, -1)
  return parent_r.astype(np.int64), strength_r.astype(np.float64)


def build(parent_r: np.ndarray, strength_r: np.ndarray, alive_ids_r: np.ndarray) -> dict:
  """hierarchy.json: concepts by size (largest first), members strongest first."""
  concepts = []
  for c in np.unique(parent_r[parent_r >= 0]):
    (rows,) = np.nonzero(parent_r == c)
    rows = rows[np.argsort(-strength_r[rows], kind='stable')]
    concepts.append({'id': int(c), 'members': [int(alive_ids_r[r]) for r in rows],
                     'weights': [round(float(strength_r[r]), 6) for r in rows]})
  concepts.sort(key=lambda c: (-len(c['members']), c['id']))
  return {'schema_version': SCHEMA_VERSION, 'concepts': concepts,
          'unassigned': sorted(int(alive_ids_r[r]) for r in np.nonzero(parent_r < 0)[0]),
          'alive': sorted(int(j) for j in alive_ids_r)}


def labels(hierarchy: dict, n1: int) -> np.ndarray:
  """[n1] concept id per level-1 feature; -1 for unassigned or dead features."""
  out = np.full(n1, -1, np.int64)
  for c in hierarchy['concepts']:
    out[c['members']] = c['id']
  return out
