"""Merging level-2 concepts that are fragments of one concept (level2.n_latents above the true
number of concepts).

A level-2 SAE's loss always drops when a latent is split, so surplus latents split concepts:
fragment A and fragment B of one parent both sit near it. What tells fragments from distinct
concepts is the similarity of their *members*, not of their directions: with unit rows w,
    cross(A, B)  = mean_{i in A, j in B} cos(w_i, w_j)
    within(A, B) = mean over distinct pairs inside A and inside B (pooled),
and the siblings of one concept are as similar across a split as inside it (cross / within ~ 1),
while two distinct concepts, even correlated ones, are less similar across than inside
(cross / within ~ the concepts' own correlation). A concept's centroid cosine would not do:
it depends on the fragment sizes (a singleton is its own centroid), pairwise means do not.

Concepts are merged greedily, the pair with the highest ratio first, while the ratio is at
least `min_ratio`. Everything comes from per-concept sums s_A = sum_{i in A} w_i and sizes:
    sum_{i in A, j in B} w_i . w_j = s_A . s_B,   sum_{i != j in A} w_i . w_j = |s_A|^2 - |A|,
so a merge costs O(c d) and no [r, r] similarity matrix is ever built (r = 20k rows is fine).
Two singletons have no within pairs; their reference is the median within-similarity of the
concepts that have pairs (none: they are not merged).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import scipy.stats
import sklearn.cluster
from jaxtyping import Float, Int

_BLOCK = 1024  # concepts per block of the ratio matrix (memory: block x c)
# A member is unrelated to its concept when its mean cosine to the other members is below
# CHANCE_Z standard deviations of the mean cosine of unrelated directions.
CHANCE_Z = 3.0
# Two concepts are measurably distinct when within - cross exceeds this many standard errors
# (the z-test of merge_labels; see config.SAEConfig.merge_z for where it applies).
MAX_Z = 3.0
_DEMOTE = 1e3  # distinct pairs rank below every other pair (still ordered among themselves)


def _within(s_cd: np.ndarray, n_c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(sum of within-pair cosines [c], number of ordered within pairs [c])."""
  return np.sum(s_cd * s_cd, axis=1) - n_c, n_c * (n_c - 1)


def pair_spread(rows_rd: np.ndarray, labels_r: np.ndarray) -> float:
  """Pooled standard deviation of the pairwise cosines inside each concept around the concept's
  mean (concepts with >= 3 members): how far one pair's similarity strays from its concept's."""
  ss, dof = 0.0, 0
  for c in np.unique(labels_r[labels_r >= 0]):
    m = rows_rd[labels_r == c]
    if len(m) < 3:
      continue
    g = (m @ m.T)[np.triu_indices(len(m), 1)]
    ss += float(np.sum((g - g.mean()) ** 2))
    dof += len(g) - 1
  return float(np.sqrt(ss / dof)) if dof > 0 else 0.0


