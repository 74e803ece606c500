"""The SAE training objective: reconstruction + AuxK dead-latent loss, and its statistics.

One function serves level 1 (inputs = activations), staged level 2 (inputs = decoder rows) and
joint level 2 (inputs = the live rows of the level-1 decoder, selected by a row mask, with
optional stop-gradients on the input and the target separately).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from csae_jax import saes
from csae_jax.saes import base, codes as codes_lib, common, select, sparse


class SAEHyper(NamedTuple):
  """Static per-SAE settings the step closes over (hashable, so jit sees constants)."""
  arch: str
  k: int
  k_aux: int
  auxk_weight: float
  dead_tokens: int
  k_anneal_steps: int
  d: int
  l1_coeff: float = 0.0               # relu_l1
  sparsity_warmup_steps: int = 0      # relu_l1 / jumprelu coefficient warmup
  bandwidth: float = 1e-3             # jumprelu STE kernel width
  l0_coeff: float = 0.0               # jumprelu
  target_l0: float = 0.0              # jumprelu (0: plain L0 penalty)
  groups: tuple[int, ...] = ()        # matryoshka group sizes (sum = n)
  compute_dtype: str = 'float32'      # encoder / decoder matmuls; params stay float32
  sparse_decode: bool = False         # topk: decode by gathering the k rows (O(B k d))
  code_l1: float = 0.0                # k-sparse archs: L1 on the selected codes (code_l1_loss)
  # TopK / BatchTopK selection by lax.top_k (3.6-4.5x faster on CPU at [2048, 16384], k 32)
  # instead of the bisection, which alone needs no gather of latent-sharded activations: on
  # only where the latents are not sharded (mesh.model = 1). Both select exactly the same codes.
  select_top_k: bool = False
  # Latents [n_valid:] are padding (SAEs of different sizes stacked for one vmapped step, the
  # level-2 sweep over n2): they never fire and get no gradient. 0 = no padding.
  n_valid: int = 0


# Pre-activation of a padding latent: below every real score, so no selection ever takes it.
PAD_ACT = float(np.finfo(np.float32).min)


def latent_mask(h: SAEHyper, n: int):
  """[n] bool of the real (non-padding) latents, or None when the SAE has no padding."""
  if isinstance(h.n_valid, int) and h.n_valid == 0:
    return None
  return jnp.arange(n) < h.n_valid


class LossOut(NamedTuple):
  loss: jax.Array          # scalar, what is minimised
  recon: jax.Array         # mean squared error per input (sum over d), full dictionary
  sparsity: jax.Array      # the architecture's sparsity penalty (0 for the k-sparse ones)
  aux: jax.Array           # AuxK loss (0 when no latent is dead)
  fvu: jax.Array           # recon / total variance of the batch
  l0: jax.Array            # mean active latents per input
  # The training codes for the threshold and firing statistics (no gradient): dense [B, n], or
  # the k-sparse step's selected pairs (`codes.Codes`; never densified in the step).
  codes: codes_lib.Codes


def k_at(h: SAEHyper, step) :
  """k annealed linearly from d to k over the first k_anneal_steps steps (reference recipe)."""
  if h.k_anneal_steps <= 0:
    return h.k
  frac = jnp.clip(step / h.k_anneal_steps, 0.0, 1.0)
  return jnp.round(h.d + (h.k - h.d) * frac).astype(jnp.int32)


def auxk_loss(params: common.Params, acts_bn, dead_n: Bool[Array, 'n'], resid_bd, k_aux: int,
              valid_b=None) -> jax.Array:
  """AuxK (Gao et al. 2024): the k_aux largest dead latents reconstruct the (detached)
  residual, decoded without b_dec, normalised by the residual's variance. It gives dead latents
  a gradient towards what the live ones miss, which revives them."""
  k_aux = min(k_aux, acts_bn.shape[-1])
  thr_b1 = select.kth_largest(jnp.where(dead_n, acts_bn, 0.0), k_aux, axis=-1)[:, None]
  aux_codes_bn = sparse.aux_codes(acts_bn, dead_n, thr_b1)
  return auxk_from_decode(aux_codes_bn @ params['w_dec'], resid_bd, dead_n, valid_b)


def auxk_from_decode(resid_hat_bd, resid_bd, dead_n, valid_b=None) -> jax.Array:
  """The AuxK loss given the dead latents' reconstruction of the residual."""
  err_b = jnp.sum((resid_hat_bd - resid_bd) ** 2, -1)
  var_b = jnp.sum((resid_bd - jnp.mean(resid_bd, 0)) ** 2, -1)
  loss = base.masked_mean(err_b, valid_b) / jnp.maximum(base.masked_mean(var_b, valid_b), 1e-8)
  return jnp.where(jnp.any(dead_n), loss, 0.0)


