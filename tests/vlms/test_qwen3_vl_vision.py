"""Parity of the Flax Qwen3-VL vision tower with transformers' on tiny random checkpoints."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from csae_jax.vlms import hf
from csae_jax.vlms import qwen3_vl_vision as qv
from tests.vlms.conftest import make_tiny_qwen3_vl, process_images, tiny_images
from tests.vlms.conftest import torch_vision_outputs

TOL = 1e-4
NOT_VISION = ('model.language_model.*', 'lm_head.weight')


def _load(folder, config, **kw) -> qv.Qwen3VLVision:
  cfg = qv.VisionConfig.from_hf(config.vision_config.to_dict())
  abstract = nnx.eval_shape(lambda: qv.Qwen3VLVision(cfg, dtype=kw.pop('compute', jnp.float32)))
  return hf.load(folder, abstract, qv.hf_name_map(cfg, 'model.visual.'), ignore=NOT_VISION, **kw)


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize('overrides,sizes', [
    # default: deepstack after blocks 0 and 2, two images of different odd sizes
    (dict(), ((45, 77), (61, 35))),
    # deepstack off, one odd image, exact GELU MLP, a 5x5 learned grid, head_dim 8
    (dict(deepstack_visual_indexes=(), vision_depth=2, vision_hidden_act='gelu',
          num_position_embeddings=25, vision_num_heads=4), ((33, 47),)),
    # three images, two of the same size but not adjacent (frames grouped out of order)
    (dict(deepstack_visual_indexes=(1,), vision_depth=2), ((40, 24), (17, 50), (40, 24))),
])
def test_parity_every_site(tmp_path, overrides, sizes):
  torch_model, config = make_tiny_qwen3_vl(str(tmp_path), **overrides)
  pixels, grid = process_images(config, tiny_images(sizes))
  assert len(np.unique(grid, axis=0)) >= min(2, len(sizes))  # really different grids
  ref = torch_vision_outputs(torch_model, pixels, grid)
  out = _load(str(tmp_path), config).run(pixels, grid)
  n_ds = len(config.vision_config.deepstack_visual_indexes)
  assert set(out) == set(ref) | {'vision/patch_embed'}
  assert sum(k.startswith('vision/deepstack_') for k in out) == n_ds
  for name, want in ref.items():
    assert out[name].shape == want.shape, name
    assert _max_diff(out[name], want) <= TOL, (name, _max_diff(out[name], want))
  assert out['vision/merger'].shape[0] * 4 == pixels.shape[0]


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('vision'))
  torch_model, config = make_tiny_qwen3_vl(folder)
  pixels, grid = process_images(config, tiny_images())
  return folder, torch_model, config, pixels, grid, _load(folder, config)


def test_images_do_not_attend_to_each_other(tiny):
  """Each image alone gives the rows it gets in a two-image call (cu_seqlens semantics)."""
  _, _, _, pixels, grid, model = tiny
  both = model.run(pixels, grid, sites=('vision/block_2',))['vision/block_2']
  n0 = int(np.prod(grid[0]))
  first = model.run(pixels[:n0], grid[:1], sites=('vision/block_2',))['vision/block_2']
  second = model.run(pixels[n0:], grid[1:], sites=('vision/block_2',))['vision/block_2']
  assert _max_diff(both, np.concatenate([first, second])) <= 1e-5


def test_edit_at_block0_matches_torch_hook(tiny):
  _, torch_model, _, pixels, grid, model = tiny
  # Flip the sign of the first 8 features: not a per-row affine map, which LayerNorm would undo.
  sign = np.where(np.arange(32) < 8, -1.0, 1.0).astype(np.float32)
  ref = torch_vision_outputs(torch_model, pixels, grid,
                             block0_edit=lambda o: o * torch.from_numpy(sign))
  plain = model.run(pixels, grid)
  edited = model.run(pixels, grid, edits={'vision/block_0': lambda x: x * sign})
  for name in ('vision/block_0', 'vision/block_2', 'vision/deepstack_0', 'vision/merger'):
    assert _max_diff(edited[name], ref[name]) <= TOL, name
    assert _max_diff(edited[name], plain[name]) > 0.1, name  # the edit reached this site
  # A site before the edit is untouched.
  assert _max_diff(edited['vision/patch_embed'], plain['vision/patch_embed']) == 0.0


def test_sites_subset_stops_early_and_matches(tiny):
  _, _, _, pixels, grid, model = tiny
  full = model.run(pixels, grid)
  part = model.run(pixels, grid, sites=('vision/block_1',))
  assert set(part) == {'vision/block_1'}
  assert _max_diff(part['vision/block_1'], full['vision/block_1']) <= 1e-6
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s: qv.forward(
      graphdef, s, pixels, grid_thw=qv.static_grid(grid), sites=('vision/block_0',)))(state)
  jaxpr_all = jax.make_jaxpr(lambda s: qv.forward(
      graphdef, s, pixels, grid_thw=qv.static_grid(grid)))(state)
  assert len(str(jaxpr)) < len(str(jaxpr_all)) / 2  # blocks 1-2 and the mergers are not traced


def test_eager_call_equals_jitted(tiny):
  _, _, _, pixels, grid, model = tiny
  eager = model(jnp.asarray(pixels), grid, sites=('vision/block_0',))
  jitted = model.run(pixels, grid, sites=('vision/block_0',))
  assert set(eager) == {'vision/block_0'}
  assert _max_diff(eager['vision/block_0'], jitted['vision/block_0']) <= 1e-5


def test_bfloat16_compute_tracks_float32(tiny):
  folder, _, config, pixels, grid, model = tiny
  ref = model.run(pixels, grid, sites=('vision/merger',))['vision/merger']
  low = _load(folder, config, compute=jnp.bfloat16, dtype=jnp.bfloat16)
  assert low.blocks[0].attn.qkv.kernel[...].dtype == jnp.bfloat16
  out = low.run(pixels, grid, sites=('vision/merger',))['vision/merger']
  assert out.dtype == jnp.bfloat16
  rel = _max_diff(out, ref) / float(np.abs(ref).max())
  assert rel < 0.1, rel


def test_input_errors(tiny):
  _, _, _, pixels, grid, model = tiny
  with pytest.raises(ValueError, match='vision/block_9'):
    model.run(pixels, grid, sites=('vision/block_9',))
  with pytest.raises(ValueError, match='vision/blocks_0'):
    model(pixels, grid, edits={'vision/blocks_0': lambda x: x})
  with pytest.raises(ValueError, match='pixel_values has shape'):
    model(pixels[:-4], grid)
  with pytest.raises(ValueError, match='concrete'):
    jax.jit(qv.static_grid)(jnp.asarray(grid))


def test_config_validation():
  base = transformers.Qwen3VLVisionConfig().to_dict()
  assert qv.VisionConfig.from_hf(base).deepstack_visual_indexes == (8, 16, 24)
  with pytest.raises(ValueError, match='perfect square'):
    qv.VisionConfig.from_hf({**base, 'num_position_embeddings': 2300})
  with pytest.raises(ValueError, match='deepstack_visual_indexes'):
    qv.VisionConfig.from_hf({**base, 'deepstack_visual_indexes': [27]})
  with pytest.raises(ValueError, match='hidden_act'):
    qv.VisionConfig.from_hf({**base, 'hidden_act': 'relu6'})


def test_4b_vision_tower_parameter_count_matches_transformers():
  """eval_shape of the Qwen3-VL-4B vision tower has exactly transformers' parameter count."""
  hub = dict(deepstack_visual_indexes=[5, 11, 17], depth=24, hidden_act='gelu_pytorch_tanh',
             hidden_size=1024, in_channels=3, intermediate_size=4096, num_heads=16,
             num_position_embeddings=2304, out_hidden_size=2560, patch_size=16,
             spatial_merge_size=2, temporal_patch_size=2)
  with torch.device('meta'):
    ref = transformers.Qwen3VLVisionModel(transformers.Qwen3VLVisionConfig(**hub))
  n_ref = sum(p.numel() for p in ref.parameters())
  abstract = nnx.eval_shape(lambda: qv.Qwen3VLVision(qv.VisionConfig.from_hf(hub)))
  n_port = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert n_port == n_ref
  assert 350e6 < n_port < 450e6  # the published 4B split: ~0.4B vision, ~4.0B text
  names = qv.hf_name_map(qv.VisionConfig.from_hf(hub), prefix='')
  assert set(names) == {n for n, _ in ref.named_parameters()}
