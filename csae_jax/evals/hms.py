"""Hierarchy Monosemanticity Score (HMS), with the guards and the null the paper lacks.

Paper definition: per level-1 feature j a prototype R_j = sum_i a_ij E_i / sum_i a_ij, where E_i
is a reference embedding of image i and a_ij feature j's per-image activation (mean over the
image's tokens) min-max normalised over images; HMS(k) = mean pairwise cosine of the prototypes
of concept k's children, over concepts with >= 2 children.

Guards:
- A feature that never fires on the evaluation set (max activation 0) has no prototype. The
  reference code gives it uniform weights, so all such siblings share one prototype (cosine 1)
  and inflate HMS; here it is excluded and counted (`excluded_never_fired`).
- Every HMS comes with a null: the same mean for random partitions of the same scored features
  with the same cluster sizes, so "HMS - null" and a permutation p-value say whether the grouping
  beats chance given which features were grouped (a dense feature's prototype is close to the
  mean embedding whatever its concept, so raw HMS alone is not comparable across methods).

Images without tokens have no activation: `PerImageAccumulator.mean` marks them NaN and every
function here ignores those rows (the reference code gives them zeros, which shifts the min).
Everything is host-side numpy; memory stays O(images x chunk) beyond the [images, n] input.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

from csae_jax.cascade import hierarchy as hierarchy_lib

# Features per chunk when reading [images, n] activations: bounds the temporaries (50k images x
# 1024 float32 = 200 MB) while keeping the weights @ embeddings matmul large enough to be fast.
_CHUNK = 1024
# A null statistic within this of the observed one counts as >= (float32 rounding in the null).
_TIE_TOL = 1e-5


class PerImageAccumulator:
  """Streams token codes into per-image mean activations; `.mean()` -> [n_images, n_features]."""

  def __init__(self, n_images: int, n_features: int):
    # float32: [images, n] is the big array (50k x 20k is 4 GB); a mean of ~1k tokens is fine.
    self.sum_in = np.zeros((n_images, n_features), np.float32)
    self.count_i = np.zeros(n_images, np.int64)

  def add(self, codes_tn: np.ndarray, image_id_t: np.ndarray) -> None:
    codes_tn, image_id_t = np.asarray(codes_tn), np.asarray(image_id_t)
    n_images, n_features = self.sum_in.shape
    if codes_tn.ndim != 2 or codes_tn.shape[1] != n_features:
      raise ValueError(f'codes_tn has shape {codes_tn.shape}; expected [tokens, {n_features}] '
                       '(the accumulator was built for that many features)')
    if image_id_t.shape != (len(codes_tn),):
      raise ValueError(f'image_id_t has shape {image_id_t.shape}; expected ({len(codes_tn)},), '
                       'one image id per code row')
    if len(image_id_t) and (image_id_t.min() < 0 or image_id_t.max() >= n_images):
      raise ValueError(f'image ids must lie in [0, {n_images}); got [{image_id_t.min()}, '
                       f'{image_id_t.max()}]: pass n_images = number of images')
    # Rows of one image summed through a sparse indicator (one matmul, no Python loop), touching
    # only the batch's images so no [images, n] temporary is built per batch.
    uniq_u, row_t = np.unique(image_id_t, return_inverse=True)
    ind = scipy.sparse.csr_matrix((np.ones(len(row_t), np.float32), (row_t, np.arange(
        len(row_t)))), shape=(len(uniq_u), len(row_t)))
    self.sum_in[uniq_u] += ind @ codes_tn.astype(np.float32, copy=False)
    self.count_i += np.bincount(image_id_t, minlength=n_images)

  def mean(self) -> np.ndarray:
    """[n_images, n_features] float32; NaN rows for images that received no tokens."""
    with np.errstate(invalid='ignore', divide='ignore'):
      return self.sum_in / self.count_i[:, None].astype(np.float32)


def per_image_activations(codes_tn: np.ndarray, image_id_t: np.ndarray, n_images: int
                          ) -> np.ndarray:
  """[n_images, n] mean activation of each feature over the image's tokens (NaN: no tokens)."""
  acc = PerImageAccumulator(n_images, np.shape(codes_tn)[1])
  acc.add(codes_tn, image_id_t)
  return acc.mean()


def valid_rows(acts_in: np.ndarray) -> np.ndarray:
  """[images] bool: images that had tokens (not NaN rows; `chunks` checks the rest of the row)."""
  return ~np.isnan(acts_in[:, 0]) if acts_in.shape[1] else np.ones(len(acts_in), bool)


