"""Tiny random Qwen3-VL checkpoints built with transformers + torch, saved as a local HF folder.

Why: parity tests need a reference that is the real implementation (transformers' modeling code)
and a real snapshot layout (config.json + safetensors, optionally sharded with an index), with no
download. The models are tiny (hidden 32, 2 text layers, 3 vision blocks, 8x8 patches) so that a
build + save takes well under a second.

Why re-initialise the weights: HF's init (std 0.02, unit norms, zero biases) makes most paths
near zero, so a wrong rotary layout or patch order could hide under a 1e-4 tolerance. Weights here
get std 1/sqrt(fan_in), norm weights 1 + 0.2 N(0, 1), biases 0.1 N(0, 1), embeddings N(0, 1):
every activation is O(1) and every parameter matters.

Import from tests: `from tests.vlms.conftest import make_tiny_qwen3_vl, process_images, ...`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import numpy as np
import pytest
import torch
import transformers

# Special token ids inside the tiny vocabulary (the hub ids, 151655..., do not fit in it).
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_START_ID, VISION_END_ID = 100, 101, 102, 103

# Override key -> (sub-config, HF key). Flat names keep call sites short.
_KEYS = {
    # text model
    'vocab_size': ('text', 'vocab_size'), 'hidden_size': ('text', 'hidden_size'),
    'intermediate_size': ('text', 'intermediate_size'),
    'num_hidden_layers': ('text', 'num_hidden_layers'),
    'num_attention_heads': ('text', 'num_attention_heads'),
    'num_key_value_heads': ('text', 'num_key_value_heads'), 'head_dim': ('text', 'head_dim'),
    'attention_bias': ('text', 'attention_bias'), 'rms_norm_eps': ('text', 'rms_norm_eps'),
    # vision tower
    'vision_depth': ('vision', 'depth'), 'vision_hidden_size': ('vision', 'hidden_size'),
    'vision_intermediate_size': ('vision', 'intermediate_size'),
    'vision_num_heads': ('vision', 'num_heads'), 'patch_size': ('vision', 'patch_size'),
    'temporal_patch_size': ('vision', 'temporal_patch_size'),
    'spatial_merge_size': ('vision', 'spatial_merge_size'),
    'num_position_embeddings': ('vision', 'num_position_embeddings'),
    'deepstack_visual_indexes': ('vision', 'deepstack_visual_indexes'),
    'vision_hidden_act': ('vision', 'hidden_act'),
}


def tiny_hf_config(*, tie_word_embeddings: bool = True, mrope_section: Sequence[int] = (2, 1, 1),
                   rope_theta: float = 10000.0, **overrides: Any) -> transformers.Qwen3VLConfig:
  """A tiny Qwen3VLConfig; `overrides` use the flat names of `_KEYS` (e.g. vision_depth=2).

  Defaults: text hidden 32, 2 layers, 4 heads / 2 kv heads (GQA 2), head_dim 8 (mrope_section
  must sum to head_dim / 2), vocab 128; vision hidden 32, depth 3, 2 heads, patch 8, temporal
  patch 2, merge 2, a 4x4 learned position grid (interpolated to every image grid), deepstack
  taps after blocks 0 and 2, out_hidden = text hidden.
  """
  unknown = set(overrides) - set(_KEYS)
  if unknown:
    raise TypeError(f'unknown tiny-config keys {sorted(unknown)}; known: {sorted(_KEYS)}')
  text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
              tie_word_embeddings=tie_word_embeddings)
  vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16,
                deepstack_visual_indexes=[0, 2], hidden_act='gelu_pytorch_tanh')
  for key, value in overrides.items():
    part, hf_key = _KEYS[key]
    (text if part == 'text' else vision)[hf_key] = value
  vision['deepstack_visual_indexes'] = list(vision['deepstack_visual_indexes'])
  vision['out_hidden_size'] = text['hidden_size']
  text['rope_parameters'] = dict(rope_type='default', rope_theta=rope_theta,
                                 mrope_section=list(mrope_section), mrope_interleaved=True)
  return transformers.Qwen3VLConfig(
      text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
      video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
      vision_end_token_id=VISION_END_ID, tie_word_embeddings=tie_word_embeddings)


@torch.no_grad()
def _reinit(model: torch.nn.Module, seed: int) -> None:
  """O(1)-scale random weights (module docstring says why)."""
  gen = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():  # tied tensors appear once
    noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
    if 'embed_tokens' in name or 'pos_embed' in name:
      p.copy_(noise)
    elif p.ndim >= 2:
      p.copy_(noise / np.sqrt(p[0].numel()))
    elif 'norm' in name and name.endswith('.weight'):
      p.copy_(1.0 + 0.2 * noise)
    else:
      p.copy_(0.1 * noise)


def make_tiny_qwen3_vl(folder: Optional[str] = None, *, seed: int = 0,
                       max_shard_size: Optional[int | str] = None, **overrides: Any
                       ) -> tuple[transformers.Qwen3VLForConditionalGeneration,
                                  transformers.Qwen3VLConfig]:
  """A seeded tiny float32 Qwen3VLForConditionalGeneration (eval mode) and its config.

  With `folder`, also `save_pretrained`s it there as safetensors (sharded with an index when
  `max_shard_size` is small, e.g. 20_000 bytes) plus the tiny image processor's config.
  `overrides`: `tie_word_embeddings`, `mrope_section`, `rope_theta` and the flat keys of `_KEYS`.
  """
  config = tiny_hf_config(**overrides)
  torch.manual_seed(seed)
  model = transformers.Qwen3VLForConditionalGeneration(config).eval().to(torch.float32)
  _reinit(model, seed)
  if folder is not None:
    kw = {} if max_shard_size is None else {'max_shard_size': max_shard_size}
    model.save_pretrained(folder, **kw)
    image_processor(config).save_pretrained(folder)
  return model, config


def image_processor(config: transformers.Qwen3VLConfig) -> Any:
  """transformers' torch-free Qwen2-VL image processor set up for the tiny vision tower."""
  v = config.vision_config
  factor = v.patch_size * v.spatial_merge_size
  return transformers.Qwen2VLImageProcessorPil(
      patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
      merge_size=v.spatial_merge_size, image_mean=[0.5] * 3, image_std=[0.5] * 3,
      size={'shortest_edge': factor * factor, 'longest_edge': 64 * factor * factor})


