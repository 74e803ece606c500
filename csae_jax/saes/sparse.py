"""The k-sparse SAE forward and backward (TopK, BatchTopK, AuxK): dense work only where it must be.

A k-sparse SAE's only dense work is the encoder GEMM that scores every latent. Everything after
the selection touches the S = k * batch selected (input, latent) pairs only. Autodiff of the
dense formulation instead runs four more [batch, n] x [n, d] GEMMs (the decode, its two
gradients and the encoder-weight gradient), which is what made the dense step slow.

`sparse_sae` is one `jax.custom_vjp`:
  forward   pre = ReLU((x - b_dec) W_enc + b_enc)    the one dense GEMM, [B, n]
            select k per row (TopK) or the k B largest of the batch (BatchTopK), and the k_aux
            largest dead latents per row (AuxK, skipped by a `lax.cond` when none is dead)
            x_hat = b_dec + sum over pairs of v * W_dec[j]         (scatter-add, chunked)
  backward  per pair (b, j): dv = <g_b, W_dec[j]>, dpre = dv * [v > 0]
            dW_dec[j] += v g_b,  dW_enc[:, j] += dpre (x_b - b_dec),  db_enc[j] += dpre
            db_dec = sum_b g_b - W_enc db_enc
No [B, n] array is kept for the backward (only the pairs), and no [S, d] array is ever built:
pairs are processed in chunks of about CHUNK_BYTES inside a `fori_loop`.

Selection (measured on this CPU). `lax.top_k` costs per kept entry as well as per entry read
(its heap: ~54 ns an insertion), so at [4096, 16384] a row top-128 took 255 ms and BatchTopK over
those candidates 270 of a ~1100 ms step. With many latents per row (`use_blocks`) both
selections run over block maxima instead (BLOCK = 16 consecutive latents): a block holding one
of the largest entries has a maximum at least that large, so
  TopK      `lax.top_k` over each row's [n / 16] maxima, then over its k best blocks' 16 k
            entries (65 against 119 ms);
  BatchTopK a bound L below the (k B)-th largest block maximum (20 bisection passes), the live
            blocks (maximum >= L: ~k B of them, compacted), the exact threshold over their
            entries (a bisection up from L) and the pairs above it (91 against 257 ms; ~30 of
            those the compactions, `compact`). Exact: every entry >= the batch threshold lies
            in a live block. When ties at L overfill the room for live blocks, a `lax.cond`
            runs the bisection over the whole batch (exact, slower; measure zero for floats).
Few latents per row: `lax.top_k` directly (TopK), BatchTopK from each row's top CANDIDATES_PER_K
* k (exact unless some row's last candidate reaches the threshold, then the same fallback).
Each `lax.top_k` sits behind an optimization barrier (`top_k`): without it, XLA CPU turned it
into a full sort next to a cond. approx_max_k is not exact on TPU, so it is not used. The
activations reach the selection as PreActs(pre, b): relu(pre + b) is never written as a second
[B, n] array (block_max fuses it; the live blocks gather pre and b).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
from jax.experimental.layout import Layout, with_layout_constraint
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from csae_jax.saes import select

# Bytes of one chunk of gathered [pairs, d] rows: big enough to amortise the loop, small enough
# to stay in cache and never hold an [S, d] array.
CHUNK_BYTES = 8 << 20
# BatchTopK candidates per row, in units of k: rows rarely keep more than a few k.
CANDIDATES_PER_K = 4
# Selection over block maxima (`select_rows`, `select_batch`): BLOCK consecutive latents per
# block; used from BLOCK_MIN_PER_K * k blocks per row. 16 balances the pass over the maxima
# ([B, n / 16]) against the one over the live blocks' entries (~16 k B).
BLOCK = 16
BLOCK_MIN_PER_K = 4
# BatchTopK's bound L stops after this many bisection passes (within 2 ** 11 ulps, ~2.4e-4
# relative): live blocks beyond k B are then those few within that band, and up to
# k B / LIVE_SLACK_DIV + BLOCK of them are room enough (else the exact fallback runs).
BLOCK_BOUND_PASSES = 20
LIVE_SLACK_DIV = 64


class Pairs(NamedTuple):
  """Selected (row, latent) pairs; v = 0 marks padding (no contribution, no gradient)."""
  v_s: Float[Array, 's']
  row_s: Int[Array, 's']
  col_s: Int[Array, 's']


class PreActs(NamedTuple):
  """Activations relu(pre + b) left unevaluated: XLA fuses the bias and the ReLU into each pass
  that reads them (the block maxima, the live blocks' gather, a cond's branch) instead of
  writing a second [B, n] array next to the GEMM's (65 ms a step at [4096, 16384], most of it
  the fresh buffer's page faults). Every selection function takes one or a plain array."""
  pre_bn: jax.Array
  b_n: jax.Array

  @property
  def shape(self):
    return self.pre_bn.shape


