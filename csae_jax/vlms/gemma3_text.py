"""The Gemma-3 decoder (Flax NNX, torch-free): parity port of HF's `Gemma3TextModel` + lm_head.

What differs from the Qwen3 decoder, and how it is done here:
- Layers alternate sliding-window and global attention (`layer_types`), each kind with its own
  RoPE base (`rope_parameters[kind].rope_theta`; 'linear' scaling divides the frequencies by its
  factor, as Gemma-3-4B's global layers do). Sliding layers see keys with q - k < window.
- Norms are RMSNorm(1 + w) (`layers.RMSNorm(one_plus=True)`); every block has four of them
  (input, post-attention, pre- and post-feedforward), and q/k are normalised per head before
  RoPE. Scores are scaled by query_pre_attn_scalar ** -0.5, not head_dim ** -0.5.
- Token embeddings are multiplied by sqrt(hidden) (cast to the parameter dtype first, as HF
  does); image features merged in afterwards are not (`Gemma3.embed_inputs`).
- Image tokens attend bidirectionally within their own image: HF's `token_type_ids` turn the
  causal mask into causal OR same-image-block (and, in sliding layers, AND within the window).
  Here `block_ids_bs` (-1 for text, the image's index for its soft tokens) does the same.
- Generation keeps one full-length K/V buffer per layer and masks sliding layers to their
  window: the same numbers as HF's sliding cache, with static shapes (one compilation).

Sites: `text/embed`, `text/layer_{i}` (residual after layer i = HF's hidden_states[i + 1]),
`text/final_norm`, `logits`. Final-logit softcapping is not applied: HF's
`Gemma3ForConditionalGeneration` does not apply it either.
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
SLIDING, FULL = 'sliding_attention', 'full_attention'
# transformers' Gemma3TextConfig defaults (the fields this port reads).
GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    'vocab_size': 262_208, 'hidden_size': 2304, 'intermediate_size': 9216,
    'num_hidden_layers': 26, 'num_attention_heads': 8, 'num_key_value_heads': 4,
    'head_dim': 256, 'query_pre_attn_scalar': 256, 'sliding_window': 4096, 'rms_norm_eps': 1e-6,
    'hidden_activation': 'gelu_pytorch_tanh'}


@dataclasses.dataclass(frozen=True)
class Gemma3TextConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  layer_types: tuple[str, ...]
  sliding_window: int
  query_pre_attn_scalar: float
  rope_theta: dict  # {layer type: theta}
  rope_factor: dict  # {layer type: linear scaling factor (1.0 = default RoPE)}
  rms_norm_eps: float = 1e-6
  hidden_activation: str = 'gelu_pytorch_tanh'
  attn_logit_softcapping: Optional[float] = None
  attention_bias: bool = False
  tie_word_embeddings: bool = True

  def __hash__(self):  # dict fields: hash by the frozen tuple of items
    return hash((self.vocab_size, self.hidden_size, self.num_hidden_layers, self.layer_types,
                 tuple(sorted(self.rope_theta.items()))))

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> 'Gemma3TextConfig':
    """From a Gemma-3 config.json dict (the whole config, or its `text_config`), hub style
    (rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern) or transformers 5
    style (rope_parameters per layer type, layer_types)."""
    # Hub configs leave out what equals HF's Gemma3TextConfig defaults (Gemma-3-4B omits the
    # vocabulary, heads and head_dim): missing keys take those defaults.
    text = {**GEMMA3_TEXT_DEFAULTS, **d.get('text_config', d)}
    tie = bool(d.get('tie_word_embeddings', text.get('tie_word_embeddings', True)))
    if text.get('use_bidirectional_attention'):
      raise ValueError('text_config.use_bidirectional_attention=True (EmbeddingGemma) is not '
                       'supported by this port; Gemma-3 chat models are causal')
    n_layers = int(text['num_hidden_layers'])
    types = text.get('layer_types')
    if types is None:  # hub configs: every `sliding_window_pattern`-th layer is global
      pattern = int(text.get('sliding_window_pattern', text.get('_sliding_window_pattern', 6)))
      types = [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]
    types = tuple(types)
    if len(types) != n_layers or set(types) - {SLIDING, FULL}:
      raise ValueError(f'text_config.layer_types={list(types)} must list {n_layers} entries of '
                       f'{SLIDING!r} / {FULL!r}')
    rope = text.get('rope_parameters')
    if rope is None:
      scaling = dict(text.get('rope_scaling') or {})
      rope = {FULL: {'rope_type': 'default', **scaling,
                     'rope_theta': text.get('rope_theta', 1_000_000.0)},
              SLIDING: {'rope_type': 'default',
                        'rope_theta': text.get('rope_local_base_freq', 10_000.0)}}
    theta, factor = {}, {}
    for kind in (SLIDING, FULL):
      p = dict(rope.get(kind) or {})
      kind_type = p.get('rope_type', p.get('type', 'default'))
      if kind_type not in ('default', 'linear'):
        raise ValueError(f'text_config rope_parameters[{kind!r}].rope_type={kind_type!r} is not '
                         'supported (only "default" and "linear", as released Gemma-3 models)')
      theta[kind] = float(p.get('rope_theta', 1_000_000.0 if kind == FULL else 10_000.0))
      factor[kind] = float(p.get('factor', 1.0)) if kind_type == 'linear' else 1.0
    n_heads = int(text['num_attention_heads'])
    head_dim = int(text.get('head_dim') or text['hidden_size'] // n_heads)
    cfg = cls(vocab_size=int(text['vocab_size']), hidden_size=int(text['hidden_size']),
              intermediate_size=int(text['intermediate_size']), num_hidden_layers=n_layers,
              num_attention_heads=n_heads,
              num_key_value_heads=int(text.get('num_key_value_heads') or n_heads),
              head_dim=head_dim, layer_types=types,
              sliding_window=int(text.get('sliding_window') or 4096),
              query_pre_attn_scalar=float(text.get('query_pre_attn_scalar', head_dim)),
              rope_theta=theta, rope_factor=factor,
              rms_norm_eps=float(text.get('rms_norm_eps', 1e-6)),
              hidden_activation=text.get('hidden_activation') or text.get('hidden_act')
              or 'gelu_pytorch_tanh',
              attn_logit_softcapping=text.get('attn_logit_softcapping'),
              attention_bias=bool(text.get('attention_bias', False)), tie_word_embeddings=tie)
    layers.activation(cfg.hidden_activation, 'text_config.hidden_activation')
    if n_heads % cfg.num_key_value_heads:
      raise ValueError(f'text_config num_attention_heads={n_heads} must be a multiple of '
                       f'num_key_value_heads={cfg.num_key_value_heads}')
    return cfg


def attention_masks(block_ids_bt: Optional[jax.Array], q_pos: jax.Array, t: int,
                    window: int, b: int) -> dict[str, jax.Array]:
  """{layer type: [B, S, T] bool} for queries at absolute positions q_pos and keys 0..T-1.

  full: key <= query, or both in the same image block (block id >= 0);
  sliding: that AND key > query - window (HF's create_masks_for_vision_model).
  block_ids_bt: [B, T] image index per key position (-1: text; None: no image blocks); query
  s uses the block id at its own position q_pos[s].
  """
  k_pos = jnp.arange(t)
  causal = k_pos[None, :] <= q_pos[:, None]
  full = jnp.broadcast_to(causal, (b, len(q_pos), t))
  if block_ids_bt is not None:
    q_blk = jnp.take(block_ids_bt, q_pos, axis=1)  # [B, S]
    same = (q_blk[:, :, None] == block_ids_bt[:, None, :]) & (q_blk[:, :, None] >= 0)
    full = full | same
  sliding = full & (k_pos[None, None, :] > q_pos[None, :, None] - window)
  return {FULL: full, SLIDING: sliding}


class DecoderLayer(nnx.Module):
  """h + post_attn_norm(attn(in_norm(h))), then h + post_ff_norm(mlp(pre_ff_norm(h)))."""

  def __init__(self, cfg: Gemma3TextConfig, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    d = cfg.hidden_size
    norm = lambda: layers.RMSNorm(d, eps=cfg.rms_norm_eps, one_plus=True,  # noqa: E731
                                  param_dtype=param_dtype)
    self.input_layernorm, self.post_attention_layernorm = norm(), norm()
    self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
    self.self_attn = layers.Attention(
        d, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, qk_norm=True,
        bias=cfg.attention_bias, eps=cfg.rms_norm_eps, scale=cfg.query_pre_attn_scalar ** -0.5,
        softcap=cfg.attn_logit_softcapping, norm_one_plus=True, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)
    self.mlp = layers.SwiGLU(d, cfg.intermediate_size,
                             act=layers.activation(cfg.hidden_activation, 'hidden_activation'),
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, h_bsd, cos, sin, mask_bst, *, cache=None, cache_index=0):
    a, cache = self.self_attn(self.input_layernorm(h_bsd), cos, sin, cache=cache,
                              cache_index=cache_index, mask_bst=mask_bst)
    h_bsd = h_bsd + self.post_attention_layernorm(a)
    m = self.mlp(self.pre_feedforward_layernorm(h_bsd))
    return h_bsd + self.post_feedforward_layernorm(m), cache


class Gemma3Text(nnx.Module):
  """Scaled embedding, interleaved sliding/global layers, final norm, lm_head (None if tied)."""

  def __init__(self, cfg: Gemma3TextConfig, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                            for _ in range(cfg.num_hidden_layers)])
    self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, one_plus=True,
                               param_dtype=param_dtype)
    self.lm_head = None if cfg.tie_word_embeddings else nnx.Linear(
        cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
        rngs=rngs)

  def embed(self, input_ids_bs: jax.Array) -> jax.Array:
    """Token embeddings times sqrt(hidden); the scale is rounded to the weight dtype first (HF:
    sqrt(2560) is 50.5 in bf16, not 50.596)."""
    e = self.embed_tokens(input_ids_bs)
    return e * jnp.asarray(self.cfg.hidden_size ** 0.5, jnp.float32).astype(e.dtype)

  def logits(self, h_bsd: jax.Array) -> jax.Array:
    if self.lm_head is None:
      return self.embed_tokens.attend(h_bsd)
    return self.lm_head(h_bsd)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> list[layers.KVCache]:
    """Zeroed K/V buffers [B, max_len, n_kv_heads, head_dim] per layer (sliding layers too:
    their window is a mask, so every layer's buffer has the same static shape)."""
    dtype = dtype or self.embed_tokens.embedding[...].dtype
    shape = (batch, max_len, self.cfg.num_key_value_heads, self.cfg.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.layers]

  def __call__(self, embeds_bsd: jax.Array, *, block_ids_bs: Optional[jax.Array] = None,
               edits: Optional[Edits] = None, sites: Optional[Collection[str]] = None,
               cache: Optional[list[layers.KVCache]] = None,
               cache_index: jax.Array | int = 0,
               last_only: bool = False) -> tuple[dict[str, jax.Array], Optional[list]]:
    """Runs the decoder on input embeddings (scaled text embeddings, image features merged in).

    embeds_bsd: [B, S, D], positions cache_index .. cache_index + S - 1 (no padding).
    block_ids_bs: [B, S] image index of each token (-1: text); None: causal only (decode steps,
    text-only prompts). Only valid with cache_index 0 (a prefill) or no cache.
    cache / cache_index: KV cache from `init_cache` and the slot of the first new token.
    last_only: final norm and logits only for the last position (generation).
    Returns (activations by site name, updated cache or None).
    """
    cfg = self.cfg
    site = layers.Sites(edits, sites)
    b, s, _ = embeds_bsd.shape
    h = site('text/embed', embeds_bsd)
    q_pos = jnp.arange(s) + jnp.asarray(cache_index, jnp.int32)
    t = s if cache is None else cache[0][0].shape[1]
    blocks = block_ids_bs
    if blocks is not None and t > s:  # key slots past the prompt are not written yet: text
      blocks = jnp.pad(blocks, ((0, 0), (0, t - s)), constant_values=-1)
    masks = attention_masks(blocks, q_pos, t, cfg.sliding_window, b)
    rope = {kind: layers.rope_cos_sin(jnp.broadcast_to(q_pos, (b, s)), cfg.head_dim,
                               cfg.rope_theta[kind], cfg.rope_factor[kind])
            for kind in set(cfg.layer_types)}
    n_run = layers.last_layer_needed(sites, len(self.layers))
    new_cache = None if cache is None else list(cache)
    for i in range(n_run):
      kind = cfg.layer_types[i]
      h, layer_cache = self.layers[i](h, *rope[kind], masks[kind],
                                      cache=None if cache is None else cache[i],
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


def hf_name_map(cfg: Gemma3TextConfig, prefix: str = 'model.language_model.', *,
                root: tuple = (), lm_head: Optional[str] = 'lm_head.weight'
                ) -> dict[str, tuple[tuple, Callable[[np.ndarray], np.ndarray]]]:
  """HF tensor name -> (NNX state path under `root`, transform): `hf.load`'s name map, in the
  canonical (transformers 5 module tree) layout; `Gemma3` renames the hub layout into it."""
  ident, transpose = hf.identity, hf.transpose
  m = {f'{prefix}embed_tokens.weight': (root + ('embed_tokens', 'embedding'), ident),
       f'{prefix}norm.weight': (root + ('norm', 'weight'), ident)}
  for i in range(cfg.num_hidden_layers):
    h, us = f'{prefix}layers.{i}.', root + ('layers', i)
    for norm in ('input_layernorm', 'post_attention_layernorm', 'pre_feedforward_layernorm',
                 'post_feedforward_layernorm'):
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