def tiny_images(sizes: Sequence[tuple[int, int]] = ((45, 77), (61, 35)), seed: int = 0
                ) -> list[np.ndarray]:
  """Seeded random uint8 RGB images [H, W, 3] of odd sizes (the processor resizes them)."""
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]


def process_images(config: transformers.Qwen3VLConfig, images: Sequence[np.ndarray]
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(pixel_values [n_patches, C*T*P*P] float32, image_grid_thw [n_images, 3] int64)."""
  out = image_processor(config)(images=list(images), return_tensors='np')
  return (np.asarray(out['pixel_values'], np.float32),
          np.asarray(out['image_grid_thw'], np.int64))


def torch_vision_outputs(model: transformers.Qwen3VLForConditionalGeneration,
                         pixel_values: np.ndarray, grid_thw: np.ndarray,
                         block0_edit=None) -> dict[str, np.ndarray]:
  """The reference's vision sites, named as the port names them (`vision/block_{i}`, ...).

  `block0_edit` (a torch function) replaces block 0's output through a forward hook, the torch
  way of doing what the port's `edits={'vision/block_0': f}` does.
  """
  visual = model.model.visual
  outs, handles = {}, []
  for i, blk in enumerate(visual.blocks):
    def hook(mod, args, out, i=i):
      if i == 0 and block0_edit is not None:
        out = block0_edit(out)
      outs[f'vision/block_{i}'] = out.detach().numpy().copy()
      return out
    handles.append(blk.register_forward_hook(hook, prepend=True))  # before HF's recorders
  try:
    with torch.no_grad():
      res = visual(torch.from_numpy(pixel_values), grid_thw=torch.from_numpy(grid_thw))
  finally:
    for h in handles:
      h.remove()
  outs['vision/merger'] = res.pooler_output.numpy()
  for j, feat in enumerate(res.deepstack_features):
    outs[f'vision/deepstack_{j}'] = feat.numpy()
  return outs


def read_index(folder: str) -> dict[str, str]:
  """weight_map of a sharded save (asserts the index exists)."""
  with open(os.path.join(folder, 'model.safetensors.index.json')) as f:
    return json.load(f)['weight_map']


@pytest.fixture(scope='session')
def tiny_qwen3_vl_folder(tmp_path_factory):
  """The default tiny model saved once per session: (folder, torch_model, config)."""
  folder = str(tmp_path_factory.mktemp('tiny_qwen3_vl'))
  model, config = make_tiny_qwen3_vl(folder)
  return folder, model, config


@pytest.fixture
def tiny_qwen3_vl_factory(tmp_path):
  """Call with overrides: returns (folder, torch_model, config), each in its own tmp folder."""
  count = [0]

  def make(**overrides):
    count[0] += 1
    folder = str(tmp_path / f'tiny_{count[0]}')
    model, config = make_tiny_qwen3_vl(folder, **overrides)
    return folder, model, config

  return make
