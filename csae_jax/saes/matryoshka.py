"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024), the CSAE paper's strongest
baseline: one global BatchTopK over the whole dictionary; the loss is the mean over the nested
prefixes [0, m_1), [0, m_2), ..., [0, n) of the reconstruction error using only that prefix's
latents, so early latents must reconstruct alone (general concepts) and later ones refine.
"""

from __future__ import annotations

import jax.numpy as jnp

from csae_jax.saes import base, batch_topk


def prefix_losses(params, codes_bn, target_bd, valid_b, groups):
  """[G] reconstruction error of each cumulative prefix (group sizes `groups`, summing to n)."""
  x_hat_bd = jnp.broadcast_to(params['b_dec'], target_bd.shape)
  out, start = [], 0
  for size in groups:  # static sizes: plain slices, one partial decode per group
    stop = start + size
    x_hat_bd = x_hat_bd + codes_bn[:, start:stop] @ params['w_dec'][start:stop]
    out.append(base.masked_mean(jnp.sum((x_hat_bd - target_bd) ** 2, -1), valid_b))
    start = stop
  return jnp.stack(out)


ARCH = base.Arch(
    name='matryoshka', unit_decoder=True,
    train_codes=lambda p, acts, k, valid, h: batch_topk.train_codes(acts, k, valid,
                                                                   h.select_top_k),
    infer_codes=lambda p, acts, k, thr: batch_topk.infer_codes(acts, thr),
    recon_loss=lambda p, codes, target, valid, h: jnp.mean(
        prefix_losses(p, codes, target, valid, h.groups)),
    update_threshold=batch_topk.update_threshold)
