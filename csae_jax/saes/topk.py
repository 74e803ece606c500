"""TopK SAE (Gao et al. 2024): each input keeps its k largest (ReLU'd) pre-activations.

The sparsifier is the only part that differs between architectures; the rest is in common.py.
`k` may be a Python int or a traced scalar (k annealing): the k-th largest value of each row
comes from `select.kth_largest`, so a changing k never recompiles the step.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from csae_jax.saes import select

name = 'topk'


def train_codes(acts_bn: Float[Array, 'b n'], k, valid_b=None) -> Float[Array, 'b n']:
  del valid_b  # per-row rule: padding rows are masked by the caller's loss
  thr_b1 = select.kth_largest(acts_bn, k, axis=-1)[:, None]
  return jnp.where((acts_bn >= thr_b1) & (acts_bn > 0), acts_bn, 0.0)


def infer_codes(acts_bn: Float[Array, 'b n'], k: int, threshold) -> Float[Array, 'b n']:
  del threshold  # TopK is the same rule at inference
  return train_codes(acts_bn, k)


def update_threshold(threshold, codes_bn, decay, enabled):
  del codes_bn, decay, enabled
  return threshold
