"""ReLU SAE with an L1 penalty weighted by decoder row norms (Anthropic, April 2024 update).

The decoder is left unconstrained: penalising f_i * ||d_i|| instead of f_i makes shrinking a
row and growing its code equivalent, so the penalty cannot be dodged by rescaling. The
coefficient warms up linearly over `sparsity_warmup_steps` (dead latents otherwise).
"""

from __future__ import annotations

import jax.numpy as jnp

from csae_jax.saes import base


def sparsity_loss(params, acts_bn, codes_bn, h, step, valid_b):
  norms_n = jnp.linalg.norm(params['w_dec'], axis=-1)
  penalty_b = jnp.sum(codes_bn * norms_n, -1)
  return h.l1_coeff * base.warmup(step, h.sparsity_warmup_steps) * base.masked_mean(
      penalty_b, valid_b)


ARCH = base.Arch(
    name='relu_l1', unit_decoder=False,
    train_codes=lambda p, acts, k, valid, h: acts,
    infer_codes=lambda p, acts, k, thr: acts,
    sparsity_loss=sparsity_loss)