def merge_labels(rows_rd: Float[np.ndarray, 'r d'], labels_r: Int[np.ndarray, 'r'],
                 min_ratio: float, max_concepts: int | None = None,
                 max_z: float | None = None, z_below: float = np.inf
                 ) -> tuple[np.ndarray, dict]:
  """Merged concept labels for the rows, and what was merged.

  labels_r: a concept id per row (-1: unassigned, left alone). Returns (labels_r, info) with
  merged concepts taking the smallest id of their group; info['groups'] lists the original ids
  of every concept that absorbed others, info['ratios'] the ratio of each merge in order.
  max_concepts: keep merging (best ratio first) until at most this many concepts remain.
  max_z: a pair whose within similarity exceeds its cross similarity by more than max_z
  standard errors is distinct, whatever its ratio (merged only when forced by max_concepts,
  after every other pair); None: the ratio alone. z_below: only pairs whose ratio is below this
  are tested (above it they merge whatever z): with min_ratio < z_below, the band between the
  two merges unless the pair is measurably distinct.
  """
  rows_rd = np.asarray(rows_rd, np.float64)
  rows_rd = rows_rd / np.maximum(np.linalg.norm(rows_rd, axis=1, keepdims=True), 1e-12)
  labels_r = np.asarray(labels_r, np.int64)
  ids_c = np.unique(labels_r[labels_r >= 0])
  c = len(ids_c)
  info = {'groups': {}, 'ratios': []}
  if c < 2:
    return labels_r.copy(), info
  index_r = np.searchsorted(ids_c, np.maximum(labels_r, ids_c[0]))
  assigned_r = labels_r >= 0
  s_cd = np.zeros((c, rows_rd.shape[1]))
  np.add.at(s_cd, index_r[assigned_r], rows_rd[assigned_r])
  n_c = np.bincount(index_r[assigned_r], minlength=c).astype(np.float64)
  active_c = np.ones(c, bool)
  owner_c = np.arange(c)          # original concept -> the concept that absorbed it
  sigma = pair_spread(rows_rd, labels_r) if max_z is not None else 0.0
  info['pair_spread'] = round(float(sigma), 4)

  def ratios(q_idx: np.ndarray) -> np.ndarray:
    """[len(q), c] ratio of cross to pooled within similarity, concepts q x every concept."""
    wsum_c, wpairs_c = _within(s_cd, n_c)
    ref = _reference(wsum_c, wpairs_c, active_c)
    r, distinct = _pair_ratio(s_cd[q_idx], n_c[q_idx], s_cd, n_c, ref, sigma, max_z)
    r = np.where(distinct & np.isfinite(r) & (r < z_below), r - _DEMOTE, r)
    r[:, ~active_c] = -np.inf
    r[np.arange(len(q_idx)), q_idx] = -np.inf
    return r

  best_c = np.full(c, -np.inf)
  arg_c = np.zeros(c, np.int64)

  def refresh(q_idx: np.ndarray) -> None:
    for lo in range(0, len(q_idx), _BLOCK):
      q = q_idx[lo:lo + _BLOCK]
      r = ratios(q)
      arg_c[q] = np.argmax(r, axis=1)
      best_c[q] = r[np.arange(len(q)), arg_c[q]]

  refresh(np.arange(c))
  while active_c.sum() > 1:
    a = int(np.argmax(np.where(active_c, best_c, -np.inf)))
    ratio, b = best_c[a], int(arg_c[a])
    forced = max_concepts is not None and active_c.sum() > max_concepts
    if not np.isfinite(ratio) or not (ratio >= min_ratio or forced):
      break
    a, b = min(a, b), max(a, b)
    s_cd[a] += s_cd[b]
    n_c[a] += n_c[b]
    s_cd[b], n_c[b], active_c[b] = 0.0, 0.0, False
    best_c[b] = -np.inf
    owner_c[owner_c == b] = a
    demoted = ratio < -_DEMOTE / 2
    info['ratios'].append(round(float(ratio + _DEMOTE if demoted else ratio), 4))
    info['distinct_merged'] = info.get('distinct_merged', 0) + int(demoted)
    # refresh the merged concept and every concept whose best partner was a or b; then the
    # merged concept may have become the best partner of others
    stale = np.nonzero(active_c & ((arg_c == a) | (arg_c == b)))[0]
    refresh(np.union1d(stale, [a]))
    r_a = ratios(np.array([a]))[0]
    better = active_c & (r_a > best_c)
    best_c[better], arg_c[better] = r_a[better], a
  out = labels_r.copy()
  out[assigned_r] = ids_c[owner_c[index_r[assigned_r]]]
  for q in np.unique(owner_c):
    members = ids_c[owner_c == q]
    if len(members) > 1:
      info['groups'][int(ids_c[q])] = [int(m) for m in members]
  return out, info


def _pair_ratio(s_qd, n_q, s_cd, n_c, ref: float, sigma: float, max_z: float | None
                ) -> tuple[np.ndarray, np.ndarray]:
  """(ratio [q, c] of cross to pooled within similarity, distinct [q, c]) for concepts q x c
  given member sums s and sizes n. ref: the pooled within of two singletons. distinct: within
  exceeds cross by more than max_z standard errors (all False without max_z or spread)."""
  wsum_q, wpairs_q = _within(s_qd, n_q)
  wsum_c, wpairs_c = _within(s_cd, n_c)
  pooled_pairs = wpairs_q[:, None] + wpairs_c[None, :]
  pooled = np.where(pooled_pairs > 0, (wsum_q[:, None] + wsum_c[None, :])
                    / np.maximum(pooled_pairs, 1), ref)
  cross = (s_qd @ s_cd.T) / np.maximum(n_q[:, None] * n_c[None, :], 1)
  with np.errstate(invalid='ignore'):
    r = np.where(pooled > 1e-9, cross / np.maximum(pooled, 1e-9), -np.inf)
  distinct = np.zeros(r.shape, bool)
  if max_z is not None and sigma > 0:
    # Distinct concepts can reach the ratio by chance when they are small; with enough members
    # their cross similarity is measurably below their within similarity. Standard error of
    # (within - cross) from the pooled spread of pair cosines (pairs as independent draws).
    n_pairs = np.maximum(pooled_pairs / 2, 1)
    se = sigma * np.sqrt(1 / np.maximum(n_q[:, None] * n_c[None, :], 1) + 1 / n_pairs)
    distinct = (pooled - cross) / se > max_z
  return r, distinct


