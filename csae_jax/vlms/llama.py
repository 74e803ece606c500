"""The Llama decoder (LLaVA-1.5's Vicuna) in Flax NNX, torch-free: parity port of HF's
`LlamaModel` + lm_head, built from the shared layers (RMSNorm, GQA attention with a KV cache,
SwiGLU) with 1-D RoPE positions 0..S-1 and a causal mask.

Sites: `text/embed`, `text/layer_{i}` (residual after layer i = HF's hidden_states[i + 1]),
`text/final_norm`, `logits`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Collection, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from csae_jax.vlms import hf, layers

Edits = Mapping[str, Callable[[jax.Array], jax.Array]]
# transformers' LlamaConfig defaults (the fields this port reads): Llama-2-7B's sizes.
LLAMA_DEFAULTS: dict[str, Any] = {
    'vocab_size': 32_000, 'hidden_size': 4096, 'intermediate_size': 11_008,
    'num_hidden_layers': 32, 'num_attention_heads': 32, 'rms_norm_eps': 1e-6,
    'hidden_act': 'silu'}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10_000.0
  rope_factor: float = 1.0  # 'linear' scaling
  hidden_act: str = 'silu'
  attention_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> 'LlamaConfig':
    """From a Llama config dict (a LLaVA config.json's `text_config`, or a Llama one)."""
    # LLaVA's hub configs list only what differs from LlamaConfig's defaults (7B: none of the
    # sizes): missing keys take those defaults.
    text = {**LLAMA_DEFAULTS, **d.get('text_config', d)}
    rope = dict(text.get('rope_parameters') or text.get('rope_scaling') or {})
    kind = rope.get('rope_type', rope.get('type', 'default'))
    if kind not in ('default', 'linear'):
      raise ValueError(f'text_config rope_type={kind!r} is not supported (only "default" and '
                       '"linear"; LLaVA-1.5 uses the default)')
    if text.get('mlp_bias'):
      raise ValueError('text_config.mlp_bias=True is not supported by this port')
    n_heads = int(text['num_attention_heads'])
    cfg = cls(vocab_size=int(text['vocab_size']), hidden_size=int(text['hidden_size']),
              intermediate_size=int(text['intermediate_size']),
              num_hidden_layers=int(text['num_hidden_layers']), num_attention_heads=n_heads,
              num_key_value_heads=int(text.get('num_key_value_heads') or n_heads),
              head_dim=int(text.get('head_dim') or text['hidden_size'] // n_heads),
              rms_norm_eps=float(text.get('rms_norm_eps', 1e-6)),
              rope_theta=float(rope.get('rope_theta', text.get('rope_theta', 10_000.0))),
              rope_factor=float(rope.get('factor', 1.0)) if kind == 'linear' else 1.0,
              hidden_act=text.get('hidden_act', 'silu'),
              attention_bias=bool(text.get('attention_bias', False)),
              tie_word_embeddings=bool(d.get('tie_word_embeddings',
                                             text.get('tie_word_embeddings', False))))
    layers.activation(cfg.hidden_act, 'text_config.hidden_act')
    return cfg


class DecoderLayer(nnx.Module):
  """Pre-norm block: h + attn(norm(h)), then h + mlp(norm(h))."""

  def __init__(self, cfg: LlamaConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.input_layernorm = layers.RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.self_attn = layers.Attention(
        d, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
        bias=cfg.attention_bias, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype,
        rngs=rngs)
    self.post_attention_layernorm = layers.RMSNorm(d, eps=cfg.rms_norm_eps,
                                                   param_dtype=param_dtype)
    self.mlp = layers.SwiGLU(d, cfg.intermediate_size,
                             act=layers.activation(cfg.hidden_act, 'hidden_act'), dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)

  def __call__(self, h_bsd, cos, sin, *, cache=None, cache_index=0):
    a, cache = self.self_attn(self.input_layernorm(h_bsd), cos, sin, cache=cache,
                              cache_index=cache_index)
    h_bsd = h_bsd + a
    return h_bsd + self.mlp(self.post_attention_layernorm(h_bsd)), cache


class LlamaText(nnx.Module):
  """Embedding, decoder layers, final norm and lm_head (None when tied)."""

  def __init__(self, cfg: LlamaConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
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
    return self.embed_tokens.attend(h_bsd) if self.lm_head is None else self.lm_head(h_bsd)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> list[layers.KVCache]:
    dtype = dtype or self.embed_tokens.embedding[...].dtype
    shape = (batch, max_len, self.cfg.num_key_value_heads, self.cfg.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.layers]

  def __call__(self, embeds_bsd: jax.Array, *, edits: Optional[Edits] = None,
               sites: Optional[Collection[str]] = None,
               cache: Optional[list[layers.KVCache]] = None,
               cache_index: jax.Array | int = 0,
               last_only: bool = False) -> tuple[dict[str, jax.Array], Optional[list]]:
    """Decoder on input embeddings at positions cache_index .. cache_index + S - 1."""
    cfg = self.cfg
    site = layers.Sites(edits, sites)
    b, s, _ = embeds_bsd.shape
    h = site('text/embed', embeds_bsd)
    pos = jnp.broadcast_to(jnp.arange(s) + jnp.asarray(cache_index, jnp.int32), (b, s))
    cos, sin = layers.rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, cfg.rope_factor)
    n_run = layers.last_layer_needed(sites, len(self.layers))
    new_cache = None if cache is None else list(cache)
    for i in range(n_run):
      h, layer_cache = self.layers[i](h, cos, sin, cache=None if cache is None else cache[i],
                                      cache_index=cache_index)
      if cache is not None:
        new_cache[i] = layer_cache
      h = site(f'text/layer_{i}', h)
    if n_run == len(self.layers):
      if last_only:
        h = h[:, -1:]
      h = site('text/final_norm', self.norm(h))
      site('logits', self.logits(h))
    return site.out, new_cache


def hf_name_map(cfg: LlamaConfig, prefix: str = 'model.language_model.', *, root: tuple = (),
                lm_head: Optional[str] = 'lm_head.weight'
                ) -> dict[str, tuple[tuple, Callable[[np.ndarray], np.ndarray]]]:
  """HF tensor name -> (state path under `root`, transform), canonical layout."""
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
    for proj in ('gate_proj', 'up_proj', 'down_proj'):
      m[f'{h}mlp.{proj}.weight'] = (us + ('mlp', proj, 'kernel'), transpose)
  if lm_head is not None and not cfg.tie_word_embeddings:
    m[lm_head] = (root + ('lm_head', 'kernel'), transpose)
  return m