def uses_sparse_step(h: SAEHyper) -> bool:
  """The custom-VJP k-sparse step (saes/sparse.py) serves TopK and BatchTopK with a static k."""
  return (h.sparse_decode and h.arch in ('topk', 'batch_topk') and h.k_anneal_steps <= 0
          and isinstance(h.k, int) and isinstance(h.n_valid, int) and h.n_valid == 0)


def _cast(params: common.Params, dtype: str) -> common.Params:
  if dtype == 'float32':
    return params
  return {k: (v.astype(dtype) if k in ('w_enc', 'b_enc', 'w_dec', 'b_dec') else v)
          for k, v in params.items()}


def sae_loss(h: SAEHyper, params: common.Params, since_fired_n, x_bd: Float[Array, 'b d'], step,
             *, target_bd=None, valid_b=None) -> LossOut:
  """Loss of one SAE on a batch. `target_bd` (default x_bd) is what is reconstructed; joint
  mode passes it separately to place stop-gradients on the encoder input and the target."""
  arch = saes.get_arch(h.arch)
  target_bd = x_bd if target_bd is None else target_bd
  dead_n = since_fired_n >= h.dead_tokens
  valid_n = latent_mask(h, params['w_dec'].shape[0])
  if valid_n is not None:  # padding is not "dead": AuxK must not pick it
    dead_n = dead_n & valid_n
  sparse_aux = None
  if uses_sparse_step(h) and valid_b is None:
    cfg = sparse.SparseConfig(batch=h.arch == 'batch_topk', k=h.k,
                              k_aux=h.k_aux if h.auxk_weight > 0 else 0,
                              compute_dtype=h.compute_dtype)
    out = sparse.sparse_sae(cfg, params['w_enc'], params['b_enc'], params['w_dec'],
                            params['b_dec'], x_bd, dead_n)
    x_hat_bd, sparse_aux = out.x_hat_bd, out.aux_hat_bd
    codes_bn = None
    stat_codes = codes_lib.stop_gradient(out.main)
    selected = out.main  # its values carry a gradient (the custom VJP takes one)
    acts_bn = None  # never materialised outside the custom VJP
    sparse_prefixes = None
  else:
    x_hat_bd, codes_bn, acts_bn, sparse_prefixes = _dense_or_matryoshka(h, arch, params, x_bd,
                                                                        target_bd, step, valid_b)
    selected = None
    stat_codes = jax.lax.stop_gradient(codes_bn)
  recon = base.masked_mean(jnp.sum((x_hat_bd - target_bd) ** 2, -1), valid_b)
  if sparse_prefixes is not None:
    train_recon = jnp.mean(sparse_prefixes)
  else:
    train_recon = recon if arch.recon_loss is None else arch.recon_loss(
        params, codes_bn, target_bd, valid_b, h)
  sparsity = (jnp.zeros(()) if acts_bn is None  # k-sparse archs have no sparsity penalty
              else arch.sparsity_loss(params, acts_bn, codes_bn, h, step, valid_b))
  if h.code_l1 > 0:
    if sparse_prefixes is not None:
      raise ValueError('level code_l1 > 0 is not supported by the sparse Matryoshka step; set '
                       '--config.train.sparse_decode=False or code_l1=0')
    sparsity = sparsity + code_l1_loss(h, params, codes_bn, selected, valid_b, x_bd.shape[0])
  var = base.masked_mean(jnp.sum((target_bd - jnp.mean(target_bd, 0)) ** 2, -1), valid_b)
  aux = jnp.zeros(())
  if h.auxk_weight > 0:
    resid_bd = jax.lax.stop_gradient(target_bd - x_hat_bd)
    aux = (auxk_loss(params, acts_bn, dead_n, resid_bd, h.k_aux, valid_b) if sparse_aux is None
           else auxk_from_decode(sparse_aux, resid_bd, dead_n, valid_b))
  l0 = base.masked_mean(codes_lib.active_per_row(stat_codes, x_bd.shape[0]), valid_b)
  return LossOut(loss=train_recon + sparsity + h.auxk_weight * aux, recon=recon,
                 sparsity=sparsity, aux=aux, fvu=recon / jnp.maximum(var, 1e-12), l0=l0,
                 codes=stat_codes)