def split_labels(rows_rd: Float[np.ndarray, 'r d'], labels_r: Int[np.ndarray, 'r'],
                 min_ratio: float, max_z: float | None = None, z_below: float = np.inf,
                 min_part: int = 2, seed: int = 0) -> tuple[np.ndarray, int]:
  """Splits concepts that hold two concepts the merge would keep apart.

  A level-2 latent can take two correlated concepts at once (and a merge of fragments that each
  hold a little of both joins them), and no merge undoes that. Each concept is bisected
  (2-means of its members' unit rows); the split stands when merge_labels would not merge the
  two halves back (same ratio, floor and z-test), and the halves are bisected in turn. Halves
  smaller than min_part are not tried. Returns (labels_r with new ids for split-off parts,
  number of splits)."""
  rows_rd = np.asarray(rows_rd, np.float64)
  rows_rd = rows_rd / np.maximum(np.linalg.norm(rows_rd, axis=1, keepdims=True), 1e-12)
  labels_r = np.asarray(labels_r, np.int64).copy()
  sigma = pair_spread(rows_rd, labels_r) if max_z is not None else 0.0
  queue = [int(c) for c in np.unique(labels_r[labels_r >= 0])]
  next_id = int(labels_r.max()) + 1 if len(queue) else 0
  splits = 0
  while queue:
    c = queue.pop()
    (idx,) = np.nonzero(labels_r == c)
    if len(idx) < 2 * min_part:
      continue
    part = sklearn.cluster.KMeans(2, n_init=4, random_state=seed).fit_predict(rows_rd[idx])
    a, b = idx[part == 0], idx[part == 1]
    if min(len(a), len(b)) < min_part:
      continue
    s_a, s_b = rows_rd[a].sum(0)[None], rows_rd[b].sum(0)[None]
    n_a, n_b = np.array([len(a)], np.float64), np.array([len(b)], np.float64)
    r, distinct = _pair_ratio(s_a, n_a, s_b, n_b, np.nan, sigma, max_z)
    r, distinct = float(r[0, 0]), bool(distinct[0, 0])
    merges = r >= z_below or (r >= min_ratio and not distinct)
    if merges:
      continue
    labels_r[b] = next_id
    queue += [c, next_id]
    next_id += 1
    splits += 1
  return labels_r, splits


def _reference(wsum_c, wpairs_c, active_c) -> float:
  """Median within-pair similarity of the concepts that have pairs: the reference of a merge
  of two singletons (nan when no concept has two members)."""
  has = active_c & (wpairs_c > 0)
  if not has.any():
    return np.nan
  return float(np.median(wsum_c[has] / wpairs_c[has]))


def chance_similarity(d: int, n_others: np.ndarray, z: float = CHANCE_Z) -> np.ndarray:
  """The mean cosine of a row to n_others unrelated unit rows in d dimensions stays below this
  with probability ~ Phi(z): each cosine is ~ N(0, 1/d), their mean ~ N(0, 1/(d n_others))."""
  return z / np.sqrt(d * np.maximum(n_others, 1))


