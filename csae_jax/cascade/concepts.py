"""From a trained level-2 SAE to the concepts of the hierarchy.

1. assign: parent(j) = argmax of the level-2 encoder on row j (the paper's rule), -1 below
   `assign_threshold`;
   Rows with no sibling among the rows (isolate_q, merge.isolated_rows) join no concept.
2. merge (merge_ratio > 0): fragments of one concept, which surplus level-2 latents produce,
   are merged (merge.py: cross / within similarity of the members); then concepts whose
   halves the merge would keep apart are split (split, merge.split_labels);
3. refine: each row moves to the concept whose members it is most similar to, then fragments
   that refinement made similar are merged again;
4. cap: at most n_latents concepts; beyond that, concepts that show no grouping (singletons,
   members no closer than unrelated directions) are left unassigned, then the most similar
   remaining concepts are merged.
Copies of one level-1 feature (cosine > DUPLICATE_COS) are handled as one row throughout.
The result is one level-2 latent per concept: the exported level-2 SAE has a decoder row per
concept (the unit mean direction of its members, concept id = row) and the encoder its transpose,
so argmax of the exported encoder is the nearest concept direction. With none of 2-4 enabled
the trained SAE itself is exported, exactly as the paper does.
"""

from __future__ import annotations

import numpy as np

from csae_jax import config as config_lib
from csae_jax.cascade import hierarchy as hierarchy_lib
from csae_jax.cascade import merge


# Level-1 rows closer than this are copies of one feature (as evals/structure.py counts them).
DUPLICATE_COS = 0.95


