"""The SigLIP vision tower (Gemma-3's image encoder) in Flax NNX, torch-free, matching
transformers' `SiglipVisionTransformer` numerically.

Why it is shaped this way:
- The patch embedding is HF's Conv2d with kernel = stride = patch: exactly a matmul over
  (C, P, P)-flattened patches, so it is an `nnx.Linear` [C*P*P, D] and the conv weight
  [D, C, P, P] flattens and transposes into it (`hf_name_map`).
- Images have the config's fixed size (Gemma-3 never interpolates SigLIP's learned position
  table): a batch is [B, C, H, W] with H = W = image_size, patches row-major over the grid
  (image_size // patch per side: a remainder is dropped, as by HF's conv).
- Pre-norm encoder layers (LayerNorm, biased q/k/v/out projections, plain MHA without a mask,
  an fc1 -> activation -> fc2 MLP); `post_layernorm` after the last layer. The attention-pooling
  head is in `image_encoders` (SigLIP alone); Gemma-3 sets vision_use_head=False.

Sites (values later layers see, after any edit), all [B, N, D] with N = (image_size // patch)^2
patch tokens row-major (token n is at row n // side, col n % side):
`vision/patch_embed` (patch + position embedding), `vision/block_{i}` (output of encoder layer i
= HF's hidden_states[i + 1]) and `vision/post_layernorm` (HF's last_hidden_state).
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


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
  """The fields of HF's `SiglipVisionConfig` the port uses, with HF's defaults (a config.json
  leaves out what equals them)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 16
  hidden_act: str = 'gelu_pytorch_tanh'
  layer_norm_eps: float = 1e-6

  @property
  def side(self) -> int:
    """Patches per image side."""
    return self.image_size // self.patch_size

  @property
  def n_patches(self) -> int:
    return self.side ** 2

  @property
  def patch_dim(self) -> int:
    return self.num_channels * self.patch_size ** 2

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> 'SiglipConfig':
    """From a SigLIP `vision_config` dict (of a Gemma-3 config.json, or a SigLIP one)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    for key in ('image_size', 'patch_size'):
      if isinstance(kw.get(key), (list, tuple)):
        if len(set(kw[key])) != 1:
          raise ValueError(f'vision_config.{key}={kw[key]}: only square images/patches are '
                           'supported')
        kw[key] = kw[key][0]
    cfg = cls(**kw)
    if cfg.hidden_size % cfg.num_attention_heads:
      raise ValueError(f'vision_config hidden_size={cfg.hidden_size} is not a multiple of '
                       f'num_attention_heads={cfg.num_attention_heads}')
    # image_size need not be a multiple of patch_size: HF's stride-p conv drops the last
    # image_size % p rows and columns (SigLIP so400m-patch14-384: 27 x 27 patches of 384 px).
    if cfg.image_size < cfg.patch_size:
      raise ValueError(f'vision_config image_size={cfg.image_size} is smaller than '
                       f'patch_size={cfg.patch_size}')
    layers.activation(cfg.hidden_act, 'vision_config.hidden_act')
    return cfg


def patchify(pixels_bchw: jax.Array, patch: int) -> jax.Array:
  """[B, C, H, W] -> [B, (H//p)(W//p), C*p*p]: row-major patches, each flattened as (C, p, p)
  (the order of the flattened Conv2d weight); a remainder past the last whole patch is dropped,
  as the stride-p conv does."""
  b, c, h, w = pixels_bchw.shape
  h, w = h // patch * patch, w // patch * patch
  pixels_bchw = pixels_bchw[:, :, :h, :w]
  x = pixels_bchw.reshape(b, c, h // patch, patch, w // patch, patch)
  return x.transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


class EncoderLayer(nnx.Module):
  """x + attn(ln1(x)), then x + mlp(ln2(x)); bidirectional MHA over one image's patches."""

  def __init__(self, cfg: SiglipConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d = cfg.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.n_heads = cfg.num_attention_heads
    self.layer_norm1 = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, **kw)
    self.layer_norm2 = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, **kw)
    self.q_proj = nnx.Linear(d, d, **kw)
    self.k_proj = nnx.Linear(d, d, **kw)
    self.v_proj = nnx.Linear(d, d, **kw)
    self.out_proj = nnx.Linear(d, d, **kw)
    self.fc1 = nnx.Linear(d, cfg.intermediate_size, **kw)
    self.fc2 = nnx.Linear(cfg.intermediate_size, d, **kw)
    self.act = layers.activation(cfg.hidden_act, 'vision_config.hidden_act')

  def __call__(self, x_bnd: jax.Array) -> jax.Array:
    b, n, d = x_bnd.shape
    h = self.layer_norm1(x_bnd)
    heads = lambda t: t.reshape(b, n, self.n_heads, d // self.n_heads)  # noqa: E731
    a = layers.attend(heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h)), None)
    x_bnd = x_bnd + self.out_proj(a.reshape(b, n, d))
    return x_bnd + self.fc2(self.act(self.fc1(self.layer_norm2(x_bnd))))


