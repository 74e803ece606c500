"""Matryoshka parent rules: a constructed SAE where the conditional and the cosine rule disagree,
each giving its own known answer."""

import numpy as np
import pytest

from csae_jax.baselines import coactivation, matryoshka

N_INNER = 2


def _case():
  """5 latents, inner = {0, 1}, outer = {2, 3, 4} (outer positions 0, 1, 2).

  decoder: inner 0 = e0, inner 1 = e1; outer 2 = (3 e0 + 4 e2) / 5 (cos 0.6 with inner 0, 0 with
  inner 1); outer 3 = (e1 + e3) / sqrt 2 (cos 1/sqrt2 with inner 1); outer 4 = e0 (never fires).
  codes over 8 inputs: outer 2 fires on rows 0-3, with inner 1 on rows 0-2 and inner 0 on row 3
  (P(1 | 2) = 3/4, P(0 | 2) = 1/4); outer 3 fires on rows 4, 5, with inner 0 on both (P = 1).
  So conditional: 2 -> 1, 3 -> 0, 4 -> -1; cosine: 2 -> 0, 3 -> 1, 4 -> 0.
  """
  w = np.zeros((5, 4))
  w[0, 0] = w[4, 0] = 1.0
  w[1, 1] = 1.0
  w[2, [0, 2]] = [0.6, 0.8]
  w[3, [1, 3]] = 2.0  # norm 2.8: the cosine rule must normalise
  codes = np.zeros((8, 5), np.float32)
  codes[0:4, 2] = 1.5
  codes[0:3, 1] = 0.7
  codes[3, 0] = 0.2
  codes[4:6, 3] = 0.9
  codes[4:6, 0] = 2.0
  codes[6, 1] = 1.0  # inner-only rows change no outer parent
  return w, codes


def _counts(codes, m):
  counter = coactivation.CoactivationCounter(codes.shape[1], m)
  counter.add(codes, codes[:, :m])
  return counter.counts, counter.fires_a


def test_conditional_and_cosine_rules_disagree_each_with_its_known_answer():
  w, codes = _case()
  counts, fires = _counts(codes, 5)
  parent_c, strength_c = matryoshka.parents_conditional(counts, fires, N_INNER)
  np.testing.assert_array_equal(parent_c, [1, 0, -1])
  np.testing.assert_allclose(strength_c, [3 / 4, 1.0, 0.0])
  parent_g, strength_g = matryoshka.parents_decoder_cosine(w, N_INNER)
  np.testing.assert_array_equal(parent_g, [0, 1, 0])
  np.testing.assert_allclose(strength_g, [0.6, 1 / np.sqrt(2), 1.0])


def test_conditional_counts_layouts_and_streaming_agree():
  w, codes = _case()
  full = matryoshka.parents_conditional(*_counts(codes, 5), N_INNER)
  block = matryoshka.parents_conditional(*_counts(codes, N_INNER), N_INNER)
  streamed = matryoshka.parents_conditional_from_codes([codes[:3], codes[3:]], N_INNER)
  for got in (block, streamed):
    np.testing.assert_array_equal(got[0], full[0])
    np.testing.assert_allclose(got[1], full[1])


def test_alive_mask_dead_inner_is_never_a_parent_and_dead_outer_gets_none():
  w, codes = _case()
  alive = np.array([False, True, True, True, False])  # inner 0 and outer 4 dead
  parent_g, _ = matryoshka.parents_decoder_cosine(w, N_INNER, alive)
  # outer 2 falls back to inner 1 (cosine 0 but the only alive inner); outer 4 is dead
  np.testing.assert_array_equal(parent_g, [1, 1, -1])
  parent_c, _ = matryoshka.parents_conditional(*_counts(codes, 5), N_INNER, alive)
  np.testing.assert_array_equal(parent_c, [1, 0, -1])  # dead inner 0 never co-fires in practice
  no_inner = np.array([False, False, True, True, True])
  parent_none, _ = matryoshka.parents_decoder_cosine(w, N_INNER, no_inner)
  np.testing.assert_array_equal(parent_none, [-1, -1, -1])


def test_value_errors():
  w, codes = _case()
  counts, fires = _counts(codes, 5)
  for bad in (0, 5):
    with pytest.raises(ValueError, match=f'n_inner = {bad}'):
      matryoshka.parents_conditional(counts, fires, bad)
    with pytest.raises(ValueError, match=f'n_inner = {bad}'):
      matryoshka.parents_decoder_cosine(w, bad)
  with pytest.raises(ValueError, match=r'got counts of shape \(5, 1\)'):
    matryoshka.parents_conditional(counts[:, :1], fires, N_INNER)
  with pytest.raises(ValueError, match=r'\[5\] mask'):
    matryoshka.parents_decoder_cosine(w, N_INNER, np.ones(4, bool))
  with pytest.raises(ValueError, match='no batches'):
    matryoshka.parents_conditional_from_codes([], N_INNER)