def internal_latents(s2: config_lib.SAEConfig, n_rows: int) -> int:
  """How many latents the level-2 SAE trains: oversplit x n_latents, at most half the rows
  (more would leave most rows alone in a latent), never fewer than n_latents; oversplit 0:
  half the rows (robustness suite: correlated parents at n2 = K, ARI 0.74 with 2 x n2 latents,
  0.95 with half the rows; equal on the other families tried)."""
  if not s2.oversplit:
    return max(s2.n_latents, n_rows // 2)
  want = int(round(s2.oversplit * s2.n_latents))
  return max(s2.n_latents, min(want, n_rows // 2))


def weak_rows(code_r: np.ndarray, frac: float) -> np.ndarray:
  """[r] bool: features whose mean code when firing is below `frac` x the median feature's.

  Why: a top-k SAE fills the k slots left when fewer than k features are active with latents
  that fire often at a tiny magnitude (measured on the robustness suite's cooccurring family
  with the level-1 code L1: 27 such rows at a mean code of 0.035 against the children's 0.63,
  each at cosine ~0.5 to some child). They explain next to nothing, are not isolated (their
  nearest rows are the children they shadow), and inside concepts they chain parents together.
  A real feature, rare or common, fires at a magnitude of the usual order."""
  if not frac or len(code_r) == 0:
    return np.zeros(len(code_r), bool)
  return code_r < frac * np.median(code_r)


def build(params2: dict, rows_rd: np.ndarray, alive_ids: np.ndarray,
          s2: config_lib.SAEConfig, code_r: np.ndarray | None = None
          ) -> tuple[dict, dict | None, dict]:
  """(hierarchy.json, the concept-level SAE params or None (= export params2 as it is),
  metrics of the steps). `code_r`: each row's mean level-1 code when firing (x its decoder
  norm), for the weak-row rule; None skips it."""
  parent_r, strength_r = hierarchy_lib.assign_parents(params2, rows_rd, s2.assign_threshold)
  trained = int(np.asarray(params2['w_dec']).shape[0])
  info = {'level2/latents_trained': trained,
          'level2/latents_assigned': int(len(np.unique(parent_r[parent_r >= 0])))}
  if not s2.merge_ratio and not s2.refine and trained <= s2.n_latents:
    return hierarchy_lib.build(parent_r, strength_r, alive_ids), None, info
  unit_rd = rows_rd / np.maximum(np.linalg.norm(rows_rd, axis=1, keepdims=True), 1e-12)
  # Copies of one feature are one feature: the steps below see one row per near-duplicate
  # group (its first row, with the SAE's label of that row) and the copies follow it.
  group_r = merge.near_duplicate_groups(unit_rd, DUPLICATE_COS)
  _, rep_g, inverse_r = np.unique(group_r, return_index=True, return_inverse=True)
  rows_g, labels_g = unit_rd[rep_g], parent_r[rep_g]
  info['level2/duplicate_rows'] = int(len(unit_rd) - len(rep_g))
  if code_r is not None and s2.weak_code_frac:
    weak_r = weak_rows(np.asarray(code_r, np.float64), s2.weak_code_frac)
    # a near-duplicate group is weak when all of its copies are
    weak_g = np.ones(len(rep_g), bool)
    np.logical_and.at(weak_g, inverse_r.reshape(-1), weak_r)
    labels_g = np.where(weak_g, -1, labels_g)
    info['level2/weak_rows'] = int(weak_r.sum())
  if s2.isolate_q:
    iso_g = merge.isolated_rows(rows_g, s2.isolate_q)
    labels_g = np.where(iso_g, -1, labels_g)
    info['level2/isolated_rows'] = int(iso_g.sum())
  merges = 0
  max_z = s2.merge_z or None
  # with the z-test, the band [merge_floor, merge_ratio) merges unless measurably distinct
  band = dict(max_z=max_z, z_below=s2.merge_ratio) if max_z else {}
  floor = s2.merge_floor if max_z else s2.merge_ratio
  if s2.merge_ratio:
    labels_g, m = merge.merge_labels(rows_g, labels_g, floor, **band)
    merges += len(m['ratios'])
    if s2.split:
      labels_g, info['level2/splits'] = merge.split_labels(rows_g, labels_g, floor, **band)
  if s2.refine:
    labels_g, moved = merge.refine_labels(rows_g, labels_g, s2.merge_ratio or 1.0,
                                         eject_unrelated=not s2.isolate_q)
    info['level2/rows_moved'] = moved
    if s2.merge_ratio:
      labels_g, m = merge.merge_labels(rows_g, labels_g, floor, **band)
      merges += len(m['ratios'])
  info['level2/merges'] = merges
  labels_g, capped = merge.dissolve_or_merge_to(
      rows_g, labels_g, s2.n_latents, max_z=max_z, merge=not s2.merge_ratio)
  info['level2/dissolved'], info['level2/forced_merges'] = capped['dissolved'], capped['forced_merges']
  labels_r = labels_g[inverse_r.reshape(-1)]
  # renumber: concept id = its row in the concept SAE, largest concepts first
  ids, counts = np.unique(labels_r[labels_r >= 0], return_counts=True)
  order = ids[np.lexsort((ids, -counts))]
  new_id = {int(c): i for i, c in enumerate(order)}
  labels_r = np.array([new_id.get(int(c), -1) for c in labels_r], np.int64)
  d = rows_rd.shape[1]
  sums_md = np.zeros((len(order), d))
  np.add.at(sums_md, labels_r[labels_r >= 0], unit_rd[labels_r >= 0])
  w_dec_md = sums_md / np.maximum(np.linalg.norm(sums_md, axis=1, keepdims=True), 1e-12)
  strength_r = np.where(labels_r >= 0, np.sum(unit_rd * w_dec_md[np.maximum(labels_r, 0)], 1), 0)
  concept_params = {'w_enc': w_dec_md.T.astype(np.float32),
                    'b_enc': np.zeros(len(order), np.float32),
                    'w_dec': w_dec_md.astype(np.float32), 'b_dec': np.zeros(d, np.float32)}
  info['level2/concepts'] = len(order)
  return hierarchy_lib.build(labels_r, strength_r, alive_ids), concept_params, info