def refine_labels(rows_rd: Float[np.ndarray, 'r d'], labels_r: Int[np.ndarray, 'r'],
                  min_ratio: float, iters: int = 10, eject_unrelated: bool = True
                  ) -> tuple[np.ndarray, int]:
  """Moves each row to the concept its members are most similar to (mean cosine to the
  concept's other members, the same average-linkage similarity the merge uses), k-means style,
  until no row moves.
  - A row no more similar to its concept's other members than to unrelated directions
    (`chance_similarity`) leaves it for a concept of its own: the argmax of a level-2 SAE gives
    every row some concept, and unrelated members would dilute the within similarity the merge
    compares against (a diluted concept would absorb its neighbours). eject_unrelated=False
    turns this off: with isolated rows left out beforehand (isolated_rows), ejecting split
    whole concepts in noisy families (robustness suite: noise_anisotropic 0.83 -> 0.98 ARI
    without it).
  - A row leaves a singleton only for a concept it would have merged with (mean cosine >=
    min_ratio x that concept's within similarity), so unrelated rows stay alone.
  Returns (labels_r, rows moved in all). Unassigned rows (-1) stay unassigned; concepts that
  lose every member disappear."""
  rows_rd = np.asarray(rows_rd, np.float64)
  rows_rd = rows_rd / np.maximum(np.linalg.norm(rows_rd, axis=1, keepdims=True), 1e-12)
  labels_r = np.asarray(labels_r, np.int64).copy()
  assigned = np.nonzero(labels_r >= 0)[0]
  d = rows_rd.shape[1]
  moved_total = 0
  for _ in range(iters):
    ids_c = np.unique(labels_r[assigned])
    idx_r = np.searchsorted(ids_c, labels_r[assigned])
    s_cd = np.zeros((len(ids_c), d))
    np.add.at(s_cd, idx_r, rows_rd[assigned])
    n_c = np.bincount(idx_r, minlength=len(ids_c)).astype(np.float64)
    wsum_c, wpairs_c = _within(s_cd, n_c)
    within_c = np.where(wpairs_c > 0, wsum_c / np.maximum(wpairs_c, 1), np.nan)
    moved = 0
    new_idx = idx_r.copy()
    eject = np.zeros(len(assigned), bool)
    for lo in range(0, len(assigned), _BLOCK):
      rr = assigned[lo:lo + _BLOCK]
      own = idx_r[lo:lo + _BLOCK]
      dot_bc = rows_rd[rr] @ s_cd.T
      self_bc = np.zeros_like(dot_bc)
      self_bc[np.arange(len(rr)), own] = 1.0           # a row is not its own sibling
      others_bc = n_c[None, :] - self_bc
      with np.errstate(invalid='ignore', divide='ignore'):
        score_bc = np.where(others_bc > 0, (dot_bc - self_bc) / others_bc, -np.inf)
      best = np.argmax(score_bc, axis=1)
      best_score = score_bc[np.arange(len(rr)), best]
      own_score = score_bc[np.arange(len(rr)), own]
      alone = n_c[own] <= 1
      ok = np.where(alone, best_score >= min_ratio * np.nan_to_num(within_c[best], nan=np.inf),
                    best_score > own_score)
      change = ok & (best != own)
      unrelated = (~alone & (np.maximum(own_score, best_score)
                             < chance_similarity(d, n_c[own] - 1)) if eject_unrelated
                   else np.zeros(len(rr), bool))
      eject[lo:lo + _BLOCK] = unrelated
      new_idx[lo:lo + _BLOCK] = np.where(change, best, own)
      moved += int((change | unrelated).sum())
    new_labels = ids_c[new_idx]
    fresh = labels_r.max() + 1 + np.arange(int(eject.sum()))
    new_labels[eject] = fresh
    labels_r[assigned] = new_labels
    moved_total += moved
    if not moved:
      break
  return labels_r, moved_total


def near_duplicate_groups(rows_rd: Float[np.ndarray, 'r d'], cos: float) -> np.ndarray:
  """[r] group id: rows joined by chains of near-duplicates (cosine > cos) share one.

  A level-1 dictionary often holds several copies of one feature. Copies are one feature, not
  siblings: inside a concept they would make its within similarity look far higher than its
  similarity to another fragment of the same concept, and block the merge. Blocked search,
  connected components of the sparse near-duplicate graph."""
  u = np.asarray(rows_rd, np.float64)
  u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
  r = len(u)
  src, dst = [], []
  for lo in range(0, r, _BLOCK):
    c_br = u[lo:lo + _BLOCK] @ u.T
    i, j = np.nonzero(c_br > cos)
    src.append(i + lo)
    dst.append(j)
  src, dst = np.concatenate(src), np.concatenate(dst)
  graph = scipy.sparse.coo_matrix((np.ones(len(src)), (src, dst)), shape=(r, r))
  return scipy.sparse.csgraph.connected_components(graph, directed=False)[1]