def last_layer_needed(sites: Optional[Collection[str]], depth: int) -> int:
  """Encoder layers the requested sites need: up to the last `vision/block_i` asked for, all of
  them for any other site (post_layernorm, the projector, text sites) or sites=None."""
  if sites is None:
    return depth
  last = -1
  for s in sites:
    if s.startswith('vision/block_'):
      last = max(last, int(s.rsplit('_', 1)[1]))
    elif s != 'vision/patch_embed':
      return depth
  return last + 1


class SiglipVision(nnx.Module):
  """Patch embedding, encoder layers and post-layernorm; `__call__` returns named sites."""

  def __init__(self, cfg: SiglipConfig | Mapping[str, Any], *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None):
    cfg = cfg if isinstance(cfg, SiglipConfig) else SiglipConfig.from_hf(cfg)
    rngs = rngs or nnx.Rngs(0)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.cfg, self.dtype = cfg, dtype
    self.patch_embedding = nnx.Linear(cfg.patch_dim, cfg.hidden_size, **kw)
    self.position_embedding = nnx.Embed(cfg.n_patches, cfg.hidden_size, **kw)
    self.layers = nnx.List([EncoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])
    self.post_layernorm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, **kw)

  def site_names(self) -> list[str]:
    return (['vision/patch_embed'] +
            [f'vision/block_{i}' for i in range(self.cfg.num_hidden_layers)] +
            ['vision/post_layernorm'])

  def check_pixels(self, pixels_bchw) -> None:
    c, s = self.cfg.num_channels, self.cfg.image_size
    if pixels_bchw.ndim != 4 or tuple(pixels_bchw.shape[1:]) != (c, s, s):
      raise ValueError(f'pixel_values has shape {tuple(pixels_bchw.shape)}; this vision tower '
                       f'needs [batch, {c}, {s}, {s}] (the image processor resizes to '
                       f'image_size={s})')

  def __call__(self, pixels_bchw: jax.Array, *, edits: Optional[Edits] = None,
               sites: Optional[Collection[str]] = None) -> dict[str, jax.Array]:
    """pixel_values [B, C, S, S] (normalised, as the processor returns them) -> sites.

    edits: site -> pure function (same shape), applied where the site is produced (non-vision
    keys are ignored). sites: the ones to return (None: all); layers after the last requested
    block are skipped unless a later site is asked for.
    """
    self.check_pixels(pixels_bchw)
    cfg = self.cfg
    site = layers.Sites(edits, sites)
    x = self.patch_embedding(patchify(pixels_bchw.astype(self.dtype), cfg.patch_size))
    x = site('vision/patch_embed', x + self.position_embedding.embedding[...].astype(x.dtype))
    n_run = last_layer_needed(sites, cfg.num_hidden_layers)
    for i in range(n_run):
      x = site(f'vision/block_{i}', self.layers[i](x))
    if n_run == cfg.num_hidden_layers:
      site('vision/post_layernorm', self.post_layernorm(x))
    return site.out


def hf_name_map(cfg: SiglipConfig, prefix: str, *, root: tuple = ()
                ) -> dict[str, tuple[tuple, Callable[[np.ndarray], np.ndarray]]]:
  """HF tensor name -> (state path under `root`, transform); `prefix` is where the checkpoint
  keeps `SiglipVisionTransformer` (e.g. 'model.vision_tower.' in Gemma-3's canonical layout)."""
  flat_t = lambda w: w.reshape(w.shape[0], -1).T  # noqa: E731  conv [D, C, P, P] -> [CPP, D]
  ident = hf.identity
  m = {f'{prefix}embeddings.patch_embedding.weight': (root + ('patch_embedding', 'kernel'),
                                                       flat_t),
       f'{prefix}embeddings.patch_embedding.bias': (root + ('patch_embedding', 'bias'), ident),
       f'{prefix}embeddings.position_embedding.weight': (root + ('position_embedding',
                                                                  'embedding'), ident),
       f'{prefix}post_layernorm.weight': (root + ('post_layernorm', 'scale'), ident),
       f'{prefix}post_layernorm.bias': (root + ('post_layernorm', 'bias'), ident)}
  for i in range(cfg.num_hidden_layers):
    h, us = f'{prefix}encoder.layers.{i}.', root + ('layers', i)
    for norm in ('layer_norm1', 'layer_norm2'):
      m[f'{h}{norm}.weight'] = (us + (norm, 'scale'), ident)
      m[f'{h}{norm}.bias'] = (us + (norm, 'bias'), ident)
    for hf_name, ours in (('self_attn.q_proj', 'q_proj'), ('self_attn.k_proj', 'k_proj'),
                          ('self_attn.v_proj', 'v_proj'), ('self_attn.out_proj', 'out_proj'),
                          ('mlp.fc1', 'fc1'), ('mlp.fc2', 'fc2')):
      m[f'{h}{hf_name}.weight'] = (us + (ours, 'kernel'), hf.transpose)
      m[f'{h}{hf_name}.bias'] = (us + (ours, 'bias'), ident)
  return m
