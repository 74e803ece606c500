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

  lo = jnp.zeros(batch_shape, jnp.int32)
  hi = jnp.full(batch_shape, _INF_BITS, jnp.int32)
  halve = _halving(acts_nonneg, k, axis)
  lo, _ = jax.lax.fori_loop(0, passes, lambda _, lo_hi: halve(lo_hi), (lo, hi))
  return _as_float(lo)


def _halving(acts_nonneg, k, axis):
  """One bisection step on bit patterns: keeps count(acts >= lo) >= k > count(acts >= hi)."""
  def halve(lo_hi):
    lo, hi = lo_hi
    mid = lo + (hi - lo) // 2
    t = jax.lax.bitcast_convert_type(mid, jnp.float32)
    t = t if axis is None else t[..., None]
    ok = jnp.sum(acts_nonneg >= t, axis=axis) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)
  return halve


def _as_float(lo_bits):
  # XLA CPU flushes subnormals to zero in compares, so with fewer than k positive entries the
  # search ends on a subnormal that compares like 0: report it as the 0 it behaves as.
  lo_bits = jnp.where(lo_bits < _MIN_NORMAL_BITS, 0, lo_bits)
  return jax.lax.bitcast_convert_type(lo_bits, jnp.float32)


def kth_largest_from(acts_nonneg: jax.Array, k, lower: jax.Array) -> jax.Array:
  """`kth_largest(acts_nonneg, k)` (whole array) given a lower bound: at least k entries are
  >= lower (or lower = 0). The bisection runs from [lower, max] until it is exact, so a close
  bound saves passes (a `while_loop`: ~20 instead of 31 over the BatchTopK blocks)."""
  lo = jax.lax.bitcast_convert_type(jnp.asarray(lower, jnp.float32), jnp.int32)
  hi = jax.lax.bitcast_convert_type(jnp.max(acts_nonneg).astype(jnp.float32), jnp.int32) + 1
  lo, _ = jax.lax.while_loop(lambda lo_hi: lo_hi[1] - lo_hi[0] > 1,
                             _halving(acts_nonneg, jnp.asarray(k), None),
                             (lo, jnp.maximum(hi, lo + 1)))
  return _as_float(lo)