def code_l1_loss(h: SAEHyper, params: common.Params, codes_bn, selected, valid_b, n_rows: int):
  """code_l1 / sqrt(k) x the mean over rows of sum_i f_i ||d_i|| of the k-sparse codes.

  Why: under a top-k budget a child feature whose parent often fires with it can be coded as
  (parent row + a residual row) at the same L0 as the true (child, parent) pair; both
  reconstruct equally, so the SAE learns the factored dictionary (measured: the robustness
  suite's combo_hard family, 80% of the children recovered). The true code has the smaller
  L1 (a child at cos c to its parent costs 1 + c instead of 1), so a small L1 on the selected
  codes breaks the tie towards the generating atoms. Inputs are scaled to E||x||^2 = 1, so a
  typical code is ~1/sqrt(k): dividing by sqrt(k) makes code_l1 the relative shrinkage of a
  typical code (about code_l1 / 2) at any k."""
  norms_n = jnp.linalg.norm(params['w_dec'], axis=-1)
  if selected is not None:  # the sparse step: pairs, padding has v = 0
    per_row = jnp.sum(jnp.maximum(selected.v_s, 0.0) * norms_n[selected.col_s]) / n_rows
  else:
    per_row = base.masked_mean(jnp.sum(codes_bn * norms_n, -1), valid_b)
  return h.code_l1 / jnp.sqrt(jnp.asarray(h.k, jnp.float32)) * per_row


def _dense_or_matryoshka(h: SAEHyper, arch, params, x_bd, target_bd, step, valid_b):
  """Dense codes and decode (every arch), or Matryoshka's sparse decode of its batch-level
  selection with the prefix reconstructions. Returns (x_hat, codes, pre-acts, prefixes|None)."""
  # Mixed precision: the two big matmuls run in compute_dtype on a cast copy of the float32
  # params (gradients flow back to them in float32); selection, thresholds and losses in float32.
  cparams = _cast(params, h.compute_dtype)
  acts_bn = common.pre_acts(cparams, x_bd.astype(h.compute_dtype)).astype(jnp.float32)
  valid_n = latent_mask(h, acts_bn.shape[-1])
  if valid_n is not None:  # padding never selected: its codes are 0, its gradient exactly 0
    acts_bn = jnp.where(valid_n, acts_bn, PAD_ACT)
  if not (h.sparse_decode and h.arch == 'matryoshka'):
    codes_bn = arch.train_codes(params, acts_bn, k_at(h, step), valid_b, h)
    x_hat_bd = common.decode(cparams, codes_bn.astype(h.compute_dtype)).astype(jnp.float32)
    return x_hat_bd, codes_bn, acts_bn, None
  b, n = acts_bn.shape
  vals_s, flat_s = jax.lax.top_k(acts_bn.reshape(-1), h.k * b)
  vals_s = jnp.where(vals_s > 0, vals_s, 0.0)
  rows_s, cols_s = flat_s // n, flat_s % n
  contrib_sd = (vals_s.astype(h.compute_dtype)[:, None] * cparams['w_dec'][cols_s]
                ).astype(jnp.float32)
  decode_rows = lambda c_sd: jax.ops.segment_sum(c_sd, rows_s, num_segments=b) + params['b_dec']
  x_hat_bd = decode_rows(contrib_sd)
  codes_bn = jax.lax.stop_gradient(
      jnp.zeros(b * n, jnp.float32).at[flat_s].set(vals_s).reshape(b, n))
  bounds = np.cumsum(h.groups)
  prefixes = jnp.stack([
      jnp.mean(jnp.sum((decode_rows(contrib_sd * (cols_s < m)[:, None]) - target_bd) ** 2, -1))
      for m in bounds])
  return x_hat_bd, codes_bn, acts_bn, prefixes
