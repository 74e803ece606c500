"""Steered greedy captions: batches of images through a port's `generate(..., edits=)`.

Generic over ports: the model needs `generate(input_ids, pixel_values, grid_thw, max_new_tokens,
edits=, eos_token_id=, pad_token_id=)` (site edits applied inside, no hooks) and the
preprocessor `resize(PIL) -> uint8 [S, S, 3]`, `patchify(uint8 [B, S, S, 3]) -> (pixels, grid)`,
`prompt_ids(grid[:1], prompt)` and `tokenizer` (`csae_jax.vlms.preprocess.Qwen3VLPreprocessor`).
Every batch has `batch_size` same-size images (a short last batch repeats its final image, whose
captions are dropped) and the same prompt, so one mode at one site compiles once: the
interventions are pytree edits whose arrays are traced.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping, Optional

import numpy as np

PROMPT = 'Describe what is in this image in one short sentence.'  # the paper's steering prompt


def end_token_ids(model_path: str, tokenizer) -> tuple[int, ...]:
  """The checkpoint's end-of-turn ids: generation_config.json's eos_token_id when present (the
  instruct checkpoints list two), else the tokenizer's eos."""
  ids = []
  path = os.path.join(model_path, 'generation_config.json')
  if os.path.exists(path):
    with open(path) as f:
      eos = json.load(f).get('eos_token_id')
    ids = [eos] if isinstance(eos, int) else list(eos or [])
  if not ids and tokenizer.eos_token_id is not None:
    ids = [tokenizer.eos_token_id]
  if not ids:
    raise ValueError(f'{model_path!r}: no eos_token_id in generation_config.json or the '
                     'tokenizer; greedy captions need an end token')
  return tuple(int(i) for i in ids)


def cut_at_end(tokens_n: np.ndarray, eos: tuple[int, ...]) -> list[int]:
  """Generated ids up to and including the first end token (the rest is padding)."""
  out = []
  for t in np.asarray(tokens_n).tolist():
    out.append(int(t))
    if t in eos:
      break
  return out


class Captioner:
  """Greedy captions of preprocessed (resized uint8) images with optional site edits."""

  def __init__(self, model, pre, *, model_path: str, prompt: str = PROMPT,
               max_new_tokens: int = 30, batch_size: int = 8):
    self.model, self.pre = model, pre
    self.prompt, self.max_new_tokens, self.batch_size = prompt, max_new_tokens, batch_size
    self.eos = end_token_ids(model_path, pre.tokenizer)
    self._ids = None

  def prompt_ids(self, grid_i3: np.ndarray) -> np.ndarray:
    if self._ids is None:  # one image size and prompt for every caption: tokenise once
      self._ids = self.pre.prompt_ids(grid_i3[:1], self.prompt)
    return self._ids

  def n_tokens(self, site: str) -> int:
    """Tokens of one item at `site` (what positions index): an image's patch rows at vision
    blocks, its merged tokens at the merger / deepstack, the prompt at text sites."""
    h, w = self.pre.grid_hw
    if site.startswith('vision/block_') or site == 'vision/patch_embed':
      return h * w
    if site.startswith('vision/'):
      return h * w // self.pre.merge ** 2
    return len(self.prompt_ids(np.array([[1, h, w]])))

  def image_positions(self) -> np.ndarray:
    """Indices of the image tokens in the prompt (text sites' `positions='image'`)."""
    h, w = self.pre.grid_hw
    ids = self.prompt_ids(np.array([[1, h, w]]))
    return np.flatnonzero(ids == self.model.cfg.image_token_id)

  def __call__(self, images_bss3: np.ndarray,
               edits: Optional[Mapping[str, Callable]] = None) -> list[list[int]]:
    """One caption's token ids per image (prompt excluded, up to the first end token)."""
    out = []
    for lo in range(0, len(images_bss3), self.batch_size):
      batch = images_bss3[lo:lo + self.batch_size]
      n = len(batch)
      if n < self.batch_size:
        batch = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - n, 0)])
      pixels, grid = self.pre.patchify(batch)
      ids = np.tile(self.prompt_ids(grid), (len(batch), 1))
      tokens = self.model.generate(ids, pixels, grid, self.max_new_tokens, edits=edits,
                                   eos_token_id=list(self.eos), pad_token_id=self.eos[0])
      out += [cut_at_end(t, self.eos) for t in np.asarray(tokens)[:n]]
    return out

  def text(self, tokens: list[int]) -> str:
    return self.pre.tokenizer.decode(tokens, skip_special_tokens=True).strip()
