"""Transformer layers shared by the VLM ports (Flax NNX), written to match HF's numerics.

Why each choice:
- `RMSNorm` squares and averages in float32 and casts back *before* the weight multiply, as HF's
  Llama/Qwen norms do; a bf16 port that multiplied in float32 would drift from the reference.
- Attention takes its softmax in float32 (HF's eager path does the same) and supports grouped
  query attention (GQA) without materialising repeated keys: queries are viewed as
  [batch, seq, kv_heads, group, head_dim].
- The KV cache is a plain pytree `(k_btkh, v_btkh)` preallocated to a maximum length, written with
  `dynamic_update_slice` at a traced index: every decode step has the same shapes, so it compiles
  once. Causality with a cache is "key slot j <= cache_index + query offset i", which also hides
  slots not written yet.
"""

from __future__ import annotations

import functools
from typing import Callable, Collection, Optional

import jax
import jax.numpy as jnp
from flax import nnx

KVCache = tuple[jax.Array, jax.Array]  # (k [B, T_max, Hkv, Dh], v [B, T_max, Hkv, Dh])

# HF `hidden_act` / `hidden_activation` names -> functions (every port reads its config's name).
ACTS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu_pytorch_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'gelu_new': functools.partial(jax.nn.gelu, approximate=True),
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    'silu': jax.nn.silu,
}


