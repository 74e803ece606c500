"""Parents of a Matryoshka SAE's outer latents among its inner latents (two rules, both reported).

With groups [n2, n1 - n2] the inner prefix [0, n2) must reconstruct alone and so learns general
directions; the outer latents [n2, n1) refine them. Each outer feature gets an inner parent by
  conditional: the inner feature with the highest P(inner active | outer active) on the
               evaluation set (behaviour: which general feature is on when this one is), or
  cosine:      the inner feature whose decoder row is most aligned with the outer one's
               (geometry: which general direction this one refines).
They disagree when a refinement co-fires with a general feature it is not aligned with, which is
why the comparison reports both. Outputs are indexed by outer position o = latent - n_inner.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from csae_jax.baselines import coactivation

# Outer rows per cosine block: bounds the [block, n_inner] similarity matrix's memory.
_COSINE_BLOCK = 4096


def _check_split(n: int, n_inner: int, what: str) -> None:
  if not 0 < n_inner < n:
    raise ValueError(f'{what}: n_inner = {n_inner} must split the {n} latents into a non-empty '
                     f'inner prefix and outer rest (0 < n_inner < {n}); with matryoshka_groups '
                     f'"n2,n1-n2" pass n_inner = n2')


def _check_alive(alive_n, n: int, what: str) -> np.ndarray:
  if alive_n is None:
    return np.ones(n, bool)
  if np.shape(alive_n) != (n,):
    raise ValueError(f'{what}: alive_n must be a [{n}] mask, got shape {np.shape(alive_n)}')
  return np.asarray(alive_n, bool)


def parents_conditional(counts_nm: np.ndarray, fires_n: np.ndarray, n_inner: int,
                        alive_n: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(parent_o, strength_o) over the n - n_inner outer latents: parent = argmax_i P(i | o).

  counts_nm: co-firing counts of all n latents (rows) with the first m >= n_inner latents
  (columns), e.g. `CoactivationCounter(n, n)` or, cheaper, `CoactivationCounter(n, n_inner)` fed
  `(codes_bn, codes_bn[:, :n_inner])`. fires_n: [n] firing counts. Since P(i | o) =
  counts[o, i] / fires[o] shares its denominator across i, this is the co-activation rule on the
  (outer, inner) block: strength = P(parent | o); -1 for an outer feature that never fires, never
  co-fires with an inner one, or is not alive; ties go to the lowest inner index.
  """
  counts_nm, fires_n = np.asarray(counts_nm), np.asarray(fires_n)
  n = len(fires_n)
  _check_split(n, n_inner, 'parents_conditional')
  if counts_nm.ndim != 2 or counts_nm.shape[0] != n or counts_nm.shape[1] < n_inner:
    raise ValueError(f'parents_conditional needs counts [{n}, m >= {n_inner}] (all latents x the '
                     f'inner ones) for fires of shape {fires_n.shape}, got counts of shape '
                     f'{counts_nm.shape}')
  alive = _check_alive(alive_n, n, 'parents_conditional')
  return coactivation.parents_by_coactivation(counts_nm[n_inner:, :n_inner], fires_n[n_inner:],
                                              alive[n_inner:])


def parents_conditional_from_codes(codes_batches: Iterable[np.ndarray], n_inner: int,
                                   alive_n: np.ndarray | None = None
                                   ) -> tuple[np.ndarray, np.ndarray]:
  """`parents_conditional` streamed from batches of codes [t, n]: counts only the [n, n_inner]
  block the rule reads (n_inner / n of the full matrix's memory)."""
  counter = None
  for codes_tn in codes_batches:
    if counter is None:
      if np.ndim(codes_tn) != 2:
        raise ValueError(f'codes batches must be [t, n], got shape {np.shape(codes_tn)}')
      n = np.shape(codes_tn)[1]
      _check_split(n, n_inner, 'parents_conditional_from_codes')
      counter = coactivation.CoactivationCounter(n, n_inner)
    counter.add(codes_tn, codes_tn[:, :n_inner])
  if counter is None:
    raise ValueError('parents_conditional_from_codes got no batches; raise data.eval_rows')
  return parents_conditional(counter.counts, counter.fires_a, n_inner, alive_n)


def parents_decoder_cosine(w_dec_nd: np.ndarray, n_inner: int,
                           alive_n: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(parent_o, strength_o) over the outer latents: parent = the inner latent whose decoder row
  has the highest cosine with the outer one's; strength = that cosine.

  Every alive outer feature gets a parent (the rule has no threshold; a low or negative strength
  says the match is poor). Dead inner latents (alive_n False) are never parents; dead outer ones
  get -1; ties go to the lowest inner index.
  """
  w_nd = np.asarray(w_dec_nd, np.float64)
  if w_nd.ndim != 2:
    raise ValueError(f'parents_decoder_cosine needs the decoder [n, d], got shape {w_nd.shape}')
  n = w_nd.shape[0]
  _check_split(n, n_inner, 'parents_decoder_cosine')
  alive = _check_alive(alive_n, n, 'parents_decoder_cosine')
  u_nd = w_nd / np.maximum(np.linalg.norm(w_nd, axis=1, keepdims=True), 1e-12)
  inner_id, u_inner = np.nonzero(alive[:n_inner])[0], u_nd[:n_inner][alive[:n_inner]]
  n_outer = n - n_inner
  parent_o, strength_o = np.full(n_outer, -1, np.int64), np.zeros(n_outer)
  if not len(inner_id):
    return parent_o, strength_o
  for lo in range(0, n_outer, _COSINE_BLOCK):
    cos_oi = u_nd[n_inner + lo:n_inner + lo + _COSINE_BLOCK] @ u_inner.T
    best = np.argmax(cos_oi, axis=1)  # first maximum: lowest inner index
    parent_o[lo:lo + len(best)] = inner_id[best]
    strength_o[lo:lo + len(best)] = cos_oi[np.arange(len(best)), best]
  dead_o = ~alive[n_inner:]
  parent_o[dead_o], strength_o[dead_o] = -1, 0.0
  return parent_o, strength_o
