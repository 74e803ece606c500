"""The Qwen3-VL vision tower in Flax NNX, torch-free, numerically matching transformers'.

Follows `Qwen3VLVisionModel` (transformers 5.x) step by step:
- patch embedding: HF's Conv3d with kernel = stride = (T, P, P) over rows the image processor
  already flattened as (C, T, P, P) is exactly a matmul, so it is an `nnx.Linear` [C*T*P*P, D];
- a learned square position table (`num_position_embeddings` = side^2) resampled to each image's
  (h, w) patch grid by bilinear interpolation with align_corners=True, patches in the processor's
  2x2-merge-block order (HF's `get_vision_interpolation_indices_and_weights`);
- 2-D rotary embeddings: head_dim/4 frequencies for the row and as many for the column, laid out
  [h, w, h, w] over the head dim and applied with rotate-half, in float32;
- pre-norm blocks (LayerNorm eps 1e-6, fused qkv attention, 2-layer MLP with the configured
  activation); attention stays inside each image frame (HF's cu_seqlens): frames of equal size
  are batched together, so a batch of same-size images is one batched attention, never an
  [N, N] mask over all patches;
- the patch merger (LayerNorm, concat of each 2x2 block, fc1, exact GELU, fc2) and one
  deepstack merger (norm *after* the concat) per `deepstack_visual_indexes` entry.

Grid shapes decide array shapes, so `grid_thw` is static: a tuple of (t, h, w) tuples (numpy
arrays and lists are converted; a traced array is refused). The jitted entry point `forward`
takes (graphdef, state) with jax.jit instead of `nnx.jit`: the forward never mutates the module,
so nnx.jit's per-call graph traversal and state write-back buy nothing, while a split-once
(graphdef, state) pair is a plain pytree whose shardings come straight from the loader.

Sites (named intermediates; the value returned is the one later layers see, after any edit):
`vision/patch_embed` (patch embedding + position embedding = block 0's input, [N, D]),
`vision/block_{i}` (output of block i, [N, D], the processor's patch order), `vision/deepstack_{j}`
([N/4, out_hidden], from block deepstack_visual_indexes[j]) and `vision/merger` ([N/4, out_hidden],
the tokens entering the language model).
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

from csae_jax.vlms import hf, layers

Grid = tuple[tuple[int, int, int], ...]
Edits = Mapping[str, Callable[[jax.Array], jax.Array]]

_ACTS = layers.ACTS  # shared with the other ports


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The fields of HF's `Qwen3VLVisionConfig` the port uses."""
  depth: int = 27
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 16
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  out_hidden_size: int = 3584
  num_position_embeddings: int = 2304
  deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
  hidden_act: str = 'gelu_pytorch_tanh'
  rope_theta: float = 10000.0

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def grid_side(self) -> int:
    return math.isqrt(self.num_position_embeddings)

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> 'VisionConfig':
    """From the `vision_config` dict of a Qwen3-VL config.json (hub or transformers 5 style)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    rope = d.get('rope_parameters') or {}
    if 'rope_theta' in rope:
      kw['rope_theta'] = float(rope['rope_theta'])
    for key in ('patch_size', 'temporal_patch_size'):
      if isinstance(kw.get(key), (list, tuple)):
        if len(set(kw[key])) != 1:
          raise ValueError(f'vision_config.{key}={kw[key]}: only square patches are supported')
        kw[key] = kw[key][0]
    kw['deepstack_visual_indexes'] = tuple(int(i) for i in kw.get(
        'deepstack_visual_indexes', cls.deepstack_visual_indexes))
    cfg = cls(**kw)
    if cfg.hidden_size % cfg.num_heads or cfg.head_dim % 4:
      raise ValueError(f'vision_config: hidden_size {cfg.hidden_size} / num_heads {cfg.num_heads} '
                       'must give a head_dim divisible by 4 (2-D rotary)')
    if cfg.grid_side ** 2 != cfg.num_position_embeddings:
      raise ValueError(f'vision_config.num_position_embeddings={cfg.num_position_embeddings} '
                       'must be a perfect square (a side x side learned grid)')
    if any(not 0 <= i < cfg.depth for i in cfg.deepstack_visual_indexes):
      raise ValueError(f'vision_config.deepstack_visual_indexes={cfg.deepstack_visual_indexes} '
                       f'must lie in [0, depth={cfg.depth})')
    if cfg.hidden_act not in _ACTS:
      raise ValueError(f'vision_config.hidden_act={cfg.hidden_act!r} unsupported; one of '
                       f'{sorted(_ACTS)}')
    return cfg


# -- host-side (numpy) geometry, computed once per static grid --------------------------------


def static_grid(grid_thw: Any) -> Grid:
  """grid_thw [n, 3] (numpy, list, tuple) as a hashable tuple of (t, h, w) for jit."""
  if isinstance(grid_thw, jax.core.Tracer):
    raise ValueError('grid_thw must be concrete (it sets array shapes); pass a tuple of (t, h, w) '
                     'as a static argument, not a traced array')
  arr = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
  return tuple((int(t), int(h), int(w)) for t, h, w in arr)


def _patch_rows_cols(grid: Grid, merge: int) -> tuple[np.ndarray, np.ndarray]:
  """(row, col) of every patch in the processor's order: frames, merge blocks, in-block."""
  rows, cols = [], []
  for t, h, w in grid:
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
    shape = (h // merge, merge, w // merge, merge)
    rows.append(np.tile(r.reshape(shape).transpose(0, 2, 1, 3).reshape(-1), t))
    cols.append(np.tile(c.reshape(shape).transpose(0, 2, 1, 3).reshape(-1), t))
  return np.concatenate(rows), np.concatenate(cols)


def _pos_interp(grid: Grid, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
  """Bilinear (align_corners) taps [N, 4] into the learned table and their weights [N, 4]."""
  side = cfg.grid_side
  rows, cols = _patch_rows_cols(grid, cfg.spatial_merge_size)
  heights = np.concatenate([np.full(t * h * w, h) for t, h, w in grid])
  widths = np.concatenate([np.full(t * h * w, w) for t, h, w in grid])

  def axis(index, size):  # float32 like HF, so the weights agree to the last bit
    src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(
        np.float32)
    floor = np.floor(src)
    taps = floor.astype(np.int64)[:, None] + np.arange(2)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - np.arange(2)), 0, None)
    return np.clip(taps, 0, side - 1), weights.astype(np.float32)

  ht, hw = axis(rows, heights)
  wt, ww = axis(cols, widths)
  return ((ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4),
          (hw[:, :, None] * ww[:, None, :]).reshape(-1, 4))


