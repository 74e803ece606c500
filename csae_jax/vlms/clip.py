"""The CLIP ViT vision tower (LLaVA-1.5's encoder) in Flax NNX, torch-free, matching
transformers' `CLIPVisionTransformer`.

CLIP differs from SigLIP (whose encoder layer it reuses: the same pre-LN layer, parameter names
and quick_gelu / GELU choice by config) in three places: a learned CLS embedding is prepended to
the patch tokens, the position table has N + 1 rows, and a `pre_layrnorm` (HF's spelling) runs
before the first layer; the conv patch embedding has no bias.

Sites, all [B, 1 + N, D] with the CLS token first and then the N = (image_size / patch)^2
patch tokens row-major: `vision/embed` (after pre_layrnorm = HF's hidden_states[0]),
`vision/block_{i}` (output of layer i = hidden_states[i + 1]) and `vision/post_layernorm`
(HF applies it to the CLS token only; here to every token, for completeness).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Collection, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from csae_jax.vlms import hf, layers, siglip

Edits = Mapping[str, Callable[[jax.Array], jax.Array]]


@dataclasses.dataclass(frozen=True)
class ClipConfig(siglip.SiglipConfig):
  """HF's `CLIPVisionConfig` fields the port uses, with HF's defaults (LLaVA-1.5's config sets
  ViT-L/14 at 336 px: hidden 1024, 24 layers, 16 heads)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5


class ClipVision(nnx.Module):
  """CLS + patch embedding, pre-layernorm, encoder layers, post-layernorm."""

  def __init__(self, cfg: ClipConfig | Mapping[str, Any], *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None):
    cfg = cfg if isinstance(cfg, ClipConfig) else ClipConfig.from_hf(cfg)
    rngs = rngs or nnx.Rngs(0)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d = cfg.hidden_size
    self.cfg, self.dtype = cfg, dtype
    self.class_embedding = nnx.Param(jnp.zeros((d,), param_dtype))
    self.patch_embedding = nnx.Linear(cfg.patch_dim, d, use_bias=False, **kw)
    self.position_embedding = nnx.Embed(cfg.n_patches + 1, d, **kw)
    self.pre_layrnorm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, **kw)
    self.layers = nnx.List([siglip.EncoderLayer(cfg, **kw)
                            for _ in range(cfg.num_hidden_layers)])
    self.post_layernorm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, **kw)

  def site_names(self) -> list[str]:
    return (['vision/embed'] + [f'vision/block_{i}' for i in range(self.cfg.num_hidden_layers)]
            + ['vision/post_layernorm'])

  check_pixels = siglip.SiglipVision.check_pixels

  def __call__(self, pixels_bchw: jax.Array, *, edits: Optional[Edits] = None,
               sites: Optional[Collection[str]] = None,
               n_layers: Optional[int] = None) -> dict[str, jax.Array]:
    """pixel_values [B, C, S, S] -> sites (see the module docstring).

    n_layers: run only the first n layers (LLaVA's vision_feature_layer -2 needs all but the
    last); None: as many as the requested sites need.
    """
    self.check_pixels(pixels_bchw)
    cfg = self.cfg
    site = layers.Sites(edits, sites)
    x = self.patch_embedding(siglip.patchify(pixels_bchw.astype(self.dtype), cfg.patch_size))
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[2]))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + self.position_embedding.embedding[...].astype(x.dtype)
    x = site('vision/embed', self.pre_layrnorm(x))
    n_run = n_layers if n_layers is not None else siglip.last_layer_needed(
        None if sites is None else [s for s in sites if s != 'vision/embed'],
        cfg.num_hidden_layers)
    for i in range(n_run):
      x = site(f'vision/block_{i}', self.layers[i](x))
    if n_run == cfg.num_hidden_layers and (sites is None or 'vision/post_layernorm' in sites):
      site('vision/post_layernorm', self.post_layernorm(x))
    return site.out


def hf_name_map(cfg: ClipConfig, prefix: str, *, root: tuple = ()
                ) -> dict[str, tuple[tuple, Callable[[np.ndarray], np.ndarray]]]:
  """HF tensor name -> (state path, transform), `prefix` = where `CLIPVisionTransformer` is
  kept (e.g. 'model.vision_tower.'). The encoder layers share SigLIP's names."""
  m = siglip.hf_name_map(cfg, prefix, root=root)
  del m[f'{prefix}embeddings.patch_embedding.bias']
  ident = hf.identity
  m[f'{prefix}embeddings.class_embedding'] = (root + ('class_embedding',), ident)
  m[f'{prefix}pre_layrnorm.weight'] = (root + ('pre_layrnorm', 'scale'), ident)
  m[f'{prefix}pre_layrnorm.bias'] = (root + ('pre_layrnorm', 'bias'), ident)
  return m
