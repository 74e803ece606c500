"""SigLIP and CLIP on their own, as image encoders (HMS reference embeddings, `evals.embeddings`),
torch-free, matching transformers' `get_image_features`.

The towers are the VLM ports' own (`siglip.SiglipVision`, `clip.ClipVision`); what a standalone
checkpoint adds is how it pools an image into one vector, the site `vision/embedding`
[B, 1, E]:
- SigLIP (SiglipModel, SiglipVisionModel): the attention-pooling head (`PoolingHead`): a learned
  probe attends over the post-layernormed patch tokens (torch's nn.MultiheadAttention, its
  in_proj split into q / k / v), then x + MLP(LayerNorm(x)). SigLIP has no projection: this is
  `get_image_features`.
- CLIP (CLIPModel, CLIPVisionModelWithProjection): `visual_projection` (no bias) of the
  post-layernormed CLS token.

The encoders take the VLM ports' harvesting interface (`vision_forward(pixels, grid, sites=)`,
`site_names`), so `sources.harvest` and `evals.embeddings` run them unchanged; they have no
text sites. Checkpoints: `vision_model.*` (SiglipModel, CLIPModel and hub snapshots; their text
towers are skipped) and the bare tower tree transformers 5 saves for SiglipVisionModel.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Collection, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from csae_jax.vlms import clip, hf, layers, siglip
from csae_jax.vlms import edits as edits_lib

Edits = Mapping[str, Callable[[jax.Array], jax.Array]]
EMBEDDING = 'vision/embedding'
# Stored prefixes -> the canonical `vision_model.` tree (a transformers 5 SiglipVisionModel save
# keeps the tower at the root).
LAYOUTS = tuple((p, 'vision_model.' + p) for p in (
    'embeddings.', 'encoder.', 'pre_layrnorm.', 'post_layernorm.', 'head.'))
# Parts of a dual-encoder checkpoint an image encoder does not read.
IGNORE = ('text_model.*', 'text_projection.*', 'logit_scale', 'logit_bias')


class PoolingHead(nnx.Module):
  """SigLIP's `SiglipMultiheadAttentionPoolingHead`: one learned query over the tokens.

  `in_proj` keeps torch's packed [D, 3D] q|k|v projection as stored (one tensor, one Param);
  applying all of it to the single probe and to the tokens costs a third more of the head's
  small matmuls and saves a name map that splits tensors."""

  def __init__(self, cfg: siglip.SiglipConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d = cfg.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.n_heads = cfg.num_attention_heads
    self.probe = nnx.Param(jnp.zeros((1, 1, d), param_dtype))
    self.in_proj = nnx.Linear(d, 3 * d, **kw)
    self.out_proj = nnx.Linear(d, d, **kw)
    self.layernorm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, **kw)
    self.fc1 = nnx.Linear(d, cfg.intermediate_size, **kw)
    self.fc2 = nnx.Linear(cfg.intermediate_size, d, **kw)
    self.act = layers.activation(cfg.hidden_act, 'vision_config.hidden_act')

  def __call__(self, x_bnd: jax.Array) -> jax.Array:
    """[B, N, D] -> [B, 1, D]."""
    b, n, d = x_bnd.shape
    heads = lambda t: t.reshape(b, -1, self.n_heads, d // self.n_heads)  # noqa: E731
    probe = jnp.broadcast_to(self.probe[...].astype(x_bnd.dtype), (b, 1, d))
    q = self.in_proj(probe)[..., :d]
    kv = self.in_proj(x_bnd)
    a = layers.attend(heads(q), heads(kv[..., d:2 * d]), heads(kv[..., 2 * d:]), None)
    h = self.out_proj(a.reshape(b, 1, d))
    return h + self.fc2(self.act(self.fc1(self.layernorm(h))))


def _head_name_map(prefix: str) -> dict[str, tuple[tuple, Callable]]:
  m = {f'{prefix}probe': (('head', 'probe'), hf.identity),
       f'{prefix}attention.in_proj_weight': (('head', 'in_proj', 'kernel'), hf.transpose),
       f'{prefix}attention.in_proj_bias': (('head', 'in_proj', 'bias'), hf.identity)}
  for hf_name, ours in (('attention.out_proj', 'out_proj'), ('mlp.fc1', 'fc1'),
                        ('mlp.fc2', 'fc2')):
    m[f'{prefix}{hf_name}.weight'] = (('head', ours, 'kernel'), hf.transpose)
    m[f'{prefix}{hf_name}.bias'] = (('head', ours, 'bias'), hf.identity)
  m[f'{prefix}layernorm.weight'] = (('head', 'layernorm', 'scale'), hf.identity)
  m[f'{prefix}layernorm.bias'] = (('head', 'layernorm', 'bias'), hf.identity)
  return m


def _tower_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
  """The tower's fields: nested in a dual encoder's config.json, at the top of a *VisionModel*'s."""
  return config.get('vision_config') or config


def _tower_sites(sites: Optional[Collection[str]], want: bool) -> Optional[set[str]]:
  """The tower's sites for a request: the embedding pools post_layernorm's output."""
  if sites is None or not want:
    return None if sites is None else set(sites)
  return (set(sites) - {EMBEDDING}) | {'vision/post_layernorm'}