def _rope_angles(grid: Grid, cfg: VisionConfig) -> np.ndarray:
  """Rotary angles [N, head_dim/2] = [row * inv_freq, col * inv_freq], float32."""
  spatial = cfg.head_dim // 2
  inv_freq = 1.0 / (np.float32(cfg.rope_theta) ** (
      np.arange(0, spatial, 2, dtype=np.float32) / np.float32(spatial)))
  rows, cols = _patch_rows_cols(grid, cfg.spatial_merge_size)
  return np.concatenate([rows.astype(np.float32)[:, None] * inv_freq,
                         cols.astype(np.float32)[:, None] * inv_freq], axis=-1)


def _frame_groups(grid: Grid) -> list[tuple[int, np.ndarray]]:
  """Frames grouped by length: [(length L, starts [k])]; attention never crosses a frame."""
  groups: dict[int, list[int]] = {}
  start = 0
  for t, h, w in grid:
    for _ in range(t):
      groups.setdefault(h * w, []).append(start)
      start += h * w
  return [(length, np.asarray(starts)) for length, starts in groups.items()]


# -- modules ----------------------------------------------------------------------------------


def _rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


class VisionAttention(nnx.Module):
  """Fused-qkv bidirectional attention within frames, 2-D rotary on q and k."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.num_heads = cfg.num_heads
    self.qkv = nnx.Linear(d, 3 * d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.proj = nnx.Linear(d, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_nd: jax.Array, cos_nk: jax.Array, sin_nk: jax.Array,
               groups: Sequence[tuple[int, np.ndarray]]) -> jax.Array:
    n, d = x_nd.shape
    qkv = self.qkv(x_nd).reshape(n, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    # Rotary in float32, cast back (HF's apply_rotary_pos_emb_vision).
    rot = lambda t: (t.astype(jnp.float32) * cos_nk[:, None] +  # noqa: E731
                     _rotate_half(t.astype(jnp.float32)) * sin_nk[:, None]).astype(t.dtype)
    q, k = rot(q), rot(k)
    out = None
    for length, starts in groups:
      idx = (starts[:, None] + np.arange(length)).reshape(-1)
      whole = len(groups) == 1 and starts[0] == 0 and np.all(np.diff(starts) == length)
      take = (lambda t: t) if whole else (lambda t: t[idx])  # noqa: E731
      shape = (len(starts), length, self.num_heads, d // self.num_heads)
      qb, kb, vb = (take(t).reshape(shape) for t in (q, k, v))
      logits = jnp.einsum('bqhd,bkhd->bhqk', qb, kb) * (d // self.num_heads) ** -0.5
      probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(vb.dtype)
      ob = jnp.einsum('bhqk,bkhd->bqhd', probs, vb).reshape(-1, d)
      out = ob if whole else (jnp.zeros((n, d), ob.dtype) if out is None else out).at[idx].set(ob)
    return self.proj(out)


class VisionMLP(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = _ACTS[cfg.hidden_act]
    self.linear_fc1 = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
    self.linear_fc2 = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = nnx.LayerNorm(cfg.hidden_size, epsilon=1e-6, **kw)
    self.norm2 = nnx.LayerNorm(cfg.hidden_size, epsilon=1e-6, **kw)
    self.attn = VisionAttention(cfg, **kw)
    self.mlp = VisionMLP(cfg, **kw)

  def __call__(self, x_nd, cos_nk, sin_nk, groups):
    x_nd = x_nd + self.attn(self.norm1(x_nd), cos_nk, sin_nk, groups)
    return x_nd + self.mlp(self.norm2(x_nd))


class PatchMerger(nnx.Module):
  """[N, D] -> [N/m^2, out]: each run of m^2 rows is one merge block (the processor's order)."""

  def __init__(self, cfg: VisionConfig, *, postshuffle_norm: bool, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.wide = cfg.hidden_size * cfg.spatial_merge_size ** 2
    self.postshuffle_norm = postshuffle_norm
    self.norm = nnx.LayerNorm(self.wide if postshuffle_norm else cfg.hidden_size, epsilon=1e-6,
                              **kw)
    self.linear_fc1 = nnx.Linear(self.wide, self.wide, **kw)
    self.linear_fc2 = nnx.Linear(self.wide, cfg.out_hidden_size, **kw)

  def __call__(self, x_nd: jax.Array) -> jax.Array:
    if self.postshuffle_norm:
      x = self.norm(x_nd.reshape(-1, self.wide))
    else:
      x = self.norm(x_nd).reshape(-1, self.wide)
    return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


class Qwen3VLVision(nnx.Module):
  """The vision tower; `__call__` returns the named sites (module docstring)."""

  def __init__(self, cfg: VisionConfig | Mapping[str, Any], *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None):
    cfg = cfg if isinstance(cfg, VisionConfig) else VisionConfig.from_hf(cfg)
    rngs = rngs or nnx.Rngs(0)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.cfg = cfg
    self.dtype = dtype
    self.patch_embed = nnx.Linear(cfg.patch_dim, cfg.hidden_size, **kw)
    self.pos_embed = nnx.Embed(cfg.num_position_embeddings, cfg.hidden_size, **kw)
    self.blocks = nnx.List([VisionBlock(cfg, **kw) for _ in range(cfg.depth)])
    self.merger = PatchMerger(cfg, postshuffle_norm=False, **kw)
    self.deepstack_merger_list = nnx.List([
        PatchMerger(cfg, postshuffle_norm=True, **kw) for _ in cfg.deepstack_visual_indexes])

  def site_names(self) -> list[str]:
    n_ds = len(self.cfg.deepstack_visual_indexes)
    return (['vision/patch_embed'] + [f'vision/block_{i}' for i in range(self.cfg.depth)] +
            [f'vision/deepstack_{j}' for j in range(n_ds)] + ['vision/merger'])

  def _last_block(self, sites: Optional[Collection[str]]) -> int:
    """Blocks beyond the last requested site are skipped (harvesting block i is cheaper)."""
    if sites is None or any(s == 'vision/merger' or not s.startswith('vision/') for s in sites):
      return self.cfg.depth  # a non-vision site needs the merged tokens: run everything
    last = -1
    for s in sites:
      if s.startswith('vision/block_'):
        last = max(last, int(s.rsplit('_', 1)[1]))
      elif s.startswith('vision/deepstack_'):
        last = max(last, self.cfg.deepstack_visual_indexes[int(s.rsplit('_', 1)[1])])
    return last + 1

  def __call__(self, pixel_values_pd: jax.Array, grid_thw: Any, *,
               edits: Optional[Edits] = None,
               sites: Optional[Collection[str]] = None) -> dict[str, jax.Array]:
    """pixel_values [N, C*T*P*P] and grid_thw (static) as the image processor returns them.

    edits: site -> pure function (same shape), applied where the site is produced; keys that do
    not start with 'vision/' are ignored (a full model passes its text edits through).
    sites: the vision sites to return (None: all); blocks after the last one are not run
    unless a non-vision site is asked for. A full model passes None (it needs the merger and
    deepstack outputs).
    """
    grid = static_grid(grid_thw)
    cfg, edits = self.cfg, dict(edits or {})
    valid = set(self.site_names())
    for name in [*edits, *(sites or ())]:
      if name.startswith('vision/') and name not in valid:
        raise ValueError(f'unknown vision site {name!r}; valid: vision/patch_embed, '
                         f'vision/block_0..{cfg.depth - 1}, vision/deepstack_0..'
                         f'{len(cfg.deepstack_visual_indexes) - 1}, vision/merger')
    n = sum(t * h * w for t, h, w in grid)
    if pixel_values_pd.shape != (n, cfg.patch_dim):
      raise ValueError(f'pixel_values has shape {pixel_values_pd.shape}; grid_thw {grid} needs '
                       f'({n}, {cfg.patch_dim}) = (sum t*h*w, C*T*P*P). Use the image processor '
                       'configured for this model (patch/merge/temporal sizes)')
    if any(h % cfg.spatial_merge_size or w % cfg.spatial_merge_size for _, h, w in grid):
      raise ValueError(f'grid_thw {grid}: h and w must be multiples of spatial_merge_size '
                       f'{cfg.spatial_merge_size}')
    site = layers.Sites(edits, sites)
    out = site.out

    x = self.patch_embed(pixel_values_pd.astype(self.dtype))
    taps, weights = _pos_interp(grid, cfg)
    table = self.pos_embed.embedding[...]
    x = x + jnp.einsum('nk,nkd->nd', jnp.asarray(weights, table.dtype), table[taps]).astype(x.dtype)
    x = site('vision/patch_embed', x)
    angles = jnp.asarray(_rope_angles(grid, cfg))
    emb = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    groups = _frame_groups(grid)
    last = self._last_block(sites)
    for i in range(last):
      x = site(f'vision/block_{i}', self.blocks[i](x, cos, sin, groups))
      if i in cfg.deepstack_visual_indexes:
        j = cfg.deepstack_visual_indexes.index(i)
        site(f'vision/deepstack_{j}', self.deepstack_merger_list[j](x))
    if last == cfg.depth:
      site('vision/merger', self.merger(x))
    return out

  def run(self, pixel_values_pd, grid_thw, *, edits: Optional[Edits] = None,
          sites: Optional[Collection[str]] = None) -> dict[str, jax.Array]:
    """Jitted `__call__` (splits the module on each call; loops should call `forward`)."""
    graphdef, state = nnx.split(self)
    return forward(graphdef, state, pixel_values_pd, grid_thw=static_grid(grid_thw),
                   edits=static_edits(edits), sites=None if sites is None else tuple(sites))


def static_edits(edits: Optional[Edits]) -> tuple:
  """Edits as a hashable tuple for jit (functions hash by identity: reuse the same objects to
  reuse a compilation)."""
  return tuple(sorted((edits or {}).items(), key=lambda kv: kv[0]))


@functools.partial(jax.jit, static_argnames=('graphdef', 'grid_thw', 'edits', 'sites'))
def forward(graphdef: nnx.GraphDef, state: nnx.State, pixel_values_pd: jax.Array, *,
            grid_thw: Grid, edits: tuple = (), sites: Optional[tuple[str, ...]] = None
            ) -> dict[str, jax.Array]:
  """Jitted forward of a split `Qwen3VLVision`: `graphdef, state = nnx.split(model)` once, then
  call with a static grid (`static_grid`), `static_edits(...)` and a tuple of sites."""
  return nnx.merge(graphdef, state)(pixel_values_pd, grid_thw, edits=dict(edits), sites=sites)


def hf_name_map(cfg: VisionConfig, prefix: str = 'model.visual.', *, root: tuple = ()
                ) -> dict[str, tuple[tuple, Callable[[np.ndarray], np.ndarray]]]:
  """HF tensor name -> (state path under `root`, transform); see `hf`'s contract.

  The Conv3d weight [D, C, T, P, P] flattens to [D, C*T*P*P] in the processor's row order, then
  transposes to the kernel [C*T*P*P, D]; torch Linear [out, in] transposes to [in, out].
  """
  flat_t = lambda w: w.reshape(w.shape[0], -1).T  # noqa: E731
  m = {f'{prefix}patch_embed.proj.weight': (root + ('patch_embed', 'kernel'), flat_t),
       f'{prefix}patch_embed.proj.bias': (root + ('patch_embed', 'bias'), hf.identity),
       f'{prefix}pos_embed.weight': (root + ('pos_embed', 'embedding'), hf.identity)}

  def norm(hf_name, path):
    m[f'{hf_name}.weight'] = (path + ('scale',), hf.identity)
    m[f'{hf_name}.bias'] = (path + ('bias',), hf.identity)

  def linear(hf_name, path):
    m[f'{hf_name}.weight'] = (path + ('kernel',), hf.transpose)
    m[f'{hf_name}.bias'] = (path + ('bias',), hf.identity)

  for i in range(cfg.depth):
    h, us = f'{prefix}blocks.{i}.', root + ('blocks', i)
    norm(h + 'norm1', us + ('norm1',))
    norm(h + 'norm2', us + ('norm2',))
    linear(h + 'attn.qkv', us + ('attn', 'qkv'))
    linear(h + 'attn.proj', us + ('attn', 'proj'))
    linear(h + 'mlp.linear_fc1', us + ('mlp', 'linear_fc1'))
    linear(h + 'mlp.linear_fc2', us + ('mlp', 'linear_fc2'))
  mergers = [(f'{prefix}merger.', root + ('merger',))] + [
      (f'{prefix}deepstack_merger_list.{j}.', root + ('deepstack_merger_list', j))
      for j in range(len(cfg.deepstack_visual_indexes))]
  for h, us in mergers:
    norm(h + 'norm', us + ('norm',))
    linear(h + 'linear_fc1', us + ('linear_fc1',))
    linear(h + 'linear_fc2', us + ('linear_fc2',))
  return m