def dissolve_or_merge_to(rows_rd: Float[np.ndarray, 'r d'], labels_r: Int[np.ndarray, 'r'],
                         max_concepts: int, max_z: float | None = None, merge: bool = True
                         ) -> tuple[np.ndarray, dict]:
  """At most max_concepts concepts. Concepts that show no grouping (singletons, then those whose
  members are no more similar than unrelated directions, least coherent first) are dissolved
  (their rows unassigned, -1). If still too many:
    merge=True: the most similar concepts are merged (the merge's ratio, best first: fragments
      of one concept go before distinct concepts);
    merge=False: the concepts with the least evidence are dissolved too, evidence = the sum of
      their members' pairwise cosines (size x coherence). For concepts a merge step has already
      judged distinct: merging two of them makes a mixed concept (two correlated parents in one,
      robustness suite), while dissolving a small one only leaves its rows unassigned."""
  u = np.asarray(rows_rd, np.float64)
  u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
  labels_r = np.asarray(labels_r, np.int64).copy()
  ids = np.unique(labels_r[labels_r >= 0])
  info = {'dissolved': 0, 'forced_merges': 0}
  if len(ids) <= max_concepts:
    return labels_r, info
  d = u.shape[1]
  coh, mass, weak = {}, {}, []
  for c in ids:
    m = u[labels_r == c]
    n = len(m)
    s = m.sum(0)
    mass[c] = s @ s - n
    coh[c] = mass[c] / (n * (n - 1)) if n > 1 else -np.inf
    if n == 1 or coh[c] < chance_similarity(d, np.asarray(n * (n - 1) / 2.0)):
      weak.append(c)
  weak.sort(key=lambda c: (coh[c], c))
  drop = weak[:len(ids) - max_concepts]
  if not merge and len(ids) - len(drop) > max_concepts:
    dropped = set(drop)
    rest = sorted((c for c in ids if c not in dropped), key=lambda c: (mass[c], c))
    drop += rest[:len(ids) - len(drop) - max_concepts]
  labels_r[np.isin(labels_r, drop)] = -1
  info['dissolved'] = len(drop)
  if len(ids) - len(drop) > max_concepts:
    before = len(np.unique(labels_r[labels_r >= 0]))
    labels_r, m = merge_labels(u, labels_r, min_ratio=np.inf, max_concepts=max_concepts,
                               max_z=max_z)
    info['forced_merges'] = before - len(np.unique(labels_r[labels_r >= 0]))
  return labels_r, info


def nearest_chance(d: int, r: int, quantile: float) -> float:
  """The `quantile` of the cosine of a random unit direction in d dimensions to its nearest of
  r - 1 other random directions: each cosine is ~ N(0, 1/d), so P(max < t) = Phi(t sqrt(d))^(r-1)."""
  m = max(r - 1, 1)
  return float(scipy.stats.norm.ppf(quantile ** (1.0 / m)) / np.sqrt(d))


def isolated_rows(rows_rd: Float[np.ndarray, 'r d'], quantile: float) -> np.ndarray:
  """[r] bool: rows no closer to their nearest other row than a random direction typically is
  to its nearest (`nearest_chance` at `quantile`). Such a row has no sibling among the rows, so
  no concept can hold it; kept in, it dilutes the concept the level-2 argmax put it in (noise
  features of a low-SNR level 1 tile the space more evenly than random directions, and a
  concept of them has near-zero within similarity, which makes every merge ratio with it
  large: robustness suite, low_snr / overcomplete_8). Copies of one feature should be grouped
  (near_duplicate_groups) before: a copy is not a sibling."""
  u = np.asarray(rows_rd, np.float64)
  u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
  r, d = u.shape
  if r < 2 or quantile <= 0:
    return np.zeros(r, bool)
  near_r = np.empty(r)
  for lo in range(0, r, _BLOCK):
    c_br = u[lo:lo + _BLOCK] @ u.T
    c_br[np.arange(len(c_br)), lo + np.arange(len(c_br))] = -np.inf
    near_r[lo:lo + _BLOCK] = c_br.max(axis=1)
  return near_r < nearest_chance(d, r, quantile)
