"""Gemma-3 (SigLIP tower + multimodal projector + Gemma-3 decoder) in Flax NNX, torch-free:
forward with named sites and edits, greedy generation with a KV cache.

The composition follows HF's `Gemma3Model.forward`:
1. the SigLIP tower encodes each image [C, S, S] into (S/p)^2 patch tokens; its post-layernorm
   output goes to the projector, which average-pools the patch grid down to
   mm_tokens_per_image tokens (side / sqrt(mm_tokens) pooling windows), applies RMSNorm(1 + w)
   and projects to the text width (`vision/projector`);
2. the projected tokens replace the `<image_soft_token>` embeddings in sequence order (HF's
   masked_scatter); the other tokens are scaled by sqrt(hidden);
3. the decoder runs with image tokens attending bidirectionally within their image (HF's
   token_type_ids), causal elsewhere.

Checkpoint layouts: the name map is written in transformers 5's module tree
(`model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`,
`lm_head.weight`); `LAYOUTS` renames hub snapshots (`vision_tower.vision_model.*`,
`language_model.model.*`, `multi_modal_projector.*`) and transformers 5 saves
(`vision_tower.*`) into it. An image token id outside the vocabulary is looked up as id 0
before its embedding is replaced (HF does the same).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Collection, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from csae_jax.vlms import decoding, hf, layers, siglip
from csae_jax.vlms import edits as edits_lib
from csae_jax.vlms import gemma3_text as text_lib

Edits = Mapping[str, Callable[[jax.Array], jax.Array]]

LAYOUTS = hf.VLM_LAYOUTS

# config.json of google/gemma-3-4b-it as published on the hub (transformers 4.50 style: the text
# config lists only what differs from Gemma3TextConfig's defaults; vocab 262208, 8 heads, 4 kv
# heads, head_dim 256, query_pre_attn_scalar 256 come from those defaults).
GEMMA3_4B_CONFIG: dict[str, Any] = {
    'architectures': ['Gemma3ForConditionalGeneration'], 'model_type': 'gemma3',
    'boi_token_index': 255999, 'eoi_token_index': 256000, 'eos_token_id': [1, 106],
    'image_token_index': 262144, 'initializer_range': 0.02, 'mm_tokens_per_image': 256,
    'text_config': {'hidden_size': 2560, 'intermediate_size': 10240,
                    'model_type': 'gemma3_text', 'num_hidden_layers': 34,
                    'rope_scaling': {'factor': 8.0, 'rope_type': 'linear'},
                    'sliding_window': 1024},
    'vision_config': {'hidden_size': 1152, 'image_size': 896, 'intermediate_size': 4304,
                      'model_type': 'siglip_vision_model', 'num_attention_heads': 16,
                      'num_hidden_layers': 27, 'patch_size': 14, 'vision_use_head': False},
}


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
  text: text_lib.Gemma3TextConfig
  vision: siglip.SiglipConfig
  mm_tokens_per_image: int
  image_token_id: int
  boi_token_id: int
  eoi_token_id: int

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> 'Gemma3Config':
    """From a Gemma-3 (Gemma3ForConditionalGeneration) config.json dict."""
    if 'text_config' not in d or 'vision_config' not in d:
      raise ValueError('a Gemma-3 config.json needs "text_config" and "vision_config"; got keys '
                       f'{sorted(d)} (a text-only Gemma-3 1B has no vision tower)')
    vision = siglip.SiglipConfig.from_hf(d['vision_config'])
    if d['vision_config'].get('vision_use_head'):
      raise ValueError('vision_config.vision_use_head=True: Gemma-3 reads the patch tokens; the '
                       'attention-pooling head is not ported')
    cfg = cls(text=text_lib.Gemma3TextConfig.from_hf(d), vision=vision,
              mm_tokens_per_image=int(d.get('mm_tokens_per_image', 256)),
              image_token_id=int(d.get('image_token_index', d.get('image_token_id', 262144))),
              boi_token_id=int(d.get('boi_token_index', d.get('boi_token_id', 255999))),
              eoi_token_id=int(d.get('eoi_token_index', d.get('eoi_token_id', 256000))))
    side = math.isqrt(cfg.mm_tokens_per_image)
    if side * side != cfg.mm_tokens_per_image or vision.side % side:
      raise ValueError(f'mm_tokens_per_image={cfg.mm_tokens_per_image} must be a square whose '
                       f'side divides the patch grid side {vision.side} (image_size / patch)')
    return cfg


class MultiModalProjector(nnx.Module):
  """Patch tokens [B, side^2, Dv] -> [B, mm_tokens, Dt]: average pool on the patch grid,
  RMSNorm(1 + w) (eps = the vision layer_norm_eps, as HF), then x @ W [Dv, Dt]."""

  def __init__(self, cfg: Gemma3Config, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    del rngs
    dv, dt = cfg.vision.hidden_size, cfg.text.hidden_size
    self.side, self.out_side = cfg.vision.side, math.isqrt(cfg.mm_tokens_per_image)
    self.dtype = dtype
    self.mm_input_projection_weight = nnx.Param(jnp.zeros((dv, dt), param_dtype))
    self.mm_soft_emb_norm = layers.RMSNorm(dv, eps=cfg.vision.layer_norm_eps, one_plus=True,
                                           param_dtype=param_dtype)

  def __call__(self, x_bnd: jax.Array) -> jax.Array:
    b, _, d = x_bnd.shape
    k, t = self.side // self.out_side, self.out_side
    pooled = x_bnd.reshape(b, t, k, t, k, d).mean(axis=(2, 4)).reshape(b, t * t, d)
    w = self.mm_input_projection_weight[...]
    return (self.mm_soft_emb_norm(pooled) @ w.astype(pooled.dtype)).astype(x_bnd.dtype)


def block_ids(ids_bs: np.ndarray, image_token_id: int) -> np.ndarray:
  """[B, S] int32: for image tokens, the index of their image within the row (each run of
  consecutive image tokens is one image); -1 for text (HF's get_block_sequence_ids_for_mask)."""
  is_img = ids_bs == image_token_id
  start = is_img & ~np.pad(is_img, ((0, 0), (1, 0)))[:, :-1]
  return np.where(is_img, np.cumsum(start, axis=1) - 1, -1).astype(np.int32)


def hf_name_map(cfg: Gemma3Config) -> dict[str, tuple[tuple, Callable]]:
  """`hf.load`'s name map of Gemma3ForConditionalGeneration in the canonical layout."""
  m = {**siglip.hf_name_map(cfg.vision, 'model.vision_tower.', root=('vision_tower',)),
       **text_lib.hf_name_map(cfg.text, 'model.language_model.', root=('language_model',))}
  p = 'model.multi_modal_projector.'
  m[p + 'mm_input_projection_weight'] = (('multi_modal_projector', 'mm_input_projection_weight'),
                                         hf.identity)
  m[p + 'mm_soft_emb_norm.weight'] = (('multi_modal_projector', 'mm_soft_emb_norm', 'weight'),
                                      hf.identity)
  return m


class Gemma3(nnx.Module):
  """`vision_tower` (SigLIP), `multi_modal_projector`, `language_model` (decoder + head)."""

  def __init__(self, cfg: Gemma3Config | Mapping[str, Any], *, dtype=jnp.float32,
               rngs: Optional[nnx.Rngs] = None):
    cfg = cfg if isinstance(cfg, Gemma3Config) else Gemma3Config.from_hf(cfg)
    rngs = rngs or nnx.Rngs(0)
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.cfg = cfg
    self.vision_tower = siglip.SiglipVision(cfg.vision, **kw)
    self.multi_modal_projector = MultiModalProjector(cfg, **kw)
    self.language_model = text_lib.Gemma3Text(cfg.text, **kw)

  @classmethod
  def from_pretrained(cls, folder: str, *, dtype=jnp.float32, mesh=None) -> 'Gemma3':
    """Loads a local snapshot (hub or transformers 5 layout, one file or sharded; nothing is
    downloaded), parameters cast to `dtype` and placed on `mesh` (see `hf.load`)."""
    cfg = Gemma3Config.from_hf(hf.read_config(folder))
    abstract = nnx.eval_shape(lambda: cls(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    return hf.load(folder, abstract, hf_name_map(cfg), dtype=dtype, mesh=mesh, rename=LAYOUTS)

  # -- pieces used inside jit ------------------------------------------------------------------

  def vision_sites(self, pixels_bchw, edits: Edits, sites: Optional[Collection[str]]
                   ) -> dict[str, jax.Array]:
    """Vision tower sites, plus `vision/projector` [n_images, mm_tokens, Dt] when needed."""
    want_proj = sites is None or any(not s.startswith('vision/') or s == 'vision/projector'
                                     for s in sites)
    inner = None if (sites is None or want_proj) else sites
    out = self.vision_tower(pixels_bchw, edits=edits, sites=inner)
    if want_proj:
      site = layers.Sites(edits, None)
      out['vision/projector'] = site('vision/projector',
                                     self.multi_modal_projector(out['vision/post_layernorm']))
    return out

  def embed_inputs(self, ids_bs, pixels_bchw, image_idx, edits, sites):
    """(input embeddings [B, S, D] with the image tokens replaced, requested vision sites)."""
    vocab = self.cfg.text.vocab_size
    safe_ids = jnp.where(ids_bs >= vocab, 0, ids_bs)  # an out-of-vocab image id: look up 0
    embeds = self.language_model.embed(safe_ids)
    if pixels_bchw is None:
      return embeds, {}
    vis = self.vision_sites(pixels_bchw, edits, None)
    b, s, d = embeds.shape
    feats = vis['vision/projector'].reshape(-1, d).astype(embeds.dtype)
    embeds = embeds.reshape(b * s, d).at[image_idx].set(feats).reshape(b, s, d)
    return embeds, {k: v for k, v in vis.items() if sites is None or k in sites}

  def site_names(self) -> list[str]:
    n = self.cfg.text.num_hidden_layers
    return (self.vision_tower.site_names() + ['vision/projector', 'text/embed'] +
            [f'text/layer_{i}' for i in range(n)] + ['text/final_norm', 'logits'])

  def _check_names(self, edits, sites):
    valid = set(self.site_names())
    bad = sorted(set(edits or ()) - valid) + sorted(set(sites or ()) - valid)
    if bad:
      raise ValueError(f'unknown site(s) {bad}; valid: vision/patch_embed, vision/block_0..'
                       f'{self.cfg.vision.num_hidden_layers - 1}, vision/post_layernorm, '
                       f'vision/projector, text/embed, text/layer_0..'
                       f'{self.cfg.text.num_hidden_layers - 1}, text/final_norm, logits')

  def _check_grid(self, pixel_values, grid_thw) -> None:
    """grid_thw is optional (one fixed grid per image); when given (the common port interface
    of `registry.preprocessor`), it must be that grid."""
    if grid_thw is None or pixel_values is None:
      return
    side = self.cfg.vision.side
    grid = np.asarray(grid_thw).reshape(-1, 3)
    if len(grid) != np.shape(pixel_values)[0] or np.any(grid != (1, side, side)):
      raise ValueError(f'grid_thw {grid.tolist()}: Gemma-3 takes one (1, {side}, {side}) patch '
                       'grid per image (pass None or the preprocessor\'s grid)')

  def _check(self, input_ids, pixel_values):
    """Host-side validation; (ids int32 [B, S], image token flat indices, block ids)."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
      ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f'input_ids must be integer [batch, seq] (or [seq]); got {ids.dtype} '
                       f'{ids.shape}')
    n_tok = int((ids == self.cfg.image_token_id).sum())
    n_img = 0 if pixel_values is None else int(np.shape(pixel_values)[0])
    if n_tok != n_img * self.cfg.mm_tokens_per_image:
      raise ValueError(f'input_ids hold {n_tok} image tokens (id {self.cfg.image_token_id}) but '
                       f'{n_img} image(s) give {n_img * self.cfg.mm_tokens_per_image} '
                       f'(mm_tokens_per_image={self.cfg.mm_tokens_per_image} each); expand each '
                       '<start_of_image> as the processor does (`preprocess.Gemma3Preprocessor`)')
    if pixel_values is not None:
      self.vision_tower.check_pixels(np.asarray(pixel_values))
    idx = np.flatnonzero(ids.reshape(-1) == self.cfg.image_token_id).astype(np.int32)
    blocks = block_ids(ids, self.cfg.image_token_id) if n_img else None
    return ids.astype(np.int32), idx, blocks

  # -- public API ------------------------------------------------------------------------------

  def forward(self, input_ids, pixel_values=None, grid_thw=None, *,
              edits: Optional[Edits] = None,
              sites: Optional[Collection[str]] = None) -> dict[str, jax.Array]:
    """Named intermediates of one forward (all when sites is None); edits applied where a site
    is produced. input_ids [B, S] with the image placeholders expanded; pixel_values
    [n_images, 3, S, S] (images in sequence order). Vision sites are [n_images, N, D]."""
    self._check_names(edits, sites)
    self._check_grid(pixel_values, grid_thw)
    ids, idx, blocks = self._check(input_ids, pixel_values)
    e, leaves, s = edits_lib.jit_args(edits, sites)
    graphdef, state = nnx.split(self)
    return _forward(graphdef, state, ids, pixel_values, idx, blocks, leaves, edits=e, sites=s)

  def vision_forward(self, pixel_values, grid_thw=None, *, edits: Optional[Edits] = None,
                     sites: Optional[Collection[str]] = None) -> dict[str, jax.Array]:
    """Vision sites only (tower + projector), no text: what harvesting vision sites runs."""
    self._check_names(edits, sites)
    self._check_grid(pixel_values, grid_thw)
    self.vision_tower.check_pixels(np.asarray(pixel_values))
    e, leaves, s = edits_lib.jit_args(edits, sites)
    graphdef, state = nnx.split(self)
    return _vision(graphdef, state, pixel_values, leaves, edits=e, sites=s)

  def generate(self, input_ids, pixel_values=None, grid_thw=None, max_new_tokens: int = 16, *,
               edits: Optional[Edits] = None,
               eos_token_id: Optional[int | Sequence[int]] = None,
               pad_token_id: Optional[int] = None, return_logits: bool = False):
    """Greedy decoding: new token ids [B, n <= max_new_tokens] (HF `generate(do_sample=False)`).

    Edits apply in the prefill and, for text sites, at every decode step. Rows finished by an
    eos are padded (pad_token_id, else the first eos); decoding stops when all rows finished.
    return_logits: also every step's logits [B, n, V]. Rows share one length (no padding).
    """
    self._check_names(edits, None)
    self._check_grid(pixel_values, grid_thw)
    ids, idx, blocks = self._check(input_ids, pixel_values)
    if max_new_tokens < 1:
      raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
    eos, pad = decoding.eos_and_pad(eos_token_id, pad_token_id)
    e, leaves, _ = edits_lib.jit_args(edits)
    e_txt, leaves_txt, _ = edits_lib.jit_args(
        {k: v for k, v in (edits or {}).items() if not k.startswith('vision/')})
    graphdef, state = nnx.split(self)
    first, cache = _prefill(graphdef, state, ids, pixel_values, idx, blocks, leaves, edits=e,
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
def _forward(graphdef, state, ids, pixels, image_idx, blocks, edit_leaves, *, edits, sites):
  model = nnx.merge(graphdef, state)
  edits = edits_lib.merge(edits, edit_leaves)
  if sites is not None and pixels is not None and all(s.startswith('vision/') for s in sites):
    out = model.vision_sites(pixels, edits, sites)  # no text model needed
    return {k: v for k, v in out.items() if k in sites}
  embeds, out = model.embed_inputs(ids, pixels, image_idx, edits, sites)
  acts, _ = model.language_model(embeds, block_ids_bs=blocks, edits=edits, sites=sites)
  return {**out, **acts}


@functools.partial(jax.jit, static_argnames=('graphdef', 'edits', 'max_len'))
def _prefill(graphdef, state, ids, pixels, image_idx, blocks, edit_leaves, *, edits, max_len):
  """Prompt pass that fills the KV cache; returns (last-position logits [B, V], cache)."""
  model = nnx.merge(graphdef, state)
  edits = edits_lib.merge(edits, edit_leaves)
  embeds, _ = model.embed_inputs(ids, pixels, image_idx, edits, ())
  cache = model.language_model.init_cache(ids.shape[0], max_len, embeds.dtype)
  acts, cache = model.language_model(embeds, block_ids_bs=blocks, edits=edits,
                                     sites=('logits',), cache=cache, cache_index=0,
                                     last_only=True)
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

