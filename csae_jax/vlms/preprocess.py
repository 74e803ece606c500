"""Qwen3-VL inputs without torch: transformers' PIL image processor and the tokenizer.

`Qwen3VLProcessor` needs torch (its video processor), so the two halves are used directly: the
image processor (`Qwen2VLImageProcessorPil`, which Qwen3-VL's checkpoints name) turns images into
flattened patches and a (t, h, w) grid; the tokenizer's chat template gives the prompt, whose one
`<|image_pad|>` per image is expanded to the image's number of merged tokens, as the processor
does.

Patch order (the order of `vision/block_i` rows): 2 x 2 merge windows in raster order, and inside
each window its 4 patches in raster order (`patch_grid_positions`, verified against the processor
in tests). Merged tokens (`vision/merger`, image positions of `text/layer_i`) follow the windows.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

DEFAULT_PROMPT = 'Describe the image content accurately.'
IMAGE_PAD = '<|image_pad|>'


def patch_grid_positions(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
  """(row, col) in the patch grid of each of the h * w patches, in the processor's order."""
  wr, wc, ir, ic = np.meshgrid(np.arange(h // merge), np.arange(w // merge), np.arange(merge),
                               np.arange(merge), indexing='ij')
  return (wr * merge + ir).reshape(-1), (wc * merge + ic).reshape(-1)


def merged_grid_positions(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
  """(row, col) in the merged grid of each merged token (raster order of the windows)."""
  r, c = np.meshgrid(np.arange(h // merge), np.arange(w // merge), indexing='ij')
  return r.reshape(-1), c.reshape(-1)


class Qwen3VLPreprocessor:
  """Images -> (pixel_values [n_patches, C*T*P*P] float32, grid_thw [n_images, 3]); prompts ->
  token ids with the image placeholders expanded.

  image_size: every image is resized to image_size x image_size (the paper: 256), then the
  model's own processor runs with min = max pixels = image_size^2, so its smart resize keeps
  that size (image_size must be a multiple of patch * merge) and does the normalisation.
  """

  def __init__(self, folder: str, image_size: int = 256):
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as ip  # slow import
    if not os.path.exists(os.path.join(folder, 'preprocessor_config.json')):
      raise ValueError(f'{folder!r} has no preprocessor_config.json; point model_path at the '
                       f'checkpoint folder (a hub snapshot has it)')
    self.folder = folder
    self.processor = ip.Qwen2VLImageProcessorPil.from_pretrained(folder)
    self.patch, self.merge = self.processor.patch_size, self.processor.merge_size
    factor = self.patch * self.merge
    if image_size % factor:
      raise ValueError(f'image_size = {image_size} must be a multiple of patch_size x '
                       f'merge_size = {factor} for this model; e.g. {image_size // factor * factor}'
                       f' or {(image_size // factor + 1) * factor}')
    self.image_size = image_size
    self._tokenizer = None

  @property
  def grid_hw(self) -> tuple[int, int]:
    n = self.image_size // self.patch
    return n, n

  def patch_positions(self) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each `vision/block_i` token (the processor's merge-window order)."""
    return patch_grid_positions(*self.grid_hw, self.merge)

  def merged_positions(self) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each merged token (`vision/merger`, image tokens of the text)."""
    return merged_grid_positions(*self.grid_hw, self.merge)

  def images(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    s = self.image_size
    resized = [im.convert('RGB').resize((s, s), Image.Resampling.BICUBIC) for im in images]
    out = self.processor(images=resized, size={'shortest_edge': s * s, 'longest_edge': s * s},
                         return_tensors='np')
    return (np.asarray(out['pixel_values'], np.float32),
            np.asarray(out['image_grid_thw'], np.int64))

  def resize(self, image: Image.Image) -> np.ndarray:
    """[S, S, 3] uint8: the part of preprocessing that needs PIL (worker processes run it)."""
    s = self.image_size
    return np.asarray(image.convert('RGB').resize((s, s), Image.Resampling.BICUBIC))

  def patchify(self, images_bss3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The processor's rescale, normalisation and patch flattening, vectorised over a batch of
    resized uint8 images: equal to `images` (tested) at a fraction of the cost, and what
    crosses a process boundary is 196 kB of uint8 per 256^2 image instead of 1.5 MB of floats."""
    p, m = self.processor, self.merge
    b, s = images_bss3.shape[0], self.image_size
    t, c, ps = p.temporal_patch_size, 3, self.patch
    x = images_bss3.astype(np.float32)
    if p.do_rescale:
      x = x * np.float32(p.rescale_factor)
    if p.do_normalize:
      x = (x - np.asarray(p.image_mean, np.float32)) / np.asarray(p.image_std, np.float32)
    g = s // ps
    x = x.reshape(b, g // m, m, ps, g // m, m, ps, c)
    x = x.transpose(0, 1, 4, 2, 5, 7, 3, 6)  # b, gh, gw, mh, mw, C, ph, pw
    x = np.broadcast_to(x[:, :, :, :, :, :, None], (*x.shape[:6], t, ps, ps))
    pixels = np.ascontiguousarray(x.reshape(b * g * g, c * t * ps * ps))
    return pixels, np.tile(np.array([[1, g, g]], np.int64), (b, 1))

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      import transformers  # pylint: disable=g-import-not-at-top
      try:
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(self.folder)
      except (OSError, ValueError) as e:
        raise ValueError(f'{self.folder!r}: no usable tokenizer ({e}); text sites and '
                         f'generation need the checkpoint\'s tokenizer files') from e
    return self._tokenizer

  def prompt_ids(self, grid_thw_i3: np.ndarray, prompt: str = DEFAULT_PROMPT) -> np.ndarray:
    """Token ids of a user turn with the images then the prompt, ready for the answer."""
    content = [{'type': 'image'} for _ in grid_thw_i3] + [{'type': 'text', 'text': prompt}]
    text = self.tokenizer.apply_chat_template([{'role': 'user', 'content': content}],
                                              add_generation_prompt=True, tokenize=False)
    parts = text.split(IMAGE_PAD)
    if len(parts) != len(grid_thw_i3) + 1:
      raise ValueError(f'the chat template gave {len(parts) - 1} {IMAGE_PAD} placeholders for '
                       f'{len(grid_thw_i3)} images; check the tokenizer\'s chat template')
    merged = [int(np.prod(g)) // self.merge ** 2 for g in grid_thw_i3]
    text = parts[0] + ''.join(IMAGE_PAD * m + p for m, p in zip(merged, parts[1:]))
    return np.asarray(self.tokenizer(text, add_special_tokens=False)['input_ids'], np.int64)


def _load_tokenizer(folder: str):
  import transformers  # pylint: disable=g-import-not-at-top
  try:
    return transformers.AutoTokenizer.from_pretrained(folder)
  except (OSError, ValueError) as e:
    raise ValueError(f'{folder!r}: no usable tokenizer ({e}); text sites and generation need '
                     f'the checkpoint\'s tokenizer files') from e


def _read_json(folder: str, name: str, why: str) -> dict:
  import json  # pylint: disable=g-import-not-at-top
  path = os.path.join(folder, name)
  if not os.path.exists(path):
    raise ValueError(f'{folder!r} has no {name}; point model_path at the checkpoint folder '
                     f'({why})')
  with open(path) as f:
    return json.load(f)


class SiglipImages:
  """SigLIP's image processor without torch: images -> (pixel_values [B, 3, S, S] float32,
  grid [B, 3] = (1, S/p, S/p) per image), for a SigLIP tower alone (SiglipModel /
  SiglipVisionModel, `vlms.image_encoders`) and, through Gemma3Preprocessor, Gemma-3's.

  Images go to the checkpoint's own size S (image_size of its vision config) by PIL resampling
  (preprocessor_config.json's `resample`: SigLIP bicubic, Gemma-3 bilinear), then rescale and
  normalise with preprocessor_config.json's values. The tower takes no other size, so
  `image_size` must be 0 or S.

  Token order (rows of `vision/block_i`): the patch grid row-major; `vision/embedding` (one
  token per image) has no grid position (row/col -1).
  """
  default_size, tower, default_resample = 224, 'this SigLIP tower', Image.Resampling.BICUBIC

  def __init__(self, folder: str, image_size: int = 0):
    self.config, pp, _ = _fixed_size_tower(self, folder, image_size, self.default_size,
                                           self.tower, 'its image mean/std and size')
    self.rescale = float(pp.get('rescale_factor', 1 / 255)) if pp.get('do_rescale', True) else None
    self.mean = np.asarray(pp.get('image_mean', [0.5] * 3), np.float32)
    self.std = np.asarray(pp.get('image_std', [0.5] * 3), np.float32)
    self.normalize = bool(pp.get('do_normalize', True))
    if pp.get('do_pan_and_scan'):
      raise ValueError(f'{folder!r}/preprocessor_config.json sets do_pan_and_scan; this port '
                       'feeds one crop per image (set it to false)')
    # SigLIP's processor resizes bicubic, Gemma-3's bilinear: the checkpoint says which
    self.resample = Image.Resampling(int(pp.get('resample', self.default_resample)))

  @property
  def grid_hw(self) -> tuple[int, int]:
    n = self.image_size // self.patch
    return n, n

  def patch_positions(self) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each `vision/block_i` token: the patch grid row-major."""
    r, c = np.divmod(np.arange(self.grid_hw[0] * self.grid_hw[1]), self.grid_hw[1])
    return r, c

  def merged_positions(self) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of the `vision/embedding` token: none, it pools the image."""
    return np.array([-1]), np.array([-1])

  def resize(self, image: Image.Image) -> np.ndarray:
    s = self.image_size
    return np.asarray(image.convert('RGB').resize((s, s), self.resample))

  def patchify(self, images_bss3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Resized uint8 [B, S, S, 3] -> (pixel_values [B, 3, S, S] float32, grid [B, 3])."""
    return _normalise(self, images_bss3)

  def images(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    return self.patchify(np.stack([self.resize(im) for im in images]))


class Gemma3Preprocessor(SiglipImages):
  """Gemma-3 inputs without torch or transformers' image processor: images as `SiglipImages`
  (the checkpoint's own size, 896 for Gemma-3-4B; no pan-and-scan); prompts -> token ids with
  each `<start_of_image>` expanded as Gemma3Processor does ("\\n\\n" BOI, mm_tokens_per_image
  soft tokens, EOI "\\n\\n").

  Token order (rows of `vision/block_i`): the patch grid row-major; `vision/projector` and the
  image positions of `text/layer_i`: the pooled grid (side sqrt(mm_tokens)) row-major.
  """
  default_size, tower, default_resample = 896, "Gemma-3's vision tower", Image.Resampling.BILINEAR

  def __init__(self, folder: str, image_size: int = 0):
    super().__init__(folder, image_size)
    config = self.config
    self.mm_tokens = int(config.get('mm_tokens_per_image', 256))
    self.pooled_side = int(round(self.mm_tokens ** 0.5))
    self.image_token_id = int(config.get('image_token_index', 262144))
    self.boi_token_id = int(config.get('boi_token_index', 255999))
    self.eoi_token_id = int(config.get('eoi_token_index', 256000))
    self._tokenizer = None

  def merged_positions(self) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each projector token (image token of the text) on the pooled grid."""
    return np.divmod(np.arange(self.mm_tokens), self.pooled_side)

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      self._tokenizer = _load_tokenizer(self.folder)
    return self._tokenizer

  def prompt_ids(self, grid_i3: np.ndarray, prompt: str = DEFAULT_PROMPT) -> np.ndarray:
    """Token ids of a user turn with the images then the prompt, ready for the answer."""
    tok = self.tokenizer
    boi, img, eoi = tok.convert_ids_to_tokens([self.boi_token_id, self.image_token_id,
                                               self.eoi_token_id])
    content = [{'type': 'image'} for _ in grid_i3] + [{'type': 'text', 'text': prompt}]
    text = tok.apply_chat_template([{'role': 'user', 'content': content}],
                                   add_generation_prompt=True, tokenize=False)
    if text.count(boi) != len(grid_i3):
      raise ValueError(f'the chat template gave {text.count(boi)} {boi} placeholders for '
                       f'{len(grid_i3)} images; check the tokenizer\'s chat template')
    text = text.replace(boi, f'\n\n{boi}{img * self.mm_tokens}{eoi}\n\n')
    return np.asarray(tok(text, add_special_tokens=False)['input_ids'], np.int64)


# LLaVA-1.5's conversation format (llava-hf's chat template renders a user turn with one image
# as exactly this); used when the folder ships no chat template. No <s>: the tokenizer adds it.
LLAVA_PROMPT = 'USER: {images}\n{prompt} ASSISTANT:'


class ClipImages:
  """CLIP's image processor without torch: shortest edge to image_size by PIL bicubic, centre
  crop, rescale, normalise with preprocessor_config.json's mean/std -> (pixel_values
  [B, 3, S, S] float32, grid [B, 3] = (1, S/p, S/p)), for a CLIP tower alone (CLIPModel /
  CLIPVisionModelWithProjection, `vlms.image_encoders`) and, through LlavaPreprocessor, LLaVA's.

  Token order (rows of `vision/block_i`): CLS first (row/col -1), then the patch grid
  row-major; `vision/embedding` (one token per image) has no grid position (row/col -1).
  """
  default_size, tower = 224, 'this CLIP tower'

  def __init__(self, folder: str, image_size: int = 0):
    self.config, pp, _ = _fixed_size_tower(self, folder, image_size, self.default_size,
                                           self.tower, 'its image mean/std and crop size')
    self.rescale = float(pp.get('rescale_factor', 1 / 255)) if pp.get('do_rescale', True) else None
    self.mean = np.asarray(pp.get('image_mean', [0.48145466, 0.4578275, 0.40821073]), np.float32)
    self.std = np.asarray(pp.get('image_std', [0.26862954, 0.26130258, 0.27577711]), np.float32)
    self.normalize = bool(pp.get('do_normalize', True))

  grid_hw = SiglipImages.grid_hw

  def patch_positions(self) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each `vision/block_i` token: CLS (-1, -1), then the grid row-major."""
    r, c = np.divmod(np.arange(self.grid_hw[0] * self.grid_hw[1]), self.grid_hw[1])
    return np.concatenate([[-1], r]), np.concatenate([[-1], c])

  merged_positions = SiglipImages.merged_positions

  def resize(self, image: Image.Image) -> np.ndarray:
    """Shortest edge to S (bicubic; the long edge int(S * long / short), as HF), centre crop."""
    s = self.image_size
    image = image.convert('RGB')
    w, h = image.size
    nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    x = np.asarray(image.resize((nw, nh), Image.Resampling.BICUBIC))
    top, left = (nh - s) // 2, (nw - s) // 2
    return x[top:top + s, left:left + s]

  patchify = SiglipImages.patchify
  images = SiglipImages.images


class LlavaPreprocessor(ClipImages):
  """LLaVA-1.5 inputs without torch: images as `ClipImages` (336 px for LLaVA-1.5); prompts ->
  token ids with each `<image>` expanded to one token per image feature, as LlavaProcessor does
  ((S/p)^2 with the 'default' strategy, + 1 with 'full').

  Token order (rows of `vision/block_i`): CLS first (row/col -1), then the patch grid
  row-major; `vision/projector` / text image tokens: the patch grid row-major (no CLS with
  'default').
  """
  default_size, tower = 336, "LLaVA's CLIP tower"

  def __init__(self, folder: str, image_size: int = 0):
    super().__init__(folder, image_size)
    self.full = self.config.get('vision_feature_select_strategy', 'default') == 'full'
    self.image_token_id = int(self.config.get('image_token_index', 32000))
    self._tokenizer = None

  def merged_positions(self) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each projector token / image token of the text."""
    r, c = self.patch_positions()
    return (r, c) if self.full else (r[1:], c[1:])

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      self._tokenizer = _load_tokenizer(self.folder)
    return self._tokenizer

  def prompt_ids(self, grid_i3: np.ndarray, prompt: str = DEFAULT_PROMPT) -> np.ndarray:
    """Token ids of a user turn with the images then the prompt, ready for the answer."""
    tok = self.tokenizer
    marker = tok.convert_ids_to_tokens(self.image_token_id)
    if getattr(tok, 'chat_template', None):
      content = [{'type': 'image'} for _ in grid_i3] + [{'type': 'text', 'text': prompt}]
      text = tok.apply_chat_template([{'role': 'user', 'content': content}],
                                     add_generation_prompt=True, tokenize=False)
    else:
      text = LLAVA_PROMPT.format(images=marker * len(grid_i3), prompt=prompt)
    if text.count(marker) != len(grid_i3):
      raise ValueError(f'the prompt has {text.count(marker)} {marker} placeholders for '
                       f'{len(grid_i3)} images; check the tokenizer\'s chat template')
    n = self.grid_hw[0] * self.grid_hw[1] + self.full
    return np.asarray(tok(text.replace(marker, marker * n))['input_ids'], np.int64)


def _normalise(pre, images_bss3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Resized uint8 [B, S, S, 3] -> (pixel_values [B, 3, S, S] float32, grid [B, 3]) with the
  preprocessor's rescale / mean / std (SigLIP's and CLIP's processors differ only there)."""
  x = images_bss3.astype(np.float32)
  if pre.rescale is not None:
    x = x * np.float32(pre.rescale)
  if pre.normalize:
    x = (x - pre.mean) / pre.std
  g = pre.grid_hw[0]
  return (np.ascontiguousarray(x.transpose(0, 3, 1, 2)),
          np.tile(np.array([[1, g, g]], np.int64), (len(x), 1)))


def _fixed_size_tower(pre, folder: str, image_size: int, default_size: int, tower: str,
                      wants: str) -> tuple[dict, dict, dict]:
  """Reads the checkpoint's config and preprocessor_config.json for a tower that takes one
  image size only; sets pre.folder / model_size / patch / image_size and refuses any other
  image_size. Returns (config, preprocessor config, vision config)."""
  from csae_jax.vlms import hf  # pylint: disable=g-import-not-at-top
  config = hf.read_config(folder)
  pp = _read_json(folder, 'preprocessor_config.json', wants)
  # a VLM or a SiglipModel / CLIPModel nests the tower's config; a *VisionModel* is the tower
  vision = config.get('vision_config') or config
  pre.folder = folder
  pre.model_size = int(vision.get('image_size', default_size))
  pre.patch = int(vision.get('patch_size', 14))
  if image_size not in (0, pre.model_size):
    raise ValueError(f'image_size={image_size}: {tower} takes {pre.model_size}x'
                     f'{pre.model_size} images only; pass 0 (or {pre.model_size})')
  pre.image_size = pre.model_size
  return config, pp, vision
