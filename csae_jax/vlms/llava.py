"""LLaVA-1.5 (CLIP ViT tower + 2-layer MLP projector + Llama decoder) in Flax NNX, torch-free:
forward with named sites and edits, greedy generation with a KV cache.

Follows HF's `LlavaModel.forward`: the tower's hidden state at `vision_feature_layer` (-2: the
output of the second-to-last layer, so the last layer never runs), minus the CLS token under the
'default' select strategy ('full' keeps it), goes through linear_1 -> act -> linear_2
(`vision/projector`, [n_images, n_tokens, D]); those tokens replace the `<image>` placeholders
(expanded to one per patch, as LlavaProcessor does) in sequence order; the Llama decoder runs
causally over the whole sequence (no image-block attention in LLaVA).

Checkpoints: hub snapshots and transformers 5 saves both load (`hf.VLM_LAYOUTS`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Collection, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from csae_jax.vlms import clip, decoding, hf, layers, llama, siglip
from csae_jax.vlms import edits as edits_lib

Edits = Mapping[str, Callable[[jax.Array], jax.Array]]

# config.json of llava-hf/llava-1.5-7b-hf and -13b-hf as published on the hub (the text configs
# list only what differs from LlamaConfig's defaults: the 7B takes Llama-2-7B's sizes).
_CLIP_L14_336 = {'hidden_size': 1024, 'image_size': 336, 'intermediate_size': 4096,
                 'model_type': 'clip_vision_model', 'num_attention_heads': 16,
                 'num_hidden_layers': 24, 'patch_size': 14, 'projection_dim': 768,
                 'vocab_size': 32000}
_LLAVA_TOP = {'architectures': ['LlavaForConditionalGeneration'], 'model_type': 'llava',
              'ignore_index': -100, 'image_token_index': 32000, 'pad_token_id': 32001,
              'projector_hidden_act': 'gelu', 'tie_word_embeddings': False,
              'vision_feature_layer': -2, 'vision_feature_select_strategy': 'default'}
LLAVA_15_7B_CONFIG: dict[str, Any] = {
    **_LLAVA_TOP, 'vision_config': dict(_CLIP_L14_336),
    'text_config': {'architectures': ['LlamaForCausalLM'], 'max_position_embeddings': 4096,
                    'model_type': 'llama', 'rms_norm_eps': 1e-05, 'vocab_size': 32064}}
LLAVA_15_13B_CONFIG: dict[str, Any] = {
    **_LLAVA_TOP, 'vision_config': dict(_CLIP_L14_336),
    'text_config': {'architectures': ['LlamaForCausalLM'], 'hidden_size': 5120,
                    'intermediate_size': 13824, 'max_position_embeddings': 4096,
                    'model_type': 'llama', 'num_attention_heads': 40, 'num_hidden_layers': 40,
                    'num_key_value_heads': 40, 'pad_token_id': 0, 'rms_norm_eps': 1e-05,
                    'vocab_size': 32064}}


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  text: llama.LlamaConfig
  vision: clip.ClipConfig
  image_token_id: int
  vision_feature_layer: int
  select_strategy: str  # 'default' (drop CLS) | 'full'
  projector_act: str
  projector_bias: bool

  @property
  def feature_layers(self) -> int:
    """Vision layers that run: hidden_states[k] is the output of layer k - 1."""
    n = self.vision.num_hidden_layers
    return self.vision_feature_layer % (n + 1)

  @property
  def n_image_tokens(self) -> int:
    return self.vision.n_patches + (self.select_strategy == 'full')

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> 'LlavaConfig':
    if 'text_config' not in d or 'vision_config' not in d:
      raise ValueError('a LLaVA config.json needs "text_config" and "vision_config"; got keys '
                       f'{sorted(d)}')
    layer = d.get('vision_feature_layer', -2)
    if not isinstance(layer, int):
      raise ValueError(f'vision_feature_layer={layer}: only one feature layer is supported '
                       '(LLaVA-1.5 uses -2)')
    strategy = d.get('vision_feature_select_strategy', 'default')
    if strategy not in ('default', 'full'):
      raise ValueError(f'vision_feature_select_strategy={strategy!r}: use "default" or "full"')
    cfg = cls(text=llama.LlamaConfig.from_hf(d), vision=clip.ClipConfig.from_hf(d['vision_config']),
              image_token_id=int(d.get('image_token_index', d.get('image_token_id', 32000))),
              vision_feature_layer=int(layer), select_strategy=strategy,
              projector_act=d.get('projector_hidden_act', 'gelu'),
              projector_bias=bool(d.get('multimodal_projector_bias', True)))
    layers.activation(cfg.projector_act, 'projector_hidden_act')
    if cfg.feature_layers < 1:
      raise ValueError(f'vision_feature_layer={layer} selects the embeddings, not a layer')
    return cfg


class Projector(nnx.Module):
  """linear_2(act(linear_1(x))): vision width -> text width."""

  def __init__(self, cfg: LlavaConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(use_bias=cfg.projector_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = layers.activation(cfg.projector_act, 'projector_hidden_act')
    self.linear_1 = nnx.Linear(cfg.vision.hidden_size, cfg.text.hidden_size, **kw)
    self.linear_2 = nnx.Linear(cfg.text.hidden_size, cfg.text.hidden_size, **kw)

  def __call__(self, x):
    return self.linear_2(self.act(self.linear_1(x)))


def hf_name_map(cfg: LlavaConfig) -> dict[str, tuple[tuple, Callable]]:
  """`hf.load`'s name map of LlavaForConditionalGeneration (canonical layout)."""
  m = {**clip.hf_name_map(cfg.vision, 'model.vision_tower.', root=('vision_tower',)),
       **llama.hf_name_map(cfg.text, 'model.language_model.', root=('language_model',))}
  for lin in ('linear_1', 'linear_2'):
    h, us = f'model.multi_modal_projector.{lin}.', ('multi_modal_projector', lin)
    m[h + 'weight'] = (us + ('kernel',), hf.transpose)
    if cfg.projector_bias:
      m[h + 'bias'] = (us + ('bias',), hf.identity)
  return m


