"""Tiny random Gemma-3 checkpoints built with transformers + torch, saved as local HF folders.

Same recipe as conftest.py's Qwen3-VL builder (O(1) re-initialised weights so that every path
matters under a 1e-4 tolerance, `save_pretrained` to safetensors, optionally sharded). Defaults
exercise what distinguishes Gemma-3: sliding window 5 < prompt length, query_pre_attn_scalar 12
!= head_dim 16, head_dim 16 != hidden 32 / 4 heads, GQA 2, two RoPE bases, a global layer
between sliding ones, 4x4 patch grid pooled to 2x2 = 4 soft tokens per image.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import transformers

from tests.vlms.conftest import _reinit  # the shared O(1) re-initialisation

IMAGE_TOKEN_ID, BOI_ID, EOI_ID = 100, 101, 102

_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=12,
             sliding_window=5, layer_types=['sliding_attention', 'full_attention',
                                            'sliding_attention'],
             rope_parameters={'sliding_attention': {'rope_type': 'default', 'rope_theta': 1e4},
                              'full_attention': {'rope_type': 'linear', 'factor': 2.0,
                                                 'rope_theta': 1e6}})
_VISION = dict(model_type='siglip_vision_model', hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
               vision_use_head=False)


def tiny_config(*, tie_word_embeddings: bool = True, mm_tokens_per_image: int = 4,
                text: Optional[dict] = None, vision: Optional[dict] = None
                ) -> transformers.Gemma3Config:
  t = {**_TEXT, **(text or {})}
  if 'num_hidden_layers' in (text or {}) and 'layer_types' not in (text or {}):
    n = t['num_hidden_layers']
    t['layer_types'] = ['full_attention' if i % 3 == 1 else 'sliding_attention'
                        for i in range(n)]
  t['tie_word_embeddings'] = tie_word_embeddings
  return transformers.Gemma3Config(
      text_config=t, vision_config={**_VISION, **(vision or {})},
      mm_tokens_per_image=mm_tokens_per_image, image_token_index=IMAGE_TOKEN_ID,
      boi_token_index=BOI_ID, eoi_token_index=EOI_ID, tie_word_embeddings=tie_word_embeddings)


def make_tiny_gemma3(folder: Optional[str] = None, *, seed: int = 0,
                     max_shard_size: Optional[int | str] = None, **kw: Any
                     ) -> tuple[transformers.Gemma3ForConditionalGeneration,
                                transformers.Gemma3Config]:
  """A seeded float32 Gemma3ForConditionalGeneration (eval, eager attention) and its config;
  with `folder`, saved there (sharded when max_shard_size is small) with its image processor."""
  config = tiny_config(**kw)
  config._attn_implementation = 'eager'  # pylint: disable=protected-access
  torch.manual_seed(seed)
  model = transformers.Gemma3ForConditionalGeneration(config).eval().to(torch.float32)
  _reinit(model, seed)
  with torch.no_grad():
    # N(0, 1) embeddings times sqrt(hidden) at the input are fine, but as the tied head they
    # give logits ~60 whose float32 rounding alone is ~1e-4; at 0.25 the logits are ~15 and a
    # strict 1e-4 absolute tolerance stays meaningful.
    model.model.language_model.embed_tokens.weight.mul_(0.25)
  if folder is not None:
    extra = {} if max_shard_size is None else {'max_shard_size': max_shard_size}
    model.save_pretrained(folder, **extra)
    image_processor(config).save_pretrained(folder)
  return model, config


def image_processor(config: transformers.Gemma3Config):
  """transformers' torch-free Gemma-3 image processor for the tiny tower (no pan-and-scan)."""
  s = config.vision_config.image_size
  return transformers.Gemma3ImageProcessorPil(size={'height': s, 'width': s},
                                              do_pan_and_scan=False)


def prompt(n_images: int, mm_tokens: int, seed: int = 0, text_len=(3, 2, 4)) -> np.ndarray:
  """[1, S] ids laid out as the processor expands `<start_of_image>`: text, then per image
  BOI, mm_tokens soft tokens, EOI, then text; text ids drawn below the special ids."""
  rng = np.random.default_rng(seed)
  ids = list(rng.integers(3, 99, text_len[0]))
  for i in range(n_images):
    ids += [BOI_ID] + [IMAGE_TOKEN_ID] * mm_tokens + [EOI_ID]
    ids += list(rng.integers(3, 99, text_len[1 + (i > 0)]))
  return np.asarray(ids, np.int64)[None]


def hf_inputs(ids: np.ndarray, pixels: Optional[np.ndarray]) -> dict:
  kw = dict(input_ids=torch.from_numpy(ids),
            token_type_ids=torch.from_numpy((ids == IMAGE_TOKEN_ID).astype(np.int64)),
            attention_mask=torch.ones(ids.shape, dtype=torch.long))
  if pixels is not None:
    kw['pixel_values'] = torch.from_numpy(pixels)
  return kw
