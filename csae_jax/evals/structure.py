"""Structure of a concept hierarchy, label-free: collapse detection and coverage.

Joint training can pull many level-1 atoms onto a few level-2 directions (they become
near-duplicates of each other and pile into one concept). Both symptoms are measured here.
"""

from __future__ import annotations

import numpy as np

NEAR_DUPLICATE_COS = 0.95
# Flagged as collapsed when one concept holds more than this share of all assigned features,
# or more than this share of sibling pairs are near-duplicates.
COLLAPSE_LARGEST_SHARE = 0.25
COLLAPSE_DUPLICATE_SHARE = 0.2


def stats(hierarchy: dict, w_dec1_nd: np.ndarray, n2: int) -> dict:
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
  if 1 < len(alive) <= 8192:  # level-1 near-duplicates, whatever their concept (O(n^2))
    a = unit[np.asarray(alive)]
    cos = a @ a.T
    iu = np.triu_indices(len(alive), 1)
    out['level1/near_duplicate_pairs'] = int(np.sum(cos[iu] > NEAR_DUPLICATE_COS))
  return out