def _acts(a):
  """The activations of a PreActs (evaluated where this is called: inside a cond's branch, so
  the cond takes the GEMM's output, not a new [B, n] array) or a plain array as it is."""
  return jax.nn.relu(a.pre_bn + a.b_n) if isinstance(a, PreActs) else a


def top_k(acts_bn, k: int):
  """`lax.top_k` along the last axis, kept on XLA CPU's TopK kernel.

  XLA lowers top_k to a full sort plus a slice and then matches that back to its TopK kernel only
  while the slice stays a plain slice. When a consumer fuses into it (a `lax.cond` or a reduction
  reading the values), the match fails and every row is fully sorted: measured 346 ms instead of
  25 ms at [512, 4096] -> 128 on this CPU. The optimization barrier keeps the slice plain. One
  barrier per output: a barrier over the (values, indices) tuple consumed TopK's tuple directly,
  which crashed XLA's TopkDecomposer (a failed HloGetTupleElementInstruction cast) whenever the
  step was compiled over several devices."""
  v_bk, idx_bk = jax.lax.top_k(acts_bn, k)
  return jax.lax.optimization_barrier(v_bk), jax.lax.optimization_barrier(idx_bk)


def _rows_of(idx_bm):
  return jnp.broadcast_to(jnp.arange(idx_bm.shape[0], dtype=jnp.int32)[:, None], idx_bm.shape)


def _padded(a_bn):
  pad = (-a_bn.shape[-1]) % BLOCK
  if not pad:
    return a_bn
  return jnp.pad(a_bn, ((0, 0),) * (a_bn.ndim - 1) + ((0, pad),))


def block_max(acts_bn):
  """[B, q] each block's maximum: BLOCK consecutive latents per block, n padded with zeros to a
  multiple of BLOCK."""
  if isinstance(acts_bn, PreActs):
    # relu(max(pre + b)) = max(relu(pre + b)), and the bias added as [q, BLOCK] to the
    # [B, q, BLOCK] view: XLA CPU's fused reduce then runs at memory speed (11 ms at
    # [4096, 16384]); the [n] bias broadcast over the flat rows made it 95 ms.
    pre_bqk = _padded(acts_bn.pre_bn).reshape(acts_bn.shape[0], -1, BLOCK)
    return jax.nn.relu(jnp.max(pre_bqk + _padded(acts_bn.b_n).reshape(-1, BLOCK), -1))
  a_bn = _padded(acts_bn)
  return jnp.max(a_bn.reshape(a_bn.shape[0], -1, BLOCK), -1)


def block_entries(acts_bn, blk_s):
  """[S, BLOCK] the entries of the blocks with flat ids blk_s (row * q + block). From a PreActs
  the GEMM's output and the bias are gathered and the ReLU applied after, so the only full pass
  over relu(pre + b) is block_max's (fused; nothing [B, n] is written)."""
  if isinstance(acts_bn, PreActs):
    pre_sk = _padded(acts_bn.pre_bn).reshape(-1, BLOCK)[blk_s]
    b_qk = _padded(acts_bn.b_n).reshape(-1, BLOCK)
    return jax.nn.relu(pre_sk + b_qk[blk_s % b_qk.shape[0]])
  return _padded(acts_bn).reshape(-1, BLOCK)[blk_s]


