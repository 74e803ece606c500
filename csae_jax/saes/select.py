"""Exact k-th largest of non-negative values by bisection on their float bit patterns.

For x >= 0 the int32 bit pattern of a float32 is monotone in x, so 31 halvings of [0, +inf)
find the exact k-th largest value with one compare-and-count pass each. Why not `lax.top_k`:
  * speed: on CPU it is ~10x faster for BatchTopK over a [1024, 128] batch (1.6 vs 15.7 ms,
    measured) and 6x faster per row;
  * k may be a traced scalar (k annealing, a row mask) without a sort or a recompile;
  * sharding: each pass is a sum, so activations sharded over latents need one scalar
    all-reduce per pass instead of gathering the whole [batch, n_latents] array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_INF_BITS = 0x7F800000
_MIN_NORMAL_BITS = 0x00800000


def kth_largest(acts_nonneg: jax.Array, k, axis: int | None = None,
                passes: int = 31) -> jax.Array:
  """k-th largest entry (over all entries, or along `axis` = -1 per row) of a non-negative array.

  Returns 0 where fewer than k entries are positive, so `acts >= result & acts > 0` then keeps
  every positive entry. Ties at the threshold keep all tied entries (measure zero for floats).
  passes < 31 stops the bisection early: the result is then a lower bound, at least k entries are
  >= it, within 2 ** (31 - passes) float steps (ulps) of the k-th largest (`sparse.select_batch`).
  """
  if axis not in (None, -1):
    raise ValueError('kth_largest supports axis=None (whole array) or axis=-1 (per row)')
  batch_shape = () if axis is None else acts_nonneg.shape[:-1]
  k = jnp.asarray(k)

  def body(_, lo_hi):
    lo, hi = lo_hi
    mid = lo + (hi - lo) // 2
    t = jax.lax.bitcast_convert_type(mid, jnp.float32)
    t = t if axis is None else t[..., None]
    ok = jnp.sum(acts_nonneg >= t, axis=axis) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo = jnp.zeros(batch_shape, jnp.int32)
  hi = jnp.full(batch_shape, _INF_BITS, jnp.int32)
  lo, _ = jax.lax.fori_loop(0, passes, body, (lo, hi))
  # XLA CPU flushes subnormals to zero in compares, so with fewer than k positive entries the
  # search ends on a subnormal that compares like 0: report it as the 0 it behaves as.
  lo = jnp.where(lo < _MIN_NORMAL_BITS, 0, lo)
  return jax.lax.bitcast_convert_type(lo, jnp.float32)


def kth_largest_from(acts_nonneg: jax.Array, k, lower: jax.Array) -> jax.Array:
  """`kth_largest(acts_nonneg, k)` (whole array) given a lower bound: at least k entries are
  >= lower (or lower = 0). The bisection runs from [lower, max] until it is exact, so a close
  bound saves passes (a `while_loop`: ~20 instead of 31 over the BatchTopK blocks)."""
  k = jnp.asarray(k)
  lo = jax.lax.bitcast_convert_type(jnp.asarray(lower, jnp.float32), jnp.int32)
  hi = jax.lax.bitcast_convert_type(jnp.max(acts_nonneg).astype(jnp.float32), jnp.int32) + 1

  def body(lo_hi):
    lo, hi = lo_hi
    mid = lo + (hi - lo) // 2
    ok = jnp.sum(acts_nonneg >= jax.lax.bitcast_convert_type(mid, jnp.float32)) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.while_loop(lambda lo_hi: lo_hi[1] - lo_hi[0] > 1, body,
                             (lo, jnp.maximum(hi, lo + 1)))
  lo = jnp.where(lo < _MIN_NORMAL_BITS, 0, lo)  # as in kth_largest
  return jax.lax.bitcast_convert_type(lo, jnp.float32)
