"""BatchTopK SAE (Bussmann et al. 2024): the batch keeps its k * batch largest activations.

Training selects over the whole batch, so per-input sparsity adapts (k on average). Inference
cannot depend on the batch: `infer_codes` uses a learned threshold theta (EMA of the smallest
kept activation), so an exported BatchTopK SAE behaves like a JumpReLU with one shared threshold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from csae_jax.saes import base, codes as codes_lib, select, sparse


def batch_threshold(acts_bn: Float[Array, 'b n'], k, valid_b=None, use_top_k: bool = False
                    ) -> jax.Array:
  """The (k * n_valid)-th largest activation of the batch (rows with valid_b False excluded).

  k and the row mask (joint mode's live atoms) may be traced: nothing recompiles when they
  change. `select.kth_largest` needs no gather of the latent-sharded activations; use_top_k
  (a static k, latents not sharded) finds the same value from each row's top candidates.
  """
  n_valid = acts_bn.shape[0]
  if valid_b is not None:
    acts_bn = jnp.where(valid_b[:, None], acts_bn, 0.0)
    n_valid = jnp.sum(valid_b)
  total = jnp.maximum(jnp.asarray(k) * n_valid, 1)
  if use_top_k and isinstance(k, int):
    return sparse.batch_threshold(acts_bn, total, k)
  return select.kth_largest(acts_bn, total)


def train_codes(acts_bn: Float[Array, 'b n'], k, valid_b=None, use_top_k: bool = False
                ) -> Float[Array, 'b n']:
  thr = batch_threshold(acts_bn, k, valid_b, use_top_k)
  keep = (acts_bn >= thr) & (acts_bn > 0)
  if valid_b is not None:
    keep &= valid_b[:, None]
  return jnp.where(keep, acts_bn, 0.0)


def infer_codes(acts_bn: Float[Array, 'b n'], threshold) -> Float[Array, 'b n']:
  return jnp.where(acts_bn > threshold, acts_bn, 0.0)


def update_threshold(threshold, codes, decay, enabled):
  """EMA of the minimum positive kept activation; the first update sets it (no zero bias).
  codes: dense [B, n] or the sparse step's pairs (`codes.Codes`)."""
  min_pos = codes_lib.min_positive(codes)
  ok = enabled & jnp.isfinite(min_pos)
  new = jnp.where(threshold < 0, min_pos, decay * threshold + (1 - decay) * min_pos)
  return jnp.where(ok, new, threshold)


ARCH = base.Arch(
    name='batch_topk', unit_decoder=True,
    train_codes=lambda p, acts, k, valid, h: train_codes(acts, k, valid, h.select_top_k),
    infer_codes=lambda p, acts, k, thr: infer_codes(acts, thr),
    update_threshold=update_threshold)
