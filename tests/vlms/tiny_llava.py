"""Tiny random LLaVA-1.5 checkpoints (CLIP ViT + MLP projector + Llama) built with
transformers + torch and saved as local HF folders, the same recipe as conftest.py's.

Defaults: CLIP hidden 32, 3 layers (feature layer -2 = the output of layer 1; layer 2 never
matters to the text), 32 px images of 8 px patches (16 image tokens, CLS dropped), quick_gelu;
Llama hidden 32, 2 layers, GQA 2, untied head.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import transformers

from tests.vlms.conftest import _reinit  # the shared O(1) re-initialisation

IMAGE_TOKEN_ID = 100
_TEXT = dict(model_type='llama', vocab_size=128, hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             rms_norm_eps=1e-5)
_VISION = dict(model_type='clip_vision_model', hidden_size=32, intermediate_size=64,
               num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8,
               projection_dim=16, hidden_act='quick_gelu')


def tiny_config(*, text: Optional[dict] = None, vision: Optional[dict] = None,
                **top: Any) -> transformers.LlavaConfig:
  kw = dict(image_token_index=IMAGE_TOKEN_ID, vision_feature_layer=-2,
            vision_feature_select_strategy='default', projector_hidden_act='gelu',
            tie_word_embeddings=False)
  kw.update(top)
  return transformers.LlavaConfig(text_config={**_TEXT, **(text or {})},
                                  vision_config={**_VISION, **(vision or {})}, **kw)


def make_tiny_llava(folder: Optional[str] = None, *, seed: int = 0,
                    max_shard_size: Optional[int | str] = None, **kw: Any):
  """A seeded float32 LlavaForConditionalGeneration (eval, eager) and its config; with
  `folder`, saved there with a CLIP image processor for the tiny tower."""
  config = tiny_config(**kw)
  config._attn_implementation = 'eager'  # pylint: disable=protected-access
  torch.manual_seed(seed)
  model = transformers.LlavaForConditionalGeneration(config).eval().to(torch.float32)
  _reinit(model, seed)
  if folder is not None:
    extra = {} if max_shard_size is None else {'max_shard_size': max_shard_size}
    model.save_pretrained(folder, **extra)
    image_processor(config).save_pretrained(folder)
  return model, config


def image_processor(config):
  """transformers' torch-free CLIP image processor: shortest edge, bicubic, centre crop."""
  s = config.vision_config.image_size
  return transformers.CLIPImageProcessorPil(size={'shortest_edge': s},
                                            crop_size={'height': s, 'width': s})


def prompt(n_images: int, n_tokens: int, seed: int = 0, text_len=(3, 2, 4)) -> np.ndarray:
  rng = np.random.default_rng(seed)
  ids = list(rng.integers(3, 99, text_len[0]))
  for i in range(n_images):
    ids += [IMAGE_TOKEN_ID] * n_tokens + list(rng.integers(3, 99, text_len[1 + (i > 0)]))
  return np.asarray(ids, np.int64)[None]


def hf_inputs(ids: np.ndarray, pixels: Optional[np.ndarray]) -> dict:
  kw = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long))
  if pixels is not None:
    kw['pixel_values'] = torch.from_numpy(pixels)
  return kw
