"""The Qwen3 decoder of Qwen3-VL (Flax NNX, torch-free): parity port of HF's `Qwen3VLTextModel`
plus the `lm_head`.

Why it is shaped this way:
- Positions are 3-D (t, h, w) per token (multimodal RoPE). HF computes one rotary angle table per
  axis and then *interleaves* them over the frequency index: frequency f takes h's angle when
  f % 3 == 1 and f < 3 * mrope_section[1], w's when f % 3 == 2 and f < 3 * mrope_section[2],
  else t's (`apply_interleaved_mrope` / `recomposition_frequencies`). Here the interleaving is a
  static per-frequency axis choice, so the angle is pos[axis(f)] * inv_freq[f]: the same float32
  product HF takes, with no gather over angle tables.
- Deepstack: HF adds the i-th deepstack visual feature to the hidden states at the visual
  positions right *after* decoder layer i (for i < len(deepstack)). The site `text/layer_{i}` is
  the residual stream after that addition (what layer i + 1 reads); HF's `output_hidden_states`
  records layer outputs before it (the parity tests add it back).
- Sites and edits: the forward returns named intermediates (`text/embed`, `text/layer_{i}`,
  `text/final_norm`, `logits`) and applies `edits[name](activation)` where a site is produced,
  so harvesting and steering need no hooks. Asking for `sites` only up to some layer stops the
  forward there (no later layers, no vocab projection).
- Generation: `init_cache` preallocates per-layer K/V to a max length; `__call__` with `cache`
  and a traced `cache_index` writes the new tokens' keys and reads the cache (static shapes).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Collection, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from csae_jax.vlms import hf
from csae_jax.vlms import layers

Edits = Mapping[str, Callable[[jax.Array], jax.Array]]


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 5_000_000.0
  mrope_section: tuple[int, int, int] = (24, 20, 20)
  attention_bias: bool = False
  tie_word_embeddings: bool = False

  def __post_init__(self):
    if sum(self.mrope_section) != self.head_dim // 2 or len(self.mrope_section) != 3:
      raise ValueError(f'text_config mrope_section={list(self.mrope_section)} must be 3 ints '
                       f'summing to head_dim / 2 = {self.head_dim // 2}')
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f'text_config num_attention_heads={self.num_attention_heads} must be a '
                       f'multiple of num_key_value_heads={self.num_key_value_heads}')

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> 'TextConfig':
    """From a Qwen3-VL config.json dict (the whole config, or its `text_config`)."""
    text = d.get('text_config', d)
    # The top-level flag is the one HF's Qwen3VLForConditionalGeneration ties by.
    tie = bool(d.get('tie_word_embeddings', text.get('tie_word_embeddings', False)))
    # transformers >= 5 writes `rope_parameters`; hub snapshots (4.57) `rope_scaling` + theta.
    rope = dict(text.get('rope_parameters') or text.get('rope_scaling') or {})
    theta = rope.get('rope_theta', text.get('rope_theta', 5_000_000.0))
    rope_type = rope.get('rope_type', rope.get('type', 'default'))
    if rope_type != 'default':
      raise ValueError(f'text_config rope_type={rope_type!r} is not supported by this port '
                       f'(only "default" RoPE, as every released Qwen3-VL uses)')
    act = text.get('hidden_act', 'silu')
    if act != 'silu':
      raise ValueError(f'text_config hidden_act={act!r}: this port implements SwiGLU with silu')
    n_heads = text['num_attention_heads']
    return cls(
        vocab_size=text['vocab_size'], hidden_size=text['hidden_size'],
        intermediate_size=text['intermediate_size'],
        num_hidden_layers=text['num_hidden_layers'], num_attention_heads=n_heads,
        num_key_value_heads=text.get('num_key_value_heads') or n_heads,
        head_dim=text.get('head_dim') or text['hidden_size'] // n_heads,
        rms_norm_eps=text.get('rms_norm_eps', 1e-6), rope_theta=float(theta),
        mrope_section=tuple(rope.get('mrope_section', (24, 20, 20))),
        attention_bias=bool(text.get('attention_bias', False)), tie_word_embeddings=tie)


def mrope_axis_per_freq(mrope_section: tuple[int, int, int], n_freq: int) -> np.ndarray:
  """Which position axis (0=t, 1=h, 2=w) drives each rotary frequency (HF's interleaving)."""
  axis = np.zeros(n_freq, np.int32)
  for dim, offset in ((1, 1), (2, 2)):
    axis[offset:mrope_section[dim] * 3:3] = dim
  return axis


def mrope_cos_sin(position_ids_3bs: jax.Array, cfg: TextConfig) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, S, head_dim] (float32) for 3-D positions [3, B, S]."""
  inv_freq = layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta)
  axis = mrope_axis_per_freq(cfg.mrope_section, inv_freq.shape[0])
  pos_bsf = jnp.moveaxis(position_ids_3bs.astype(jnp.float32)[axis], 0, -1)
  freqs = pos_bsf * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


class DecoderLayer(nnx.Module):
  """Pre-norm block: h + attn(norm(h)), then h + mlp(norm(h))."""

  def __init__(self, cfg: TextConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.input_layernorm = layers.RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.self_attn = layers.Attention(
        d, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, qk_norm=True,
        bias=cfg.attention_bias, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype,
        rngs=rngs)
    self.post_attention_layernorm = layers.RMSNorm(d, eps=cfg.rms_norm_eps,
                                                   param_dtype=param_dtype)
    self.mlp = layers.SwiGLU(d, cfg.intermediate_size, dtype=dtype, param_dtype=param_dtype,
                             rngs=rngs)

  def __call__(self, h_bsd, cos, sin, *, cache=None, cache_index=0):
    a, cache = self.self_attn(self.input_layernorm(h_bsd), cos, sin, cache=cache,
                              cache_index=cache_index)
    h_bsd = h_bsd + a
    return h_bsd + self.mlp(self.post_attention_layernorm(h_bsd)), cache


def _last_layer_needed(sites: Optional[Collection[str]], n_layers: int) -> int:
  """How many decoder layers the requested sites need (all when logits/final norm are asked)."""
  if sites is None:
    return n_layers
  need = 0
  for s in sites:
    if s.startswith('text/layer_'):
      need = max(need, int(s.split('/')[1][len('layer_'):]) + 1)
    elif s in ('text/final_norm', 'logits'):
      return n_layers
  return need


class Qwen3VLText(nnx.Module):
  """Embedding, decoder layers (with deepstack), final norm and lm_head (None when tied)."""

  def __init__(self, cfg: TextConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                            for _ in range(cfg.num_hidden_layers)])
    self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.lm_head = None if cfg.tie_word_embeddings else nnx.Linear(
        cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
        rngs=rngs)

  def embed(self, input_ids_bs: jax.Array) -> jax.Array:
    return self.embed_tokens(input_ids_bs)

  def logits(self, h_bsd: jax.Array) -> jax.Array:
    if self.lm_head is None:
      return self.embed_tokens.attend(h_bsd)
    return self.lm_head(h_bsd)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> list[layers.KVCache]:
    """Zeroed K/V buffers [B, max_len, n_kv_heads, head_dim] per layer."""
    dtype = dtype or self.embed_tokens.embedding[...].dtype
    shape = (batch, max_len, self.cfg.num_key_value_heads, self.cfg.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.layers]

  def __call__(self, embeds_bsd: jax.Array, position_ids_3bs: jax.Array, *,
               visual_idx: Optional[jax.Array] = None,
               deepstack: tuple[jax.Array, ...] = (),
               edits: Optional[Edits] = None,
               sites: Optional[Collection[str]] = None,
               cache: Optional[list[layers.KVCache]] = None,
               cache_index: jax.Array | int = 0,
               last_only: bool = False) -> tuple[dict[str, jax.Array], Optional[list]]:
    """Runs the decoder on input embeddings (image features already merged in).

    embeds_bsd: [B, S, D]; position_ids_3bs: [3, B, S] (t, h, w).
    visual_idx: [n_visual] flat indices into B * S of the visual tokens (deepstack targets).
    deepstack: features [n_visual, D] added after layers 0, 1, ... (HF's `_deepstack_process`).
    sites: names to return (None: all); a forward stops after the last layer it needs.
    cache / cache_index: KV cache from `init_cache` and the slot of the first new token.
    last_only: final norm and logits only for the last position (generation).
    Returns (activations by site name, updated cache or None).
    """
    site = layers.Sites(edits, sites)
    out = site.out

    if deepstack and visual_idx is None:
      raise ValueError('deepstack features given without visual_idx (their token positions)')
    b, s, d = embeds_bsd.shape
    h = site('text/embed', embeds_bsd)
    cos, sin = mrope_cos_sin(position_ids_3bs, self.cfg)
    n_run = _last_layer_needed(sites, len(self.layers))
    new_cache = None if cache is None else list(cache)
    for i in range(n_run):
      h, layer_cache = self.layers[i](h, cos, sin, cache=None if cache is None else cache[i],
                                      cache_index=cache_index)
      if cache is not None:
        new_cache[i] = layer_cache
      if i < len(deepstack):
        h = h.reshape(b * s, d).at[visual_idx].add(deepstack[i].astype(h.dtype))
        h = h.reshape(b, s, d)
      h = site(f'text/layer_{i}', h)
    if n_run == len(self.layers):
      if last_only:
        h = h[:, -1:]
      h = site('text/final_norm', self.norm(h))
      site('logits', self.logits(h))
    return out, new_cache


def hf_name_map(cfg: TextConfig, prefix: str = 'model.language_model.', *,
                root: tuple = (), lm_head: Optional[str] = 'lm_head.weight'
                ) -> dict[str, tuple[tuple, Callable[[np.ndarray], np.ndarray]]]:
  """HF tensor name -> (NNX state path under `root`, transform): `hf.load`'s name map.

  prefix: where HF keeps the text model ('model.language_model.' in
  Qwen3VLForConditionalGeneration, '' for a saved Qwen3VLTextModel). lm_head: its HF name
  (None to leave it out); ignored when the embeddings are tied (the port has no lm_head then).
  torch Linear weights are [out, in]; NNX kernels are [in, out], hence the transpose.
  """
  ident, transpose = hf.identity, hf.transpose
  m = {f'{prefix}embed_tokens.weight': (root + ('embed_tokens', 'embedding'), ident),
       f'{prefix}norm.weight': (root + ('norm', 'weight'), ident)}
  for i in range(cfg.num_hidden_layers):
    h, us = f'{prefix}layers.{i}.', root + ('layers', i)
    for norm in ('input_layernorm', 'post_attention_layernorm'):
      m[f'{h}{norm}.weight'] = (us + (norm, 'weight'), ident)
    for proj in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
      m[f'{h}self_attn.{proj}.weight'] = (us + ('self_attn', proj, 'kernel'), transpose)
      if cfg.attention_bias:
        m[f'{h}self_attn.{proj}.bias'] = (us + ('self_attn', proj, 'bias'), ident)
    for norm in ('q_norm', 'k_norm'):
      m[f'{h}self_attn.{norm}.weight'] = (us + ('self_attn', norm, 'weight'), ident)
    for proj in ('gate_proj', 'up_proj', 'down_proj'):
      m[f'{h}mlp.{proj}.weight'] = (us + ('mlp', proj, 'kernel'), transpose)
  if lm_head is not None and not cfg.tie_word_embeddings:
    m[lm_head] = (root + ('lm_head', 'kernel'), transpose)
  return m
