"""Hierarchy-coherence metrics: HMS (re-exported from `hms`), taxonomy consistency, parent/child
activation structure and synthetic ground-truth recovery of the parents.

The paper's claim is that CSAE concepts are more coherent than the baselines'. Every coherence
number here is computed the same way for every method from its `hierarchy.json` and comes with a
size-matched random-partition null where chance level is not 0, so methods with different cluster
sizes or coverage stay comparable. The label-free collapse statistics live in `evals.structure`;
child recovery, ARI and NMI in `evals.synthetic`.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
import scipy.sparse

from csae_jax.cascade import hierarchy as hierarchy_lib
from csae_jax.evals.hms import (PerImageAccumulator, hms, hms_from_labels, hms_null,  # noqa: F401
                                hms_report, p_value, per_image_activations, prototypes,
                                synthetic_hms)
from csae_jax.evals import hms as hms_lib


def _n_features(hierarchy: dict, *arrays_n: np.ndarray) -> int:
  ids = [m for c in hierarchy['concepts'] for m in c['members']] + list(hierarchy.get('alive', []))
  return max([max(ids, default=-1) + 1] + [int(np.max(a, initial=-1)) + 1 for a in arrays_n])


def _pairs(counts: np.ndarray) -> float:
  return float(np.sum(counts * (counts - 1) / 2))


def taxonomy(hierarchy: dict, acts_in: np.ndarray, fine_label_i: np.ndarray,
             coarse_of_fine: np.ndarray, *, n_perm: int = 200, seed: int = 0,
             prefix: str = 'taxonomy') -> dict:
  """Label consistency of concepts on images with fine labels that roll up to coarse ones.

  Per feature firing on labelled images: its dominant fine label (largest share of its
  activation mass) and that share (purity). Per concept with >= 2 such children: the fraction of
  child pairs whose dominant labels share the coarse label; its mean over concepts is compared
  with random partitions of the same children into the same sizes (minus_null, p_value).
  Images with label -1 or without tokens (NaN rows) are ignored.
  """
  acts_in = np.asarray(acts_in)
  fine_label_i, coarse_of_fine = np.asarray(fine_label_i), np.asarray(coarse_of_fine)
  if fine_label_i.shape != (len(acts_in),):
    raise ValueError(f'fine_label_i has shape {fine_label_i.shape}; expected ({len(acts_in)},), '
                     'one fine label id (or -1) per image row of acts_in')
  if n_perm < 1:
    raise ValueError(f'n_perm = {n_perm}; use at least 1 permutation (200 is the default)')
  if coarse_of_fine.ndim != 1 or coarse_of_fine.min(initial=0) < 0:
    raise ValueError(f'coarse_of_fine must be a 1-d array of coarse ids >= 0 per fine label id; '
                     f'got shape {coarse_of_fine.shape}, min {coarse_of_fine.min(initial=0)}')
  if fine_label_i.max(initial=-1) >= len(coarse_of_fine):
    raise ValueError(f'fine label {fine_label_i.max()} has no entry in coarse_of_fine (length '
                     f'{len(coarse_of_fine)}): map every fine label id to its coarse id')
  n = acts_in.shape[1]
  valid_i = hms_lib.valid_rows(acts_in)
  lab_v = fine_label_i[valid_i]
  (cols_u,) = np.nonzero(lab_v >= 0)
  onehot_fv = scipy.sparse.csr_matrix((np.ones(len(cols_u)), (lab_v[cols_u], cols_u)),
                                      shape=(len(coarse_of_fine), len(lab_v)))
  dom_n, purity_n = np.full(n, -1), np.zeros(n)
  for sl, a_vc in hms_lib.chunks(acts_in, valid_i):
    if a_vc.min(initial=0.0) < 0:
      raise ValueError('acts_in has negative activations; taxonomy needs non-negative codes '
                       '(activation mass per label)')
    mass_fc = onehot_fv @ a_vc  # unlabelled images have no column entry
    total_c = mass_fc.sum(0)
    dom_n[sl] = np.where(total_c > 0, mass_fc.argmax(0), -1)
    purity_n[sl] = mass_fc.max(0, initial=0.0) / np.where(total_c > 0, total_c, 1.0)
  fired_n = dom_n >= 0
  labels_n = hierarchy_lib.labels(hierarchy, n)
  members, _, sizes = hms_lib.blocks(labels_n, fired_n)
  coarse_s = coarse_of_fine[dom_n[members]]
  n_coarse = int(coarse_of_fine.max(initial=0)) + 1
  blk_s = np.repeat(np.arange(len(sizes)), sizes)

  def agree(coarse_perm_s):  # fraction of same-coarse child pairs per concept
    n_kc = np.bincount(blk_s * n_coarse + coarse_perm_s, minlength=len(sizes) * n_coarse)
    same_k = (n_kc * (n_kc - 1) / 2).reshape(len(sizes), n_coarse).sum(1)
    return same_k / (sizes * (sizes - 1) / 2)

  nan = float('nan')
  out = {f'{prefix}/fired': int(fired_n.sum()), f'{prefix}/concepts_ge2': len(sizes),
         f'{prefix}/purity_mean': float(purity_n[fired_n].mean()) if fired_n.any() else nan}
  if not len(sizes):
    return {**out, **{f'{prefix}/{k}': nan for k in
                      ('coarse_agree', 'null_mean', 'null_std', 'minus_null', 'p_value')}}
  observed = float(agree(coarse_s).mean())
  rng = np.random.default_rng(seed)
  null_p = np.array([agree(coarse_s[rng.permutation(len(coarse_s))]).mean()
                     for _ in range(n_perm)])
  return {**out, f'{prefix}/coarse_agree': observed, f'{prefix}/null_mean': float(null_p.mean()),
          f'{prefix}/null_std': float(null_p.std()),
          f'{prefix}/minus_null': observed - float(null_p.mean()),
          f'{prefix}/p_value': p_value(observed, null_p)}


class ParentChildAccumulator:
  """Streams (child codes, parent codes) batches; `.result()` -> parent/child activation stats.

  The parent of level-1 feature j is its concept id in hierarchy.json, which indexes the
  columns of the parent codes (level-2 latents for CSAE, the parent SAE's latents otherwise).
  """

  def __init__(self, hierarchy: dict, n1: int, n_parents: int):
    labels_n = hierarchy_lib.labels(hierarchy, n1)
    self.members, self.concepts, self.sizes = hms_lib.blocks(
        labels_n, labels_n >= 0, min_size=1)
    if len(self.concepts) and self.concepts.max() >= n_parents:
      raise ValueError(f'hierarchy concept id {self.concepts.max()} has no column in the parent '
                       f'codes ({n_parents} columns): pass the parent latents the ids index')
    self.n1, self.n_parents = n1, n_parents
    self.blk_s = np.repeat(np.arange(len(self.sizes)), self.sizes)
    self.ind_ks = scipy.sparse.csr_matrix((np.ones(len(self.members), np.float32), (
        self.blk_s, np.arange(len(self.members)))), shape=(len(self.sizes), len(self.members)))
    self.child_s = np.zeros(len(self.members), np.int64)    # tokens where the child fires
    self.both_s = np.zeros(len(self.members), np.int64)     # ... and its parent too
    self.mismatch_k = np.zeros(len(self.sizes), np.int64)   # OR(children) != parent
    self.tokens = 0

  def add(self, child_codes_tn: np.ndarray, parent_codes_tm: np.ndarray) -> None:
    child_codes_tn, parent_codes_tm = np.asarray(child_codes_tn), np.asarray(parent_codes_tm)
    if child_codes_tn.shape[1:] != (self.n1,) or parent_codes_tm.shape[1:] != (
        self.n_parents,) or len(child_codes_tn) != len(parent_codes_tm):
      raise ValueError(f'child codes {child_codes_tn.shape} and parent codes '
                       f'{parent_codes_tm.shape} must be [t, {self.n1}] and [t, '
                       f'{self.n_parents}] for the same t tokens')
    child_ts = child_codes_tn[:, self.members] > 0
    parent_tk = parent_codes_tm[:, self.concepts] > 0
    self.child_s += child_ts.sum(0)
    self.both_s += (child_ts & parent_tk[:, self.blk_s]).sum(0)
    any_child_tk = (self.ind_ks @ child_ts.T.astype(np.float32)).T > 0
    self.mismatch_k += (any_child_tk != parent_tk).sum(0)
    self.tokens += len(child_codes_tn)

  def result(self, prefix: str = 'parent_child') -> dict:
    fired_s = self.child_s > 0
    p_s = self.both_s[fired_s] / self.child_s[fired_s]
    nan = float('nan')
    return {
        f'{prefix}/p_parent_given_child_mean': float(p_s.mean()) if len(p_s) else nan,
        f'{prefix}/p_parent_given_child_median': float(np.median(p_s)) if len(p_s) else nan,
        f'{prefix}/hamming_mean': (float(np.mean(self.mismatch_k / self.tokens))
                                   if len(self.sizes) and self.tokens else nan),
        f'{prefix}/children_scored': int(fired_s.sum()),
        f'{prefix}/concepts': len(self.sizes)}


def parent_child_stats(hierarchy: dict, child_codes_tn: np.ndarray, parent_codes_tm: np.ndarray,
                       prefix: str = 'parent_child') -> dict:
  """P(parent active | child active) over assigned children that fire (mean, median) and the
  per-concept normalised Hamming distance between OR(children active) and (parent active),
  mean over concepts. For batches use `ParentChildAccumulator`."""
  acc = ParentChildAccumulator(hierarchy, np.shape(child_codes_tn)[1], np.shape(parent_codes_tm)[1])
  acc.add(child_codes_tn, parent_codes_tm)
  return acc.result(prefix)


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _matched_mean(score_km: np.ndarray) -> float:
  """Hungarian matching maximising the score; mean over rows, unmatched rows counting 0."""
  if score_km.size == 0:
    return 0.0
  rows, cols = scipy.optimize.linear_sum_assignment(-score_km)
  return float(score_km[rows, cols].sum() / len(score_km))


def parent_mcc(level2_decoder_md: np.ndarray, parents_kd: np.ndarray) -> float:
  """Mean signed cosine of the Hungarian matching of true parents to level-2 directions."""
  if np.shape(level2_decoder_md)[1:] != np.shape(parents_kd)[1:]:
    raise ValueError(f'level2_decoder_md {np.shape(level2_decoder_md)} and parents_kd '
                     f'{np.shape(parents_kd)} must share the input dimension d')
  return _matched_mean(_unit(parents_kd) @ _unit(level2_decoder_md).T)


def sibling_prf(hierarchy: dict, feat_of_child_c: np.ndarray, parent_of_child_c: np.ndarray
                ) -> tuple[float, float, float]:
  """(precision, recall, F1) of sibling pairs among true children matched to a feature
  (feat >= 0): predicted siblings share a concept, true siblings share a parent."""
  feat_c, parent_c = np.asarray(feat_of_child_c), np.asarray(parent_of_child_c)
  if feat_c.shape != parent_c.shape:
    raise ValueError(f'feat_of_child_c {feat_c.shape} and parent_of_child_c {parent_c.shape} '
                     'must have one entry per true child')
  labels_n = hierarchy_lib.labels(hierarchy, _n_features(hierarchy, feat_c))
  ok = feat_c >= 0
  pred = labels_n[feat_c[ok]]
  pred = np.where(pred >= 0, pred, -1 - np.arange(len(pred)))  # unassigned: no siblings
  true = parent_c[ok]
  joint = np.unique(np.stack([pred, true]), axis=1, return_counts=True)[1]
  tp = _pairs(joint)
  pred_pos = _pairs(np.unique(pred, return_counts=True)[1])
  true_pos = _pairs(np.unique(true, return_counts=True)[1])
  precision = tp / pred_pos if pred_pos else 0.0
  recall = tp / true_pos if true_pos else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return float(precision), float(recall), float(f1)


def parent_detection_f1(parent_codes_tm: np.ndarray, parent_active_tk: np.ndarray) -> float:
  """Each true parent matched to one parent latent (Hungarian on the co-activation F1 over
  tokens); mean F1 of the matched pairs, unmatched parents counting 0."""
  pred_tm = np.asarray(parent_codes_tm) > 0
  true_tk = np.asarray(parent_active_tk).astype(bool)
  if len(pred_tm) != len(true_tk):
    raise ValueError(f'parent_codes_tm has {len(pred_tm)} rows, parent_active_tk '
                     f'{len(true_tk)}: pass codes and ground truth of the same samples')
  tp_km = true_tk.T.astype(np.float64) @ pred_tm.astype(np.float64)
  denom_km = true_tk.sum(0)[:, None] + pred_tm.sum(0)[None, :]
  f1_km = np.where(denom_km > 0, 2 * tp_km / np.maximum(denom_km, 1), 0.0)
  return _matched_mean(f1_km)
