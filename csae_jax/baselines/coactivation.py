"""Co-activation counts between two dictionaries, and the parent rule built on them.

The flat baseline trains separate SAEs of n1 and n2 latents on the same activations; each n1
feature's parent is the n2 feature it fires together with most often on the evaluation set.
Matryoshka's conditional rule is the same count restricted to (outer, inner) pairs.

Counting is binary (active = code > 0). Per batch the [n_a, n_b] count matrix is one matmul of
0/1 indicators on the device, accumulated there in int32 and flushed into host int64 totals
before an int32 could overflow, so only the final totals (not every batch's matrix) cross to the
host, and the totals do not depend on how the evaluation set is batched.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

# Sums of 0/1 values in float32 are exact below 2^24, so one matmul may cover at most this many
# rows; longer batches are split.
_MAX_MATMUL_ROWS = 1 << 24
# The device accumulator is int32: flush to the host before this many rows could overflow it.
_MAX_DEVICE_ROWS = (1 << 31) - 1


@functools.partial(jax.jit, donate_argnums=(0, 1, 2))
def _accumulate(counts_ab, fires_a, fires_b, codes_a_tn, codes_b_tm):
  # 0/1 indicators are exact in bfloat16 (the fast matmul path on accelerators); the products are
  # summed in float32 (preferred_element_type), exact below 2^24 rows.
  on_a = (codes_a_tn > 0).astype(jnp.bfloat16)
  on_b = (codes_b_tm > 0).astype(jnp.bfloat16)
  batch_ab = jnp.einsum('ta,tb->ab', on_a, on_b, preferred_element_type=jnp.float32)
  return (counts_ab + batch_ab.astype(jnp.int32),
          fires_a + jnp.sum(codes_a_tn > 0, 0, dtype=jnp.int32),
          fires_b + jnp.sum(codes_b_tm > 0, 0, dtype=jnp.int32))


def _pad_rows(x_tn: jax.Array, rows: int) -> jax.Array:
  return jnp.pad(x_tn, ((0, rows - x_tn.shape[0]), (0, 0))) if rows > x_tn.shape[0] else x_tn


class CoactivationCounter:
  """Streaming counts of how often feature a (of n_a) and feature b (of n_b) fire together.

  `counts` [n_a, n_b], `fires_a` [n_a], `fires_b` [n_b] and `n_rows` are int64 host totals.
  """

  def __init__(self, n_a: int, n_b: int):
    if n_a < 1 or n_b < 1:
      raise ValueError(f'CoactivationCounter needs n_a >= 1 and n_b >= 1 features, got n_a = '
                       f'{n_a}, n_b = {n_b}')
    self.n_a, self.n_b = int(n_a), int(n_b)
    self._host = (np.zeros((n_a, n_b), np.int64), np.zeros(n_a, np.int64),
                  np.zeros(n_b, np.int64))
    self._device = None
    self._device_rows = 0
    self.n_rows = 0

  def _zeros(self):
    return (jnp.zeros((self.n_a, self.n_b), jnp.int32), jnp.zeros(self.n_a, jnp.int32),
            jnp.zeros(self.n_b, jnp.int32))

  def _flush(self) -> None:
    if self._device is not None:
      dev = jax.device_get(self._device)
      self._host = tuple(h + np.asarray(d, np.int64) for h, d in zip(self._host, dev))
    self._device, self._device_rows = None, 0

  def add(self, codes_a_tn: Float[Array, 't n_a'] | np.ndarray,
          codes_b_tm: Float[Array, 't n_b'] | np.ndarray) -> None:
    """Adds one batch: codes of the same t inputs under both dictionaries."""
    a_shape, b_shape = np.shape(codes_a_tn), np.shape(codes_b_tm)
    if (len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[0]
        or a_shape[1] != self.n_a or b_shape[1] != self.n_b):
      raise ValueError(f'CoactivationCounter.add needs codes [t, {self.n_a}] and [t, {self.n_b}] '
                       f'of the same t inputs, got shapes {a_shape} and {b_shape}')
    t = a_shape[0]
    for lo in range(0, t, _MAX_MATMUL_ROWS):
      a = jnp.asarray(codes_a_tn[lo:lo + _MAX_MATMUL_ROWS])
      b = jnp.asarray(codes_b_tm[lo:lo + _MAX_MATMUL_ROWS])
      rows = a.shape[0]
      if self._device_rows + rows > _MAX_DEVICE_ROWS:
        self._flush()
      # Pad to a power of two (zero rows fire nothing): a short last batch reuses a compiled
      # shape instead of compiling a new one per length.
      padded = max(8, 1 << (rows - 1).bit_length())
      self._device = _accumulate(*(self._device or self._zeros()), _pad_rows(a, padded),
                                 _pad_rows(b, padded))
      self._device_rows += rows
      self.n_rows += rows

  @property
  def counts(self) -> np.ndarray:
    self._flush()
    return self._host[0].copy()

  @property
  def fires_a(self) -> np.ndarray:
    self._flush()
    return self._host[1].copy()

  @property
  def fires_b(self) -> np.ndarray:
    self._flush()
    return self._host[2].copy()


def parents_by_coactivation(counts_ab: np.ndarray, fires_a: np.ndarray,
                            alive_a: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(parent_a, strength_a): each a-feature's parent is the b-feature it co-fires with most.

  strength = P(b active | a active) of that parent = counts[a, parent] / fires_a[a]. parent is -1
  (strength 0) when a never fires, never co-fires with any b, or is not in `alive_a`. Ties (two
  b-features with the same count) go to the lowest b index, so the rule is deterministic.
  """
  counts_ab = np.asarray(counts_ab)
  fires_a = np.asarray(fires_a)
  if counts_ab.ndim != 2 or fires_a.shape != (counts_ab.shape[0],):
    raise ValueError(f'parents_by_coactivation needs counts [n_a, n_b] and fires_a [n_a], got '
                     f'shapes {counts_ab.shape} and {fires_a.shape}')
  if counts_ab.shape[1] == 0:
    raise ValueError(f'parents_by_coactivation needs at least one b-feature, got counts of '
                     f'shape {counts_ab.shape}')
  if alive_a is not None and np.shape(alive_a) != fires_a.shape:
    raise ValueError(f'alive_a must be a [{len(fires_a)}] mask, got shape {np.shape(alive_a)}')
  parent_a = np.argmax(counts_ab, axis=1).astype(np.int64)  # first maximum: lowest index
  best_a = counts_ab[np.arange(len(parent_a)), parent_a].astype(np.float64)
  ok_a = (best_a > 0) & (fires_a > 0)
  if alive_a is not None:
    ok_a &= np.asarray(alive_a, bool)
  strength_a = np.where(ok_a, best_a / np.maximum(fires_a, 1), 0.0)
  return np.where(ok_a, parent_a, -1), strength_a