def use_blocks(n: int, k: int) -> bool:
  """Whether the block-maxima selection applies: blocks much fewer than latents but still at
  least BLOCK_MIN_PER_K * k of them per row (else the dense top-k is as cheap)."""
  return -(-n // BLOCK) >= BLOCK_MIN_PER_K * k


def select_rows(acts_bn, k: int) -> Pairs:
  """Each row's k largest (TopK, AuxK).

  With many latents per row (`use_blocks`): each row's k blocks of largest maximum hold its k
  largest entries (an entry among them lies in a block whose maximum is at least it, hence at
  least the row's k-th largest block maximum; ties aside), so `lax.top_k` runs over the block
  maxima and then over those k blocks' entries, [B, n / 16] and [B, 16 k] instead of [B, n]:
  77 against 121 ms at [4096, 16384], k 32 (`lax.top_k`'s heap costs per kept entry too)."""
  b, n = acts_bn.shape
  if not use_blocks(n, k):
    v_bk, idx_bk = top_k(_acts(acts_bn), k)
  else:
    m_bq = block_max(acts_bn)
    _, blk_bk = top_k(m_bq, k)
    flat_bk = blk_bk + m_bq.shape[1] * jnp.arange(b, dtype=blk_bk.dtype)[:, None]
    cand_bm = block_entries(acts_bn, flat_bk.reshape(-1)).reshape(b, k * BLOCK)
    v_bk, i_bk = top_k(cand_bm, k)
    idx_bk = jnp.take_along_axis(blk_bk, i_bk // BLOCK, 1) * BLOCK + i_bk % BLOCK
  return Pairs(v_bk.reshape(-1), _rows_of(idx_bk).reshape(-1), idx_bk.reshape(-1).astype(jnp.int32))


def compact(mask_bm, size: int):
  """The flat (row-major) positions of mask's first `size` True entries, padded with 0, and how
  many are True. Offsets per row, then within rows: 30 ms against `jnp.nonzero`'s 47 ms at
  [4096, 1024] (one cumsum over the whole array is the slow part)."""
  b, m = mask_bm.shape
  in_row_bm = jnp.cumsum(mask_bm.astype(jnp.int32), axis=1)
  row_total_b = in_row_bm[:, -1]
  pos_bm = in_row_bm - 1 + (jnp.cumsum(row_total_b) - row_total_b)[:, None]
  pos_bm = jnp.where(mask_bm, pos_bm, size)  # out of range: dropped
  flat = jnp.arange(b * m, dtype=jnp.int32).reshape(b, m)
  pos_s = jnp.zeros(size, jnp.int32).at[pos_bm.reshape(-1)].set(flat.reshape(-1), mode='drop')
  return pos_s, jnp.sum(row_total_b)


def _pairs_above(v_bm, col_bm, thr, total: int) -> Pairs:
  """The (at most `total`) entries >= thr and > 0 of v_bm, as pairs (row-major order)."""
  m = v_bm.shape[1]
  pos_s, count = compact((v_bm >= thr) & (v_bm > 0), total)
  valid_s = jnp.arange(total) < count
  v_s = jnp.where(valid_s, v_bm.reshape(-1)[pos_s], 0.0)
  return Pairs(v_s, (pos_s // m).astype(jnp.int32), col_bm.reshape(-1)[pos_s].astype(jnp.int32))


def _candidates_exact(cand_v_bm, thr, n: int):
  """Whether the batch threshold over each row's top-m candidates is the one over all entries:
  unless some row's m-th candidate reaches it (it may hide more kept entries); a non-positive
  last candidate means the row has no positive entry outside its candidates."""
  last = jnp.max(cand_v_bm[:, -1])
  return (cand_v_bm.shape[1] == n) | (last < thr) | (last <= 0)


def batch_threshold(acts_bn, total, k_static: int):
  """The `total`-th largest entry of the batch (`select.kth_largest(acts_bn, total)` exactly),
  from each row's top CANDIDATES_PER_K * k_static candidates; total may be traced (a row mask)
  as long as it is <= k_static * B. Falls back to the whole-batch bisection on the rare step
  where the candidates are not enough."""
  b, n = acts_bn.shape
  cand_v_bm, _ = top_k(acts_bn, min(n, CANDIDATES_PER_K * k_static))
  thr = select.kth_largest(cand_v_bm, total)
  return jax.lax.cond(_candidates_exact(cand_v_bm, thr, n), lambda: thr,
                      lambda: select.kth_largest(acts_bn, total))


def row_threshold(acts_bn, k: int):
  """[B, 1] each row's k-th largest entry (`select.kth_largest(acts_bn, k, axis=-1)`)."""
  return top_k(acts_bn, min(k, acts_bn.shape[1]))[0][:, -1:]


def select_batch(acts_bn, k: int) -> Pairs:
  """The k * B largest entries of the batch (BatchTopK), exactly (see the module docstring).
  Ties at the threshold beyond k * B entries are dropped (measure zero for float inputs)."""
  b, n = acts_bn.shape
  if use_blocks(n, k):
    return _select_batch_blocks(acts_bn, k)
  return _select_batch_candidates(acts_bn, k)


class LiveBlocks(NamedTuple):
  """BatchTopK's live blocks: the bound `lower`, n_live blocks of maximum >= it (the first cap
  kept, block ids blk_s into the [B, q] blocks, block column-major) and their entries v_sk
  [cap, BLOCK] (0 past n_live)."""
  q: int
  cap: int
  lower: jax.Array
  n_live: jax.Array
  blk_s: jax.Array
  v_sk: jax.Array


def live_blocks(acts_bn, k: int) -> LiveBlocks:
  b, _ = acts_bn.shape
  total = k * b
  m_bq = block_max(acts_bn)
  q = m_bq.shape[1]
  cap = min(b * q, total + total // LIVE_SLACK_DIV + BLOCK)
  lower = select.kth_largest(m_bq, total, passes=BLOCK_BOUND_PASSES)
  # Compacted over the transposed [q, B] mask: the pairs come ordered by column block, so the
  # backward's scatter-adds into dW_dec and dW_enc (and the gathers of W_dec rows) revisit the
  # same 16 rows of [n, d] while they are in cache instead of a random row per pair (the pair
  # loops ~215 -> ~170 ms at [4096, 16384], k 32).
  qb_s, n_live = compact(((m_bq >= lower) & (m_bq > 0)).T, cap)
  blk_s = qb_s % b * q + qb_s // b
  v_sk = jnp.where((jnp.arange(cap) < n_live)[:, None], block_entries(acts_bn, blk_s), 0.0)
  return LiveBlocks(q, cap, lower, n_live, blk_s, v_sk)


def _select_batch_blocks(acts_bn, k: int) -> Pairs:
  """BatchTopK over block maxima, exact, with no per-row top-k (its heap was 290 of a 1100 ms
  step at [4096, 16384], k 32):
    L   a lower bound of the (k B)-th largest block maximum (20 bisection passes over [B, n/16]);
        at least k B entries are >= L (each block's maximum), so the batch threshold t >= L;
    the live blocks, maximum >= L, hold every entry >= t; they are ~k B blocks (about 1/32 of
        all; at most LIVE_SLACK more, else the exact fallback over the whole batch);
    t   the exact (k B)-th largest over the live blocks' entries, bisected up from L;
    the pairs >= t, positive, ordered by column block (16 latents), then row.
  A row may take any share of the batch's budget (no candidates per row to overflow)."""
  b, n = acts_bn.shape
  total = k * b
  live = live_blocks(acts_bn, k)
  q, blk_s, v_sk = live.q, live.blk_s, live.v_sk
  thr = select.kth_largest_from(v_sk, total, live.lower)

  def from_blocks(_):
    # the pairs of v_sk's rows (live blocks), mapped back to batch rows
    cols_sk = (blk_s % q * BLOCK)[:, None] + jnp.arange(BLOCK, dtype=jnp.int32)
    p = _pairs_above(v_sk, cols_sk, thr, total)
    return p._replace(row_s=(blk_s[p.row_s] // q).astype(jnp.int32))

  return jax.lax.cond(live.n_live <= live.cap, from_blocks,
                      lambda _: _select_batch_all(acts_bn, total), None)


def _select_batch_all(acts_bn, total: int) -> Pairs:
  """The exact fallback of both BatchTopK paths: the bisection over the whole batch."""
  a_bn = _acts(acts_bn)
  b, n = a_bn.shape
  cols_bn = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  return _pairs_above(a_bn, cols_bn, select.kth_largest(a_bn, total), total)


def _select_batch_candidates(acts_bn, k: int) -> Pairs:
  """BatchTopK from each row's top CANDIDATES_PER_K * k (few latents per row)."""
  acts_bn = _acts(acts_bn)  # (top_k reads a materialized array)
  b, n = acts_bn.shape
  total = k * b
  m = min(n, CANDIDATES_PER_K * k)
  cand_v_bm, cand_i_bm = top_k(acts_bn, m)
  thr = select.kth_largest(cand_v_bm, total)  # bisection: ~1 ms on k B candidates
  exact = _candidates_exact(cand_v_bm, thr, n)
  return jax.lax.cond(exact, lambda _: _pairs_above(cand_v_bm, cand_i_bm, thr, total),
                      lambda _: _select_batch_all(acts_bn, total), None)


def scatter_codes(p: Pairs, n_rows: int, n_latents: int) -> Float[Array, 'b n']:
  """The dense [B, n] codes of the pairs (statistics: firing counts, L0, thresholds)."""
  return jnp.zeros((n_rows, n_latents), p.v_s.dtype).at[p.row_s, p.col_s].set(p.v_s)


def _chunks(p: Pairs, d: int):
  """Pads the pairs to whole chunks and reshapes them to [C, c]."""
  s = p.v_s.shape[0]
  c = max(1, min(s, CHUNK_BYTES // (4 * d)))
  pad = (-s) % c
  p = Pairs(*(jnp.pad(a, (0, pad)) for a in p))
  return Pairs(*(a.reshape(-1, c) for a in p))


def decode_pairs(p: Pairs, w_nd, n_rows: int):
  """sum over pairs of v * w[col] into row `row`: [n_rows, d] (float32 accumulation)."""
  cp = _chunks(p, w_nd.shape[1])

  def body(i, y_bd):
    return y_bd.at[cp.row_s[i]].add(cp.v_s[i][:, None] * w_nd[cp.col_s[i]].astype(jnp.float32))

  return jax.lax.fori_loop(0, cp.v_s.shape[0], body,
                           jnp.zeros((n_rows, w_nd.shape[1]), jnp.float32))


def _pair_dec_grads(p: Pairs, g_bd, g_v_s, w_dec_nd, dw_dec_nd, dv_given: bool = False):
  """Adds one pair list's decoder gradient (dW_dec[j] += v g_b) to dw_dec_nd and returns dpre per
  pair. dv_given: g_v_s already holds the whole dv per pair (else dv = <g_b, W_dec[j]> + g_v)."""
  cp = _chunks(p, w_dec_nd.shape[1])
  cg_v = _chunks(Pairs(g_v_s, p.row_s, p.col_s), w_dec_nd.shape[1]).v_s

  def body(i, carry):
    dw_dec, dpre_cc = carry
    row, col, v = cp.row_s[i], cp.col_s[i], cp.v_s[i]
    g_cd = g_bd[row]
    dv_c = cg_v[i] if dv_given else jnp.sum(g_cd * w_dec_nd[col], -1) + cg_v[i]
    dpre_c = jnp.where(v > 0, dv_c, 0.0)
    return dw_dec.at[col].add(v[:, None] * g_cd), dpre_cc.at[i].set(dpre_c)

  dw_dec_nd, dpre_cc = jax.lax.fori_loop(0, cp.v_s.shape[0], body,
                                         (dw_dec_nd, jnp.zeros_like(cp.v_s)))
  return dw_dec_nd, dpre_cc.reshape(-1)[:p.v_s.shape[0]]


def _pair_enc_grads(p: Pairs, dpre_s, xc_bd, dw_enc_nd, db_enc_n):
  """Adds the encoder gradients of pairs with gradient dpre: dW_enc[:, j] += dpre (x_b - b_dec)
  (accumulated per latent, [n, d]) and db_enc[j] += dpre."""
  cp = _chunks(Pairs(dpre_s, p.row_s, p.col_s), xc_bd.shape[1])

  def body(i, acc):
    dw_enc, db_enc = acc
    col, dpre_c = cp.col_s[i], cp.v_s[i]
    return dw_enc.at[col].add(dpre_c[:, None] * xc_bd[cp.row_s[i]]), db_enc.at[col].add(dpre_c)

  return jax.lax.fori_loop(0, cp.v_s.shape[0], body, (dw_enc_nd, db_enc_n))


class SparseConfig(NamedTuple):
  """Static settings (hashable): batch-level selection or per row, k, AuxK's k (0: off)."""
  batch: bool
  k: int
  k_aux: int
  compute_dtype: str = 'float32'


# AuxK selects k_aux = d / 2 latents per row (16 k at the reference recipe): at that density the
# pair path's gathers and scatters cost more than dense GEMMs over [B, n]. Measured on this CPU
# (d 1024, n 16384, batch 4096): one pair of the loops ~2.2 ns per element against ~7 ps per MAC
# of a GEMM, so the dense AuxK (three GEMMs) wins once k_aux > ~n / 150. The main k stays on pairs.
AUX_DENSE_RATIO = 128


def aux_is_dense(k_aux: int, n: int) -> bool:
  return k_aux > 0 and k_aux * AUX_DENSE_RATIO >= n


# A healthy run has a few dead latents at a time. When at most n / AUX_COMPACT_DIV are dead, the
# dense AuxK runs on those columns only ([B, n / 8] instead of [B, n]: its top-k and its three
# GEMMs cost ~1/8); with more dead it runs on all n. Both give the same codes and gradients.
AUX_COMPACT_DIV = 8


class AuxWidths(NamedTuple):
  """The dense AuxK's static sizes at n latents: k (its k_aux, at most n), few (up to this many
  dead it keeps every positive dead activation, no top-k, on [B, few] GEMMs: k_aux = d / 2
  columns instead of n / 8) and cap (up to this many dead it runs compacted)."""
  k: int
  few: int
  cap: int


def aux_widths(k_aux: int, n: int) -> AuxWidths:
  k = max(1, min(k_aux, n))
  cap = max(1, n // AUX_COMPACT_DIV)
  return AuxWidths(k, min(k, cap), cap)


def _dead_columns(acts_bn, idx_c, valid_c):
  """[B, C] the activations of the compacted dead columns idx_c (0 where not valid_c)."""
  if isinstance(acts_bn, PreActs):
    cols_bc = jax.nn.relu(acts_bn.pre_bn[:, idx_c] + acts_bn.b_n[idx_c])
  else:
    cols_bc = acts_bn[:, idx_c]
  return jnp.where(valid_c, cols_bc, 0.0)


class DenseAux(NamedTuple):
  """The dense AuxK's selection: case 0 none dead (skipped), 1 at most `aux_widths().few`
  dead (all kept, the first few of idx_c), 2 dead latents compacted into idx_c (valid_c marks
  the real ones), 3 over all latents; thr_b1 each row's k_aux-th largest dead activation (0 in
  case 1; the codes are rebuilt from acts and thr in the backward)."""
  case: jax.Array
  thr_b1: jax.Array
  idx_c: jax.Array
  valid_c: jax.Array


class SparseOut(NamedTuple):
  x_hat_bd: jax.Array      # reconstruction, b_dec included
  aux_hat_bd: jax.Array    # AuxK reconstruction of the residual (no b_dec); zeros when off
  main: Pairs              # the selected pairs (statistics; v carries a gradient too)
  any_dead: jax.Array      # bool scalar: AuxK ran


def aux_codes(acts_bn, dead_n, thr_b1):
  """Dense AuxK codes: the dead latents at or above each row's threshold (positive only); the
  dense step (objective.auxk_loss) and this module's dense AuxK share it."""
  dead_bn = jnp.where(dead_n, acts_bn, 0.0)
  return jnp.where((dead_bn >= thr_b1) & (dead_bn > 0), dead_bn, 0.0)


def _encode_select(cfg: SparseConfig, w_enc, b_enc, b_dec, x_bd, dead_n):
  """Returns xc, acts, the main pairs, AuxK's pairs (None on the dense AuxK path) and whether
  any latent is dead."""
  xc_bd = x_bd - b_dec
  pre_bn = jnp.matmul(xc_bd.astype(cfg.compute_dtype), w_enc.astype(cfg.compute_dtype),
                      preferred_element_type=jnp.float32)
  acts_bn = PreActs(pre_bn, b_enc)
  main = select_batch(acts_bn, cfg.k) if cfg.batch else select_rows(acts_bn, cfg.k)
  b, n = acts_bn.shape
  any_dead = jnp.any(dead_n) if cfg.k_aux > 0 else jnp.zeros((), bool)
  k_aux = aux_widths(cfg.k_aux, n).k
  if aux_is_dense(cfg.k_aux, n):
    aux = None  # selected and decoded together in _dense_aux_fwd
  else:
    aux = jax.lax.cond(
        any_dead, lambda a: select_rows(jnp.where(dead_n, _acts(a), 0.0), k_aux),
        lambda a: Pairs(jnp.zeros(b * k_aux), jnp.zeros(b * k_aux, jnp.int32),
                        jnp.zeros(b * k_aux, jnp.int32)), acts_bn)
  return xc_bd, acts_bn, main, aux, any_dead


def _dense_aux_fwd(cfg: SparseConfig, acts_bn, dead_n, any_dead, w_dec_c):
  """AuxK's selection (`DenseAux`) and reconstruction [B, d] on dense GEMMs."""
  b, n = acts_bn.shape
  k_aux, few, cap = aux_widths(cfg.k_aux, n)
  n_dead = jnp.sum(dead_n)
  idx_c = jnp.nonzero(dead_n, size=cap, fill_value=0)[0].astype(jnp.int32)
  valid_c = jnp.arange(cap) < n_dead
  dot = lambda a, w: jnp.matmul(a.astype(cfg.compute_dtype), w,
                                preferred_element_type=jnp.float32)

  def none():
    return jnp.zeros((b, 1), jnp.float32), jnp.zeros((b, w_dec_c.shape[1]), jnp.float32)

  def compact(width, few):
    def branch():
      idx, valid = idx_c[:width], valid_c[:width]
      a_bc = _dead_columns(acts_bn, idx, valid)
      # few: at most k_aux dead, so every positive dead activation is kept (threshold 0) and
      # no top-k runs (270 ms at [4096, 16384] with 512 dead)
      thr_b1 = jnp.zeros((b, 1), jnp.float32) if few else row_threshold(a_bc, min(k_aux, width))
      return thr_b1, dot(aux_codes(a_bc, valid, thr_b1), w_dec_c[idx])
    return branch

  def full():
    a_bn = _acts(acts_bn)
    thr_b1 = row_threshold(jnp.where(dead_n, a_bn, 0.0), k_aux)
    return thr_b1, dot(aux_codes(a_bn, dead_n, thr_b1), w_dec_c)

  case = jnp.where(any_dead, jnp.where(n_dead <= few, 1, jnp.where(n_dead <= cap, 2, 3)),
                   0).astype(jnp.int32)
  thr_b1, aux_hat_bd = jax.lax.switch(case, [none, compact(few, True), compact(cap, False), full])
  return DenseAux(case, thr_b1, idx_c, valid_c), aux_hat_bd


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def sparse_sae(cfg: SparseConfig, w_enc_dn, b_enc_n, w_dec_nd, b_dec_d, x_bd,
               dead_n: Bool[Array, 'n']) -> SparseOut:
  return _fwd(cfg, w_enc_dn, b_enc_n, w_dec_nd, b_dec_d, x_bd, dead_n)[0]


def _fwd(cfg, w_enc_dn, b_enc_n, w_dec_nd, b_dec_d, x_bd, dead_n):
  b = x_bd.shape[0]
  xc_bd, acts_bn, main, aux, any_dead = _encode_select(cfg, w_enc_dn, b_enc_n, b_dec_d, x_bd,
                                                       dead_n)
  w_dec_c = w_dec_nd.astype(cfg.compute_dtype)
  x_hat_bd = decode_pairs(main, w_dec_c, b) + b_dec_d
  if isinstance(aux, Pairs):
    aux_hat_bd = jax.lax.cond(any_dead, lambda: decode_pairs(aux, w_dec_c, b),
                              lambda: jnp.zeros_like(x_hat_bd))
    acts_res = None  # the pair path keeps no [B, n] array for the backward
  else:
    aux, aux_hat_bd = _dense_aux_fwd(cfg, acts_bn, dead_n, any_dead, w_dec_c)
    # The dense AuxK backward rebuilds its codes from acts and the thresholds: keeping acts (already
    # computed) costs memory only, where a [B, n] residual out of the cond would be written (zeros)
    # on every step without dead latents too.
    acts_res = acts_bn
  out = SparseOut(x_hat_bd, aux_hat_bd, main, any_dead)
  return out, (w_enc_dn, w_dec_nd, xc_bd, main, aux, any_dead, dead_n, acts_res)


def _row_major(x_dn):
  """x laid out row-major. The encoder's gradient is accumulated as [n, d] and transposed; XLA
  otherwise keeps the transpose as a column-major layout and the optimizer's three loops over
  W_enc then read it column-wise: measured 663 ms against 85 ms for the same loops over W_dec at
  d 2560, n 20000 (an optimization barrier does not stop it; a layout constraint does: 2.1x on
  the loops alone)."""
  return with_layout_constraint(x_dn, Layout(major_to_minor=tuple(range(x_dn.ndim))))


def _dense_dv(g_bd, w_dec_nd, p: Pairs):
  """dv per pair from one dense [B, d] x [d, n] GEMM, gathered at the pairs. AuxK has d / 2 pairs
  per row: the GEMM (7.8 ms) beat the per-pair row gathers (60 ms) at d 256, n 4096, B 512."""
  return (g_bd @ w_dec_nd.T)[p.row_s, p.col_s]


def _bwd(cfg, res, g: SparseOut):
  w_enc_dn, w_dec_nd, xc_bd, main, aux, any_dead, dead_n, acts_bn = res
  n, d = w_dec_nd.shape
  b = xc_bd.shape[0]
  w_enc_nd = w_enc_dn.T
  dw_dec_nd, dpre_s = _pair_dec_grads(main, g.x_hat_bd, g.main.v_s, w_dec_nd,
                                      jnp.zeros((n, d), jnp.float32))

  def enc_from_pairs(dw_dec_nd, pair_lists, extra=None):
    """The encoder's gradients from pairs: accumulated per latent ([n, d], row scatters) and
    transposed once. extra(dw_enc_nd, db_enc_n, dx_bd) adds the compact AuxK's share first."""
    dw_enc_nd, db_enc_n = jnp.zeros((n, d), jnp.float32), jnp.zeros(n, jnp.float32)
    dx_bd = jnp.zeros((b, d), jnp.float32)
    for p, dpre in pair_lists:
      dw_enc_nd, db_enc_n = _pair_enc_grads(p, dpre, xc_bd, dw_enc_nd, db_enc_n)
      # x enters only through xc = x - b_dec: dx_b = sum_j dpre_bj W_enc[:, j]. Under jit XLA
      # drops this when the input needs no gradient (level 1, whose input is data).
      dx_bd = dx_bd + decode_pairs(Pairs(dpre, p.row_s, p.col_s), w_enc_nd, b)
    if extra is not None:
      dw_enc_nd, db_enc_n, dx_bd = extra(dw_enc_nd, db_enc_n, dx_bd)
    return dw_dec_nd, _row_major(dw_enc_nd.T), db_enc_n, dx_bd

  def alive(dw_dec_nd):
    return enc_from_pairs(dw_dec_nd, [(main, dpre_s)])

  if isinstance(aux, Pairs):
    def dead(dw_dec_nd):
      dw_dec_nd, dpre_aux_s = _pair_dec_grads(aux, g.aux_hat_bd,
                                              _dense_dv(g.aux_hat_bd, w_dec_nd, aux), w_dec_nd,
                                              dw_dec_nd, dv_given=True)
      return enc_from_pairs(dw_dec_nd, [(main, dpre_s), (aux, dpre_aux_s)])

    dw_dec_nd, dw_enc_dn, db_enc_n, dx_bd = jax.lax.cond(any_dead, dead, alive, dw_dec_nd)
  else:
    g_aux = g.aux_hat_bd

    def compact(width):
      def branch(dw_dec_nd):
        # AuxK on the compacted dead columns: the full case below on [B, width], scattered back
        # by row.
        idx, valid = aux.idx_c[:width], aux.valid_c[:width]
        a_bc = aux_codes(_dead_columns(acts_bn, idx, valid), valid, aux.thr_b1)
        dpre_bc = jnp.where(a_bc > 0, g_aux @ w_dec_nd[idx].T, 0.0)
        dw_dec_nd = dw_dec_nd.at[idx].add(a_bc.T @ g_aux)  # padding columns are 0: add nothing

        def extra(dw_enc_nd, db_enc_n, dx_bd):
          return (dw_enc_nd.at[idx].add(dpre_bc.T @ xc_bd),
                  db_enc_n.at[idx].add(jnp.sum(dpre_bc, 0)), dx_bd + dpre_bc @ w_enc_nd[idx])

        return enc_from_pairs(dw_dec_nd, [(main, dpre_s)], extra)
      return branch

    def full(dw_dec_nd):
      # Dense AuxK: codes A rebuilt from acts; dA = (g_aux W_dec^T) on A's support; dW_dec +=
      # A^T g_aux. The main pairs' dpre joins dA in one [B, n] array, so the encoder's whole
      # gradient is one GEMM, xc^T D, already in W_enc's [d, n] layout.
      a_bn = aux_codes(_acts(acts_bn), dead_n, aux.thr_b1)
      dpre_bn = jnp.where(a_bn > 0, g_aux @ w_dec_nd.T, 0.0)
      dw_dec_nd = dw_dec_nd + a_bn.T @ g_aux
      dpre_bn = dpre_bn.at[main.row_s, main.col_s].add(dpre_s)
      return dw_dec_nd, xc_bd.T @ dpre_bn, jnp.sum(dpre_bn, 0), dpre_bn @ w_enc_nd

    widths = aux_widths(cfg.k_aux, n)
    dw_dec_nd, dw_enc_dn, db_enc_n, dx_bd = jax.lax.switch(
        aux.case, [alive, compact(widths.few), compact(widths.cap), full], dw_dec_nd)
  dw_enc_dn = _row_major(dw_enc_dn)
  # b_dec: the decoder's bias, minus what the encoder input passed back (sum_b dx_b).
  db_dec_d = jnp.sum(g.x_hat_bd, 0) - w_enc_dn @ db_enc_n
  return (dw_enc_dn, db_enc_n, dw_dec_nd, db_dec_d, dx_bd, None)


sparse_sae.defvjp(_fwd, _bwd)
