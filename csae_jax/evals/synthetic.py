"""Scores against the synthetic ground truth: child recovery and parent grouping."""

from __future__ import annotations

import numpy as np
import scipy.optimize
import sklearn.metrics

# A true child counts as recovered when an alive feature's decoder row is within this cosine.
RECOVERED_COS = 0.8


def match_children(children_cd: np.ndarray, w_dec_nd: np.ndarray, alive_n: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Hungarian matching of true children to distinct alive level-1 features by cosine.

  Returns (feature id per child [C] (-1 if fewer alive features than children), matched cosine
  [C] (0 when unmatched), max cosine over all alive features [C]).
  """
  ids = np.nonzero(alive_n)[0]
  c = len(children_cd)
  if len(ids) == 0:
    return np.full(c, -1), np.zeros(c), np.zeros(c)
  unit = w_dec_nd[ids] / np.maximum(np.linalg.norm(w_dec_nd[ids], axis=1, keepdims=True), 1e-12)
  cos_cm = children_cd @ unit.T
  rows, cols = scipy.optimize.linear_sum_assignment(-cos_cm)
  feat_c = np.full(c, -1)
  matched_c = np.zeros(c)
  feat_c[rows] = ids[cols]
  matched_c[rows] = cos_cm[rows, cols]
  return feat_c, matched_c, cos_cm.max(axis=1)


def scores(children_cd: np.ndarray, parent_of_child_c: np.ndarray, w_dec_nd: np.ndarray,
           alive_n: np.ndarray, concept_of_feature_n: np.ndarray) -> dict:
  """child_mcc: mean cosine of the Hungarian matching (mean correlation coefficient of
  dictionary recovery); child_mean_max_cos; parent_ari / parent_nmi: the concepts of the matched
  features vs the true parents (an unassigned child counts as a singleton concept)."""
  feat_c, matched_c, max_c = match_children(children_cd, w_dec_nd, alive_n)
  pred_c = np.where(feat_c >= 0, concept_of_feature_n[np.maximum(feat_c, 0)], -1)
  singletons = -2 - np.arange(len(pred_c))  # unassigned children do not share a concept
  pred_c = np.where(pred_c >= 0, pred_c, singletons)
  # The suite's grouping score: over the recovered children, the concept of each one's closest
  # alive feature (duplicates of a child do not lower it; unrecovered children are left out).
  ids = np.nonzero(alive_n)[0]
  rec_c = max_c > RECOVERED_COS
  ari_rec = float('nan')
  if rec_c.sum() >= 2:
    unit = w_dec_nd[ids] / np.maximum(np.linalg.norm(w_dec_nd[ids], axis=1, keepdims=True), 1e-12)
    near_c = ids[np.argmax(children_cd[rec_c] @ unit.T, axis=1)]
    lab_c = concept_of_feature_n[near_c]
    lab_c = np.where(lab_c >= 0, lab_c, -2 - np.arange(len(lab_c)))
    ari_rec = float(sklearn.metrics.adjusted_rand_score(parent_of_child_c[rec_c], lab_c))
  return {
      'synthetic/parent_ari_recovered': ari_rec,
      'synthetic/child_mcc': float(np.mean(matched_c)),
      'synthetic/child_mean_max_cos': float(np.mean(max_c)),
      'synthetic/children_recovered_0.9': float(np.mean(matched_c > 0.9)),
      # The robustness suite's recovery: some alive feature within cos 0.8 of the child.
      'synthetic/children_recovered': float(np.mean(max_c > RECOVERED_COS)),
      'synthetic/parent_ari': float(sklearn.metrics.adjusted_rand_score(parent_of_child_c, pred_c)),
      'synthetic/parent_nmi': float(
          sklearn.metrics.normalized_mutual_info_score(parent_of_child_c, pred_c)),
  }
