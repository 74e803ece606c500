"""Seed stability of a hierarchy: does a second seed find the same concepts? (real data has no
ground truth; a grouping that moves with the seed is not a finding.)

The two runs' level-1 features are matched one-to-one as mutual nearest neighbours by the cosine
of their decoder rows (blocked: no [n, m] matrix at 20k features, unlike a Hungarian matching);
pairs closer than `match_cos` are the features both runs found. Over those
pairs the two runs' concept labels are compared with the adjusted Rand index (1: the same
grouping, 0: unrelated groupings, whatever the concept ids).
"""

from __future__ import annotations

import numpy as np
import sklearn.metrics
from jaxtyping import Float

# Two level-1 features are "the same feature" across seeds above this decoder cosine.
MATCH_COS = 0.9


def _unit(w_nd: np.ndarray) -> np.ndarray:
  w_nd = np.asarray(w_nd, np.float64)
  return w_nd / np.maximum(np.linalg.norm(w_nd, axis=1, keepdims=True), 1e-12)


def _labels(hierarchy: dict, n1: int) -> np.ndarray:
  out = np.full(n1, -1, np.int64)
  for c in hierarchy['concepts']:
    out[c['members']] = c['id']
  return out


def _nearest(u_nd: np.ndarray, v_md: np.ndarray, block: int = 2048
             ) -> tuple[np.ndarray, np.ndarray]:
  """For each row of u: the index of its most similar row of v and that cosine."""
  idx, cos = [], []
  for lo in range(0, len(u_nd), block):
    c_bm = u_nd[lo:lo + block] @ v_md.T
    idx.append(np.argmax(c_bm, axis=1))
    cos.append(np.max(c_bm, axis=1))
  return np.concatenate(idx), np.concatenate(cos)


def hierarchy_stability(w_a_nd: Float[np.ndarray, 'n d'], hier_a: dict,
                        w_b_md: Float[np.ndarray, 'm d'], hier_b: dict,
                        match_cos: float = MATCH_COS) -> dict:
  """stability/feature_match: fraction of run a's assigned features that run b also found;
  stability/concept_ari: ARI of the two runs' concepts over those features (nan if < 2)."""
  lab_a, lab_b = _labels(hier_a, len(w_a_nd)), _labels(hier_b, len(w_b_md))
  ids_a, ids_b = np.nonzero(lab_a >= 0)[0], np.nonzero(lab_b >= 0)[0]
  if len(ids_a) == 0 or len(ids_b) == 0:
    return {'stability/feature_match': 0.0, 'stability/concept_ari': float('nan'),
            'stability/matched_features': 0}
  best_b, cos_a = _nearest(_unit(w_a_nd)[ids_a], _unit(w_b_md)[ids_b])
  best_a, _ = _nearest(_unit(w_b_md)[ids_b], _unit(w_a_nd)[ids_a])
  keep = (best_a[best_b] == np.arange(len(ids_a))) & (cos_a > match_cos)
  ra, rb = ids_a[keep], ids_b[best_b[keep]]
  ari = (float(sklearn.metrics.adjusted_rand_score(lab_a[ra], lab_b[rb]))
         if len(ra) >= 2 else float('nan'))
  return {'stability/feature_match': float(keep.sum() / len(ids_a)),
          'stability/concept_ari': ari, 'stability/matched_features': int(keep.sum())}