class _Encoder(nnx.Module):
  """What both encoders share: site checks, the jitted forward, loading."""
  kind = ''

  def site_names(self) -> list[str]:
    return self.vision_model.site_names() + [EMBEDDING]

  def _check_names(self, edits, sites):
    valid = set(self.site_names())
    bad = sorted(set(edits or ()) - valid) + sorted(set(sites or ()) - valid)
    if bad:
      raise ValueError(f'unknown site(s) {bad} of this {self.kind} image encoder; valid: '
                       f'{self.site_names()[0]}, vision/block_0..'
                       f'{self.cfg.num_hidden_layers - 1}, vision/post_layernorm, {EMBEDDING} '
                       f'(it has no text sites)')

  def vision_forward(self, pixel_values, grid_thw=None, *, edits: Optional[Edits] = None,
                     sites: Optional[Collection[str]] = None) -> dict[str, jax.Array]:
    """Named sites of pixel_values [B, 3, S, S] (grid_thw: the common port interface, unused:
    the tower takes one size)."""
    del grid_thw
    self._check_names(edits, sites)
    self.vision_model.check_pixels(np.asarray(pixel_values))
    e, leaves, s = edits_lib.jit_args(edits, sites)
    graphdef, state = nnx.split(self)
    return _vision(graphdef, state, pixel_values, leaves, edits=e, sites=s)

  def forward(self, input_ids, pixel_values=None, grid_thw=None, **kw):
    raise ValueError(f'a {self.kind} image encoder has no language model: harvest its vision '
                     f'sites ({EMBEDDING}, vision/block_i), or use a VLM port for text sites')

  @classmethod
  def from_pretrained(cls, folder: str, *, dtype=jnp.float32, mesh=None):
    """Loads a local SigLIP / CLIP snapshot (dual encoder or vision-only; see the module doc)."""
    config = hf.read_config(folder)
    stored = hf.canonical_names(hf.tensor_files(folder), LAYOUTS)
    abstract = nnx.eval_shape(lambda: cls(config, stored=stored, dtype=dtype))
    return hf.load(folder, abstract, abstract.name_map(), dtype=dtype, mesh=mesh, rename=LAYOUTS,
                   ignore=IGNORE)


class SiglipEncoder(_Encoder):
  """`vision_model`: the SigLIP tower; `head`: its attention pooling (when the checkpoint has
  one: vision_use_head, SigLIP's default)."""
  kind = 'SigLIP'

  def __init__(self, config: Mapping[str, Any], *, stored: Collection[str] = (),
               dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None):
    cfg = siglip.SiglipConfig.from_hf(_tower_config(config))
    rngs = rngs or nnx.Rngs(0)
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.cfg = cfg
    self.vision_model = siglip.SiglipVision(cfg, **kw)
    use_head = _tower_config(config).get('vision_use_head', True)
    self.head = PoolingHead(cfg, **kw) if use_head else None

  def name_map(self):
    m = siglip.hf_name_map(self.cfg, 'vision_model.', root=('vision_model',))
    if self.head is not None:
      m.update(_head_name_map('vision_model.head.'))
    return m

  def __call__(self, pixels_bchw, *, edits=None, sites=None):
    want = sites is None or EMBEDDING in sites
    if want and self.head is None:
      raise ValueError(f'{EMBEDDING}: this SigLIP checkpoint has no pooling head '
                       '(vision_use_head=False); harvest vision/post_layernorm and pool it')
    inner = _tower_sites(sites, want)
    out = self.vision_model(pixels_bchw, edits=edits, sites=inner)
    if want:
      out[EMBEDDING] = layers.Sites(edits, None)(EMBEDDING,
                                                 self.head(out['vision/post_layernorm']))
    return out


class ClipEncoder(_Encoder):
  """`vision_model`: the CLIP tower; `visual_projection`: [D, projection_dim], no bias."""
  kind = 'CLIP'

  def __init__(self, config: Mapping[str, Any], *, stored: Collection[str] = (),
               dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None):
    cfg = clip.ClipConfig.from_hf(_tower_config(config))
    rngs = rngs or nnx.Rngs(0)
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.cfg = cfg
    self.vision_model = clip.ClipVision(cfg, **kw)
    # CLIPVisionModel checkpoints have no projection (then there is no embedding site)
    has_proj = not stored or 'visual_projection.weight' in stored
    e = int(config.get('projection_dim', 512))
    self.visual_projection = (nnx.Linear(cfg.hidden_size, e, use_bias=False, **kw)
                              if has_proj else None)

  def name_map(self):
    m = clip.hf_name_map(self.cfg, 'vision_model.', root=('vision_model',))
    if self.visual_projection is not None:
      m['visual_projection.weight'] = (('visual_projection', 'kernel'), hf.transpose)
    return m

  def __call__(self, pixels_bchw, *, edits=None, sites=None):
    want = sites is None or EMBEDDING in sites
    if want and self.visual_projection is None:
      raise ValueError(f'{EMBEDDING}: this CLIP checkpoint has no visual_projection (a '
                       'CLIPVisionModel); use a CLIPModel or CLIPVisionModelWithProjection')
    inner = _tower_sites(sites, want)
    out = self.vision_model(pixels_bchw, edits=edits, sites=inner)
    if want:  # HF layer-norms the CLS token only; post_layernorm here is per token, so take CLS
      out[EMBEDDING] = layers.Sites(edits, None)(
          EMBEDDING, self.visual_projection(out['vision/post_layernorm'][:, :1]))
    return out


@functools.partial(jax.jit, static_argnames=('graphdef', 'edits', 'sites'))
def _vision(graphdef, state, pixels, edit_leaves, *, edits, sites):
  model = nnx.merge(graphdef, state)
  out = model(pixels, edits=edits_lib.merge(edits, edit_leaves), sites=sites)
  return out if sites is None else {k: out[k] for k in sites}