class Llava(nnx.Module):
  """`vision_tower` (CLIP), `multi_modal_projector`, `language_model` (Llama + head)."""

  def __init__(self, cfg: LlavaConfig | Mapping[str, Any], *, dtype=jnp.float32,
               rngs: Optional[nnx.Rngs] = None):
    cfg = cfg if isinstance(cfg, LlavaConfig) else LlavaConfig.from_hf(cfg)
    rngs = rngs or nnx.Rngs(0)
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.cfg = cfg
    self.vision_tower = clip.ClipVision(cfg.vision, **kw)
    self.multi_modal_projector = Projector(cfg, **kw)
    self.language_model = llama.LlamaText(cfg.text, **kw)

  @classmethod
  def from_pretrained(cls, folder: str, *, dtype=jnp.float32, mesh=None) -> 'Llava':
    """Loads a local snapshot (hub or transformers 5 layout, one file or sharded)."""
    cfg = LlavaConfig.from_hf(hf.read_config(folder))
    abstract = nnx.eval_shape(lambda: cls(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    return hf.load(folder, abstract, hf_name_map(cfg), dtype=dtype, mesh=mesh,
                   rename=hf.VLM_LAYOUTS)

  def site_names(self) -> list[str]:
    n = self.cfg.text.num_hidden_layers
    return (self.vision_tower.site_names() + ['vision/projector', 'text/embed'] +
            [f'text/layer_{i}' for i in range(n)] + ['text/final_norm', 'logits'])

  def vision_sites(self, pixels_bchw, edits: Edits, sites: Optional[Collection[str]]):
    """Vision sites (None: all) and `vision/projector` when asked for or a text site is; the
    tower stops at the last layer needed (feature layer -2: the last layer does not run)."""
    want_proj = sites is None or any(not s.startswith('vision/') or s == 'vision/projector'
                                     for s in sites)
    k = self.cfg.feature_layers
    depth = self.cfg.vision.num_hidden_layers
    if sites is None or 'vision/post_layernorm' in sites:
      inner, n_layers = None, depth
    else:
      inner = set(sites) | ({f'vision/block_{k - 1}'} if want_proj else set())
      n_layers = siglip.last_layer_needed([s for s in inner if s.startswith('vision/block_')],
                                          depth)
    out = self.vision_tower(pixels_bchw, edits=edits, sites=inner, n_layers=n_layers)
    if want_proj:
      feats = out[f'vision/block_{k - 1}']
      if self.cfg.select_strategy == 'default':
        feats = feats[:, 1:]
      out['vision/projector'] = layers.Sites(edits, None)('vision/projector',
                                                          self.multi_modal_projector(feats))
    return out

  def embed_inputs(self, ids_bs, pixels_bchw, image_idx, edits, sites):
    embeds = self.language_model.embed(ids_bs)
    if pixels_bchw is None:
      return embeds, {}
    wanted = None if sites is None else [s for s in sites if s.startswith('vision/')]
    vis = self.vision_sites(pixels_bchw, edits, None if wanted is None else
                            wanted + ['vision/projector'])
    b, s, d = embeds.shape
    feats = vis['vision/projector'].reshape(-1, d).astype(embeds.dtype)
    embeds = embeds.reshape(b * s, d).at[image_idx].set(feats).reshape(b, s, d)
    return embeds, {k: v for k, v in vis.items() if sites is None or k in sites}

  def _check_names(self, edits, sites):
    valid = set(self.site_names())
    bad = sorted(set(edits or ()) - valid) + sorted(set(sites or ()) - valid)
    if bad:
      raise ValueError(f'unknown site(s) {bad}; valid: vision/embed, vision/block_0..'
                       f'{self.cfg.vision.num_hidden_layers - 1}, vision/post_layernorm, '
                       f'vision/projector, text/embed, text/layer_0..'
                       f'{self.cfg.text.num_hidden_layers - 1}, text/final_norm, logits')

  def _check_pixels(self, pixel_values, grid_thw) -> None:
    """[n, 3, S, S] pixels; grid_thw (optional, the common port interface) one (1, S/p, S/p)
    grid per image."""
    self.vision_tower.check_pixels(np.asarray(pixel_values))
    side = self.cfg.vision.side
    if grid_thw is not None and np.any(np.asarray(grid_thw).reshape(-1, 3) != (1, side, side)):
      raise ValueError(f'grid_thw {np.asarray(grid_thw).tolist()}: LLaVA takes one '
                       f'(1, {side}, {side}) grid per image (pass None or the preprocessor\'s)')

  def _check(self, input_ids, pixel_values, grid_thw):
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
      ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f'input_ids must be integer [batch, seq] (or [seq]); got {ids.dtype} '
                       f'{ids.shape}')
    n_tok = int((ids == self.cfg.image_token_id).sum())
    n_img = 0 if pixel_values is None else int(np.shape(pixel_values)[0])
    per = self.cfg.n_image_tokens
    if n_tok != n_img * per:
      raise ValueError(f'input_ids hold {n_tok} image tokens (id {self.cfg.image_token_id}) but '
                       f'{n_img} image(s) give {n_img * per} ({per} each); expand each <image> '
                       'as LlavaProcessor does (`preprocess.LlavaPreprocessor`)')
    if pixel_values is not None:
      self._check_pixels(pixel_values, grid_thw)
    idx = np.flatnonzero(ids.reshape(-1) == self.cfg.image_token_id).astype(np.int32)
    return ids.astype(np.int32), idx

  def forward(self, input_ids, pixel_values=None, grid_thw=None, *,
              edits: Optional[Edits] = None,
              sites: Optional[Collection[str]] = None) -> dict[str, jax.Array]:
    """Named intermediates of one forward (all when sites is None)."""
    self._check_names(edits, sites)
    ids, idx = self._check(input_ids, pixel_values, grid_thw)
    e, leaves, s = edits_lib.jit_args(edits, sites)
    graphdef, state = nnx.split(self)
    return _forward(graphdef, state, ids, pixel_values, idx, leaves, edits=e, sites=s)

  def vision_forward(self, pixel_values, grid_thw=None, *, edits: Optional[Edits] = None,
                     sites: Optional[Collection[str]] = None) -> dict[str, jax.Array]:
    """Vision sites only (tower + projector)."""
    self._check_names(edits, sites)
    self._check_pixels(pixel_values, grid_thw)
    e, leaves, s = edits_lib.jit_args(edits, sites)
    graphdef, state = nnx.split(self)
    return _vision(graphdef, state, pixel_values, leaves, edits=e, sites=s)

  def generate(self, input_ids, pixel_values=None, grid_thw=None, max_new_tokens: int = 16, *,
               edits: Optional[Edits] = None,
               eos_token_id: Optional[int | Sequence[int]] = None,
               pad_token_id: Optional[int] = None, return_logits: bool = False):
    """Greedy decoding, as `Gemma3.generate`."""
    self._check_names(edits, None)
    ids, idx = self._check(input_ids, pixel_values, grid_thw)
    if max_new_tokens < 1:
      raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
    eos, pad = decoding.eos_and_pad(eos_token_id, pad_token_id)
    e, leaves, _ = edits_lib.jit_args(edits)
    e_txt, leaves_txt, _ = edits_lib.jit_args(
        {k: v for k, v in (edits or {}).items() if not k.startswith('vision/')})
    graphdef, state = nnx.split(self)
    first, cache = _prefill(graphdef, state, ids, pixel_values, idx, leaves, edits=e,
                            max_len=ids.shape[1] + max_new_tokens)
    out = _decode(graphdef, state, cache, first, leaves_txt, ids.shape[1], edits=e_txt,
                  max_new=max_new_tokens, eos=eos, pad=pad, keep_logits=return_logits)
    return decoding.finish(*out, return_logits)


@functools.partial(jax.jit, static_argnames=('graphdef', 'edits', 'sites'))
def _vision(graphdef, state, pixels, edit_leaves, *, edits, sites):
  model = nnx.merge(graphdef, state)
  out = model.vision_sites(pixels, edits_lib.merge(edits, edit_leaves), sites)
  return {k: v for k, v in out.items() if sites is None or k in sites}


@functools.partial(jax.jit, static_argnames=('graphdef', 'edits', 'sites'))
def _forward(graphdef, state, ids, pixels, image_idx, edit_leaves, *, edits, sites):
  model = nnx.merge(graphdef, state)
  edits = edits_lib.merge(edits, edit_leaves)
  if sites is not None and pixels is not None and all(s.startswith('vision/') for s in sites):
    out = model.vision_sites(pixels, edits, sites)
    return {k: v for k, v in out.items() if k in sites}
  embeds, out = model.embed_inputs(ids, pixels, image_idx, edits, sites)
  acts, _ = model.language_model(embeds, edits=edits, sites=sites)
  return {**out, **acts}


@functools.partial(jax.jit, static_argnames=('graphdef', 'edits', 'max_len'))
def _prefill(graphdef, state, ids, pixels, image_idx, edit_leaves, *, edits, max_len):
  model = nnx.merge(graphdef, state)
  edits = edits_lib.merge(edits, edit_leaves)
  embeds, _ = model.embed_inputs(ids, pixels, image_idx, edits, ())
  cache = model.language_model.init_cache(ids.shape[0], max_len, embeds.dtype)
  acts, cache = model.language_model(embeds, edits=edits, sites=('logits',), cache=cache,
                                     cache_index=0, last_only=True)
  return acts['logits'][:, -1], cache


@functools.partial(jax.jit, static_argnames=('graphdef', 'prompt_len', 'edits', 'max_new', 'eos',
                                             'pad', 'keep_logits'))
def _decode(graphdef, state, cache, first_logits_bv, edit_leaves, prompt_len, *, edits, max_new,
            eos, pad, keep_logits):
  model = nnx.merge(graphdef, state)
  edits = edits_lib.merge(edits, edit_leaves)
  lm = model.language_model

  def step(tok_b, slot, cache):
    acts, cache = lm(lm.embed(tok_b[:, None]), edits=edits, sites=('logits',), cache=cache,
                     cache_index=slot)
    return acts['logits'][:, -1], cache

  return decoding.greedy(step, first_logits_bv, cache, prompt_len, max_new=max_new, eos=eos,
                         pad=pad, keep_logits=keep_logits)