def chunks(acts_in: np.ndarray, valid_i: np.ndarray, dtype=np.float64
           ):  # -> Iterator[(slice, ndarray)]
  """Yields (feature slice, [valid images, chunk] of dtype) and checks for stray NaNs."""
  for s in range(0, acts_in.shape[1], _CHUNK):
    sl = slice(s, min(s + _CHUNK, acts_in.shape[1]))
    a = np.asarray(acts_in[valid_i, sl], dtype)
    if np.isnan(a).any() or not np.isnan(acts_in[~valid_i, sl]).all():
      raise ValueError('acts_in has NaN activations in images that have tokens; only whole '
                       'rows may be NaN (images without tokens, as PerImageAccumulator marks)')
    yield sl, a


def prototypes(acts_in: np.ndarray, emb_ie: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(proto_ne, fired_n): activation-weighted mean embedding per feature, and which fired.

  Weights are the per-image activations min-max normalised over images. A feature whose max is 0
  never fired: its prototype is NaN and `fired_n` False (the guard). A feature that fires equally
  on every image (max == min > 0) gets uniform weights, the limit of the rule.
  """
  # float32 matmuls: 2-3x faster than float64 here, and cosines need no more than 1e-6.
  acts_in, emb_ie = np.asarray(acts_in), np.asarray(emb_ie, np.float32)
  if acts_in.ndim != 2 or emb_ie.ndim != 2 or len(acts_in) != len(emb_ie):
    raise ValueError(f'acts_in {acts_in.shape} and emb_ie {emb_ie.shape} must be [images, n] and '
                     '[images, e] with the same images (one reference embedding per image)')
  valid_i = valid_rows(acts_in)
  emb_ve = emb_ie[valid_i]
  n = acts_in.shape[1]
  proto_ne = np.full((n, emb_ie.shape[1]), np.nan)
  fired_n = np.zeros(n, bool)
  for sl, a_vc in chunks(acts_in, valid_i, np.float32):
    if len(a_vc) == 0:
      continue
    lo_c, hi_c = a_vc.min(0), a_vc.max(0)
    rng_c = hi_c - lo_c
    w_vc = np.where(rng_c > 0, (a_vc - lo_c) / np.where(rng_c > 0, rng_c, 1.0), 1.0)
    fired_c = hi_c > 0
    proto_ce = (w_vc.T @ emb_ve) / w_vc.sum(0, dtype=np.float64)[:, None]
    proto_ne[sl] = np.where(fired_c[:, None], proto_ce, np.nan)
    fired_n[sl] = fired_c
  return proto_ne, fired_n


def _unit(x_ne: np.ndarray) -> np.ndarray:
  # A zero prototype (embeddings cancelling) stays zero: cosine 0 with everything.
  return x_ne / np.maximum(np.linalg.norm(x_ne, axis=1, keepdims=True), 1e-12)


def blocks(labels_n: np.ndarray, fired_n: np.ndarray, min_size: int = 2
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Scored features (fired, in a concept with >= min_size fired members) sorted by concept:
  (feature ids [s], concept ids [k] ascending, block sizes [k])."""
  lab = np.where(fired_n, labels_n, -1)
  ids, counts = np.unique(lab[lab >= 0], return_counts=True)
  keep = ids[counts >= min_size]
  members = np.nonzero(np.isin(lab, keep))[0]
  members = members[np.argsort(lab[members], kind='stable')]
  return members, keep, counts[counts >= min_size]


def _block_hms(unit_se: np.ndarray, sq_s: np.ndarray, blk_s: np.ndarray, sizes_k: np.ndarray,
               order_s: np.ndarray) -> np.ndarray:
  """HMS per block when block blk_s[p] holds feature order_s[p]: mean pairwise cosine =
  (||sum of unit prototypes||^2 - sum of their squared norms) / (m (m - 1))."""
  ind = scipy.sparse.csr_matrix((np.ones(len(order_s), unit_se.dtype), (blk_s, order_s)),
                                shape=(len(sizes_k), len(unit_se)))
  s_ke = ind @ unit_se
  diag_k = np.bincount(blk_s, weights=sq_s[order_s], minlength=len(sizes_k))
  return (np.einsum('ke,ke->k', s_ke, s_ke) - diag_k) / (sizes_k * (sizes_k - 1.0))


def hms(labels_n: np.ndarray, proto_ne: np.ndarray, fired_n: np.ndarray) -> dict:
  """HMS per concept with >= 2 fired children (concept ids ascending) and its summaries."""
  labels_n, fired_n = np.asarray(labels_n), np.asarray(fired_n, bool)
  if not labels_n.shape == fired_n.shape == (len(proto_ne),):
    raise ValueError(f'labels_n {labels_n.shape}, fired_n {fired_n.shape} and proto_ne '
                     f'{np.shape(proto_ne)} must describe the same level-1 features')
  members, concepts, sizes = blocks(labels_n, fired_n)
  unit_se = _unit(np.asarray(proto_ne, np.float64)[members])
  per = _block_hms(unit_se, np.sum(unit_se ** 2, 1), np.repeat(np.arange(len(sizes)), sizes),
                   sizes, np.arange(len(members)))
  stat = lambda f: float(f(per)) if len(per) else float('nan')
  return {'per_concept': per, 'concept_ids': concepts, 'sizes': sizes,
          'mean': stat(np.mean), 'median': stat(np.median), 'min': stat(np.min),
          'max': stat(np.max), 'concepts_ge2': len(per),
          'coverage': float(len(members) / max(int(fired_n.sum()), 1)),
          'excluded_never_fired': int(np.sum((labels_n >= 0) & ~fired_n))}


def p_value(observed: float, null_p: np.ndarray) -> float:
  """(1 + #null >= observed) / (1 + n_perm); ties within float rounding count as >=."""
  return float((1 + np.sum(null_p >= observed - _TIE_TOL)) / (1 + len(null_p)))


def hms_null(labels_n: np.ndarray, proto_ne: np.ndarray, fired_n: np.ndarray,
             n_perm: int = 200, seed: int = 0) -> dict:
  """Mean HMS under random partitions of the scored features into the same cluster sizes.

  Returns observed, null_mean, null_std, p_value and the null draws (`null`, [n_perm]).
  """
  if n_perm < 1:
    raise ValueError(f'n_perm = {n_perm}; use at least 1 permutation (200 is the default)')
  labels_n, fired_n = np.asarray(labels_n), np.asarray(fired_n, bool)
  observed = hms(labels_n, proto_ne, fired_n)['mean']
  members, _, sizes = blocks(labels_n, fired_n)
  if not len(sizes):
    nan = float('nan')
    return {'observed': nan, 'null_mean': nan, 'null_std': nan, 'p_value': nan,
            'null': np.full(n_perm, nan)}
  # float32 for speed (n_perm x [s, e] sparse products); the observed value is float64.
  unit_se = _unit(np.asarray(proto_ne, np.float64)[members]).astype(np.float32)
  sq_s = np.sum(unit_se.astype(np.float64) ** 2, 1)
  blk_s = np.repeat(np.arange(len(sizes)), sizes)
  rng = np.random.default_rng(seed)
  null_p = np.array([np.mean(_block_hms(unit_se, sq_s, blk_s, sizes, rng.permutation(
      len(members)))) for _ in range(n_perm)])
  return {'observed': observed, 'null_mean': float(null_p.mean()),
          'null_std': float(null_p.std()), 'p_value': p_value(observed, null_p), 'null': null_p}


def hms_from_labels(labels_n: np.ndarray, acts_in: np.ndarray, emb_ie: np.ndarray, *,
                    n_perm: int = 200, seed: int = 0, prefix: str = 'hms'
                    ) -> tuple[dict, np.ndarray]:
  """`hms_report` for a [n] concept-id vector instead of a hierarchy dict."""
  proto_ne, fired_n = prototypes(acts_in, emb_ie)
  h = hms(labels_n, proto_ne, fired_n)
  null = hms_null(labels_n, proto_ne, fired_n, n_perm=n_perm, seed=seed)
  flat = {f'{prefix}/{k}': h[k] for k in ('mean', 'median', 'min', 'max', 'concepts_ge2',
                                          'coverage', 'excluded_never_fired')}
  flat.update({f'{prefix}/null_mean': null['null_mean'], f'{prefix}/null_std': null['null_std'],
               f'{prefix}/minus_null': h['mean'] - null['null_mean'],
               f'{prefix}/p_value': null['p_value'], f'{prefix}/fired': int(fired_n.sum())})
  return flat, h['per_concept']


def hms_report(hierarchy: dict, acts_in: np.ndarray, emb_ie: np.ndarray, *, n_perm: int = 200,
               seed: int = 0, prefix: str = 'hms') -> tuple[dict, np.ndarray]:
  """(flat metrics `<prefix>/...`, per-concept HMS array for plots) of a hierarchy.json."""
  labels_n = hierarchy_lib.labels(hierarchy, np.shape(acts_in)[1])
  return hms_from_labels(labels_n, acts_in, emb_ie, n_perm=n_perm, seed=seed, prefix=prefix)


def synthetic_hms(hierarchy: dict, codes_tn: np.ndarray, parent_active_tk: np.ndarray, *,
                  n_perm: int = 200, seed: int = 0, prefix: str = 'synthetic_hms'
                  ) -> tuple[dict, np.ndarray]:
  """HMS with each sample a one-token image and the true active-parent indicator as its
  embedding: siblings fire on samples sharing their parent, so a hierarchy that groups true
  siblings scores well above its null and a random one near it (validates the HMS code)."""
  codes_tn = np.asarray(codes_tn)
  if len(parent_active_tk) != len(codes_tn):
    raise ValueError(f'parent_active_tk has {len(parent_active_tk)} rows, codes_tn '
                     f'{len(codes_tn)}: pass the ground truth of the same samples')
  return hms_report(hierarchy, codes_tn.astype(np.float32), np.asarray(parent_active_tk,
                    np.float32), n_perm=n_perm, seed=seed, prefix=prefix)
