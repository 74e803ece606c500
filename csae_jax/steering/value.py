"""The paper's clamp value: v = s * u, u the per-concept scale measured on a harvest.

A concept's per-image activation is the sum over its members of the member's mean code over the
image's tokens; its top images rank by it. u is the mean of the members' per-token codes above
0.5 * max(threshold, 1) on the top-10 images (per token, not pooled: the clamp overrides per-token
codes), averaged per image then over the images with any such code; max(threshold, 1) when none
has one (the reference code's rule, PAPER.md). Codes are the SAE's inference codes.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from csae_jax.evals import recon
from csae_jax.steering import interventions as iv
from csae_jax.steering import rows as rows_lib

STRENGTH = 3.0       # the paper's s
TOP_IMAGES = 10      # images the scale is measured on
CODE_CUTOFF = 0.5    # codes above CODE_CUTOFF * max(threshold, 1) count


@functools.partial(jax.jit, static_argnames=('arch', 'k', 'n_seg'))
def _segment_scores(params, threshold, x_bd, seg_b, groups_ng, *, arch, k, n_seg):
  codes_bn = recon.encode(params, x_bd, threshold, arch=arch, k=k)
  return jax.ops.segment_sum(codes_bn @ groups_ng, seg_b, num_segments=n_seg)


def group_matrix(n_latents: int, groups: list[list[int]]) -> np.ndarray:
  """[n, G] 0/1: column g marks group g's members."""
  m = np.zeros((n_latents, len(groups)), np.float32)
  for g, members in enumerate(groups):
    m[np.asarray(members, np.int64), g] = 1.0
  return m


def image_scores(sae: iv.SAE, rows: rows_lib.Rows, groups: list[list[int]], *,
                 batch_rows: int = 4096, desc: str = 'concept activations') -> np.ndarray:
  """[n_images, G]: per image, the sum over each group's members of their mean code over the
  image's tokens (one pass over every row)."""
  if rows.d != sae.d:
    raise ValueError(f'the harvest rows have d = {rows.d} but the SAE has d = {sae.d}; use the '
                     'harvest of the site the SAE was trained on')
  n_img = rows.n_images
  sums = np.zeros((n_img, len(groups)), np.float64)
  counts = np.bincount(rows.image_id_r, minlength=n_img).astype(np.float64)
  m = jnp.asarray(group_matrix(sae.n_latents, groups))
  thr = jnp.float32(sae.threshold)
  n_rows = len(rows.image_id_r)
  bar = tqdm(total=n_rows, desc=desc, unit='row', file=sys.stderr, dynamic_ncols=True,
             mininterval=1.0, disable=n_rows < 20 * batch_rows)
  for x_bd, img_b in rows.batches(batch_rows):
    uniq, local = np.unique(img_b, return_inverse=True)
    pad = batch_rows - len(x_bd)  # one compilation: the last batch is padded (segment -> dropped)
    x = np.pad(x_bd, ((0, pad), (0, 0)))
    seg = np.pad(local, (0, pad), constant_values=batch_rows)  # out of range: dropped
    s = np.asarray(_segment_scores(sae.params, thr, jnp.asarray(x), jnp.asarray(seg, jnp.int32),
                                   m, arch=sae.arch, k=sae.k, n_seg=batch_rows))
    sums[uniq] += s[:len(uniq)]
    bar.update(len(x_bd))
  bar.close()
  return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)


def top_images(scores_i: np.ndarray, n: int = TOP_IMAGES) -> np.ndarray:
  """The n images with the highest positive score, best first (fewer if fewer are positive)."""
  order = np.argsort(-scores_i, kind='stable')
  return order[scores_i[order] > 0][:n]


def cutoff(sae: iv.SAE) -> float:
  return CODE_CUTOFF * max(float(sae.threshold), 1.0)


def scale_from_codes(codes_rm: np.ndarray, image_r: np.ndarray, cut: float, fallback: float
                     ) -> float:
  """u: per image the mean of the codes above `cut`, then the mean over images."""
  per_image = []
  for i in np.unique(image_r):
    vals = codes_rm[image_r == i]
    vals = vals[vals > cut]
    if vals.size:
      per_image.append(float(vals.mean()))
  return float(np.mean(per_image)) if per_image else fallback


def member_codes(sae: iv.SAE, rows: rows_lib.Rows, image_ids: np.ndarray, members: list[int]
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(codes [R, m] of the members on every row of the images, image id [R])."""
  x_rd, img_r = rows.of_images(image_ids)
  codes = np.asarray(iv.encode(sae, jnp.asarray(x_rd)))[:, np.asarray(members, np.int64)]
  return codes, img_r


def concept_scale(sae: iv.SAE, rows: rows_lib.Rows, members: list[int], top_ids: np.ndarray
                  ) -> tuple[float, np.ndarray]:
  """(u, per-member strength [m]: the sum over the top images of each member's mean code)."""
  fallback = max(float(sae.threshold), 1.0)
  if len(top_ids) == 0:
    return fallback, np.zeros(len(members), np.float32)
  codes, img_r = member_codes(sae, rows, top_ids, members)
  u = scale_from_codes(codes, img_r, cutoff(sae), fallback)
  strength = sum(codes[img_r == i].mean(0) for i in np.unique(img_r))
  return u, np.asarray(strength, np.float32)
