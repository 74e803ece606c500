"""TopK SAE (Gao et al. 2024): each input keeps its k largest (ReLU'd) pre-activations.

`k` may be a Python int or a traced scalar (k annealing): the k-th largest value of each row
comes from `select.kth_largest`, so a changing k never recompiles the step.
"""

from __future__ import annotations

import jax.numpy as jnp

from csae_jax.saes import base, select, sparse


def topk_codes(acts_bn, k, use_top_k: bool = False):
  """use_top_k (a static k, latents not sharded): the same codes by `lax.top_k`."""
  if use_top_k and isinstance(k, int):
    thr_b1 = sparse.row_threshold(acts_bn, k)
  else:
    thr_b1 = select.kth_largest(acts_bn, k, axis=-1)[:, None]
  return jnp.where((acts_bn >= thr_b1) & (acts_bn > 0), acts_bn, 0.0)


ARCH = base.Arch(
    name='topk', unit_decoder=True,
    train_codes=lambda p, acts, k, valid, h: topk_codes(acts, k, h.select_top_k),  # padding
    # rows: the caller masks them
    infer_codes=lambda p, acts, k, thr: topk_codes(acts, k))
