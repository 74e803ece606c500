"""Structure of a concept hierarchy, label-free: collapse, coverage, and the signals a user of
real data (no ground truth) reads before trusting the concepts.

Joint training can pull many level-1 atoms onto a few level-2 directions (they become
near-duplicates of each other and pile into one concept). Both symptoms are measured here.
The signals (printed in the run's summary and in metrics.json):
  level1/near_duplicate_pairs, _frac   level-1 features with a near-copy (cos > 0.95): a split
                                       or duplicated feature; its copies land in one concept
  level2/near_duplicate_concepts       pairs of concepts whose directions are near-copies: one
                                       concept cut in two
  level2/concept_share_max/_p90/_p50   the fraction of the assigned level-1 features each
                                       concept takes (one concept taking a large share: collapse)
  level2/effective_concepts            exp(entropy of those shares): how many concepts the
                                       features are really spread over
(seed stability, the fifth signal, needs a second run: evals/stability.py, `stability=True`).
"""

from __future__ import annotations

import numpy as np

NEAR_DUPLICATE_COS = 0.95
# Flagged as collapsed when one concept holds more than this share of all assigned features,
# or more than this share of sibling pairs are near-duplicates.
COLLAPSE_LARGEST_SHARE = 0.25
COLLAPSE_DUPLICATE_SHARE = 0.2


# Rows per block of the near-duplicate search (memory: block x n cosines).
_BLOCK = 2048


def near_duplicates(w_nd: np.ndarray, cos: float = NEAR_DUPLICATE_COS) -> tuple[int, np.ndarray]:
  """(number of row pairs with cosine above `cos`, [n] bool: the row has such a partner).
  Blocked, so 20k-row dictionaries need no [n, n] matrix."""
  unit = w_nd / np.maximum(np.linalg.norm(w_nd, axis=1, keepdims=True), 1e-12)
  n = len(unit)
  pairs, has_n = 0, np.zeros(n, bool)
  for lo in range(0, n, _BLOCK):
    c_bn = unit[lo:lo + _BLOCK] @ unit.T
    c_bn[np.arange(len(c_bn)), np.arange(lo, lo + len(c_bn))] = -np.inf  # not itself
    hit_bn = c_bn > cos
    has_n[lo:lo + len(c_bn)] = hit_bn.any(1)
    pairs += int(hit_bn.sum())  # ordered pairs: each pair is counted from both rows
  return pairs // 2, has_n


def concept_shares(hierarchy: dict) -> dict:
  """How the assigned level-1 features are spread over the concepts."""
  sizes = np.array([len(c['members']) for c in hierarchy['concepts']], np.float64)
  if not len(sizes) or sizes.sum() == 0:
    return {'level2/concept_share_max': 0.0, 'level2/concept_share_p90': 0.0,
            'level2/concept_share_p50': 0.0, 'level2/effective_concepts': 0.0}
  share = sizes / sizes.sum()
  return {'level2/concept_share_max': float(share.max()),
          'level2/concept_share_p90': float(np.quantile(share, 0.9)),
          'level2/concept_share_p50': float(np.median(share)),
          'level2/effective_concepts': float(np.exp(-np.sum(share * np.log(share))))}


def stats(hierarchy: dict, w_dec1_nd: np.ndarray, n2: int,
          w_dec2_md: np.ndarray | None = None) -> dict:
  """w_dec2_md: the concept directions (level-2 decoder rows; a concept's id is its row)."""
  unit = w_dec1_nd / np.maximum(np.linalg.norm(w_dec1_nd, axis=1, keepdims=True), 1e-12)
  sizes = np.array([len(c['members']) for c in hierarchy['concepts']] or [0])
  assigned = int(sizes.sum())
  pairs = dup = 0
  intra = []
  for c in hierarchy['concepts']:
    m = np.asarray(c['members'])
    if len(m) < 2:
      continue
    cos = unit[m] @ unit[m].T
    iu = np.triu_indices(len(m), 1)
    pairs += len(iu[0])
    dup += int(np.sum(cos[iu] > NEAR_DUPLICATE_COS))
    intra.append(float(np.mean(cos[iu])))
  alive = hierarchy['alive']
  out = {
      'level2/concepts_used': int(np.sum(sizes > 0)),
      'level2/concepts_ge2': int(np.sum(sizes >= 2)),
      'level2/concepts_used_frac': float(np.sum(sizes > 0) / max(n2, 1)),
      'level2/largest_concept_share': float(sizes.max() / max(assigned, 1)),
      'level2/coverage': float(assigned / max(len(alive), 1)),
      'level2/near_duplicate_sibling_frac': float(dup / max(pairs, 1)),
      'level2/intra_concept_cos': float(np.mean(intra)) if intra else 0.0,
  }
  out['level2/collapsed'] = bool(
      out['level2/largest_concept_share'] > COLLAPSE_LARGEST_SHARE
      or out['level2/near_duplicate_sibling_frac'] > COLLAPSE_DUPLICATE_SHARE)
  out.update(concept_shares(hierarchy))
  if len(alive) > 1:  # level-1 near-duplicates, whatever their concept
    pairs, has = near_duplicates(unit[np.asarray(alive)])
    out['level1/near_duplicate_pairs'] = pairs
    out['level1/near_duplicate_frac'] = float(has.mean())
  used = [c['id'] for c in hierarchy['concepts']]
  if w_dec2_md is not None and len(used) > 1:
    out['level2/near_duplicate_concepts'] = near_duplicates(np.asarray(w_dec2_md)[used])[0]
  return out