def activation(name: str, where: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTS:
    raise ValueError(f'{where}={name!r} is not supported; one of {sorted(ACTS)}')
  return ACTS[name]


class RMSNorm(nnx.Module):
  """y = weight * (x / sqrt(mean(x^2) + eps)), statistics in float32 (HF's T5/Llama norm).

  one_plus=True is Gemma's norm: y = (x / rms) * (1 + weight), the multiply also in float32 and
  the cast last (HF's Gemma3RMSNorm; the checkpoints store weight - 1, zeros at init).
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, one_plus: bool = False,
               param_dtype=jnp.float32):
    self.eps, self.one_plus = eps, one_plus
    init = jnp.zeros if one_plus else jnp.ones
    self.weight = nnx.Param(init((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    if self.one_plus:
      y = x32 * jax.lax.rsqrt(var + self.eps) * (1.0 + self.weight[...].astype(jnp.float32))
      return y.astype(x.dtype)
    y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
    return self.weight[...] * y


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
  """Inverse frequencies [head_dim // 2] of the default RoPE, in float32 as HF computes them."""
  exps = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (jnp.float32(theta) ** exps)


def rope_cos_sin(positions_bs: jax.Array, head_dim: int, theta: float, factor: float
                 ) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, S, head_dim] (float32) of the default RoPE, frequencies / factor ('linear')."""
  inv_freq = rope_inv_freq(head_dim, theta) / jnp.float32(factor)
  freqs = positions_bs.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
  """[x1, x2] -> [-x2, x1] on the last axis (HF's half-split RoPE layout, not interleaved)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x_bshd: jax.Array, cos_bsd: jax.Array, sin_bsd: jax.Array) -> jax.Array:
  """Rotates x [B, S, H, Dh] by cos/sin [B, S, Dh] (broadcast over heads)."""
  cos = cos_bsd[:, :, None, :].astype(x_bshd.dtype)
  sin = sin_bsd[:, :, None, :].astype(x_bshd.dtype)
  return x_bshd * cos + rotate_half(x_bshd) * sin


class SwiGLU(nnx.Module):
  """down(act(gate(x)) * up(x)), no biases: Llama/Qwen (act silu), Gemma (act tanh-GELU)."""

  def __init__(self, d_model: int, d_ff: int, *, act: Callable = jax.nn.silu, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.act = act
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = nnx.Linear(d_model, d_ff, **kw)
    self.up_proj = nnx.Linear(d_model, d_ff, **kw)
    self.down_proj = nnx.Linear(d_ff, d_model, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def attend(q_bshd: jax.Array, k_bthd: jax.Array, v_bthd: jax.Array,
           mask_bst: Optional[jax.Array], *, scale: Optional[float] = None,
           softcap: Optional[float] = None) -> jax.Array:
  """Scaled dot-product attention with GQA; softmax in float32. Returns [B, S, H, Dh].

  mask_bst: True where query s may see key t (None: all visible). Rows with no visible key
  (never produced by the causal masks used here) would give a uniform average, not NaN.
  scale: multiplies q.k (None: head_dim ** -0.5; Gemma: query_pre_attn_scalar ** -0.5).
  softcap: scores -> softcap * tanh(scores / softcap) before the mask (Gemma 2 style; None: off).
  """
  b, s, h, dh = q_bshd.shape
  hkv = k_bthd.shape[2]
  if h % hkv:
    raise ValueError(f'{h} query heads is not a multiple of {hkv} key/value heads')
  q = q_bshd.reshape(b, s, hkv, h // hkv, dh)
  scores = jnp.einsum('bskgd,btkd->bkgst', q, k_bthd,
                      preferred_element_type=jnp.float32) * (dh ** -0.5 if scale is None else scale)
  if softcap is not None:
    scores = jnp.tanh(scores / softcap) * softcap
  if mask_bst is not None:
    scores = jnp.where(mask_bst[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_bthd.dtype)
  out = jnp.einsum('bkgst,btkd->bskgd', probs, v_bthd)
  return out.reshape(b, s, h, dh)


def causal_mask(b: int, s: int, t: int, offset: jax.Array | int = 0) -> jax.Array:
  """[B, S, T] bool: query i (absolute position offset + i) sees keys j <= offset + i."""
  q_pos = jnp.arange(s)[:, None] + offset
  return jnp.broadcast_to(jnp.arange(t)[None, :] <= q_pos, (b, s, t))


class Attention(nnx.Module):
  """Causal GQA self-attention with optional per-head q/k RMSNorm (Qwen3, Gemma) and a KV cache.

  scale / softcap: see `attend`; norm_one_plus: the q/k norms are Gemma's (1 + weight).
  """

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *,
               qk_norm: bool = False, bias: bool = False, eps: float = 1e-6,
               scale: Optional[float] = None, softcap: Optional[float] = None,
               norm_one_plus: bool = False, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if n_heads % n_kv_heads:
      raise ValueError(f'num_attention_heads={n_heads} must be a multiple of '
                       f'num_key_value_heads={n_kv_heads}')
    self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
    self.scale, self.softcap = scale, softcap
    kw = dict(use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = nnx.Linear(d_model, n_heads * head_dim, **kw)
    self.k_proj = nnx.Linear(d_model, n_kv_heads * head_dim, **kw)
    self.v_proj = nnx.Linear(d_model, n_kv_heads * head_dim, **kw)
    self.o_proj = nnx.Linear(n_heads * head_dim, d_model, **kw)
    # Qwen3 normalises each head's q and k over head_dim, before RoPE.
    nkw = dict(eps=eps, one_plus=norm_one_plus, param_dtype=param_dtype)
    self.q_norm = RMSNorm(head_dim, **nkw) if qk_norm else None
    self.k_norm = RMSNorm(head_dim, **nkw) if qk_norm else None

  def __call__(self, x_bsd: jax.Array, cos_bsd: jax.Array, sin_bsd: jax.Array, *,
               cache: Optional[KVCache] = None, cache_index: jax.Array | int = 0,
               mask_bst: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[KVCache]]:
    """Attention over x (no cache), or over the cache after writing x's keys at cache_index.

    mask_bst: [B, S, T] (T = S, or the cache length) True where a query sees a key; None: the
    causal mask (sliding windows and bidirectional image blocks pass their own).
    Returns (output [B, S, D], updated cache or None).
    """
    b, s, _ = x_bsd.shape
    q = self.q_proj(x_bsd).reshape(b, s, self.n_heads, self.head_dim)
    k = self.k_proj(x_bsd).reshape(b, s, self.n_kv_heads, self.head_dim)
    v = self.v_proj(x_bsd).reshape(b, s, self.n_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, cos_bsd, sin_bsd), apply_rope(k, cos_bsd, sin_bsd)
    if cache is None:
      mask = causal_mask(b, s, s) if mask_bst is None else mask_bst
      out = attend(q, k, v, mask, scale=self.scale, softcap=self.softcap)
      new_cache = None
    else:
      k_cache, v_cache = cache
      idx = jnp.asarray(cache_index, jnp.int32)
      zero = jnp.zeros((), jnp.int32)
      k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype),
                                             (zero, idx, zero, zero))
      v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype),
                                             (zero, idx, zero, zero))
      mask = causal_mask(b, s, k_cache.shape[1], idx) if mask_bst is None else mask_bst
      out = attend(q, k_cache, v_cache, mask, scale=self.scale, softcap=self.softcap)
      new_cache = (k_cache, v_cache)
    return self.o_proj(out.reshape(b, s, self.n_heads * self.head_dim)), new_cache


class Sites:
  """Named intermediates of one forward: `site(name, x)` applies `edits[name]` (a pure function
  of the activation) where the site is produced and records the value later layers see, when
  `wanted` is None (all) or names it. Harvesting and steering use this instead of hooks."""

  def __init__(self, edits=None, wanted=None):
    self.edits, self.wanted, self.out = dict(edits or {}), wanted, {}

  def __call__(self, name: str, x: jax.Array) -> jax.Array:
    if name in self.edits:
      x = self.edits[name](x)
    if self.wanted is None or name in self.wanted:
      self.out[name] = x
    return x


def last_layer_needed(sites: Optional[Collection[str]], n_layers: int) -> int:
  """Decoder layers the requested sites need (all for final_norm / logits / None)."""
  if sites is None:
    return n_layers
  need = 0
  for s in sites:
    if s.startswith('text/layer_'):
      need = max(need, int(s.split('/')[1][len('layer_'):]) + 1)
    elif s in ('text/final_norm', 'logits'):
      return n_layers
  return need
