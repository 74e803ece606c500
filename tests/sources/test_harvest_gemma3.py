"""Harvesting through the Gemma-3 port with the same command as Qwen3-VL: on real photographs
(skimage.data) every image's rows equal transformers' Gemma-3 on transformers' own image
processor, text sites take the expanded <start_of_image> prompt, and the output trains a CSAE
run via --config.data.path."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from csae_jax.sources import arrays
from csae_jax.vlms import preprocess
from tests.sources import csae_on_harvest
from tests.vlms import tiny_gemma3 as tg

skimage_data = pytest.importorskip('skimage.data')

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
PHOTOS = {'people/astronaut.png': 'astronaut', 'animals/chelsea.png': 'chelsea',
          'things/coffee.png': 'coffee'}


def save_tiny_tokenizer(folder: str) -> None:
  """A word-level tokenizer whose special tokens carry the tiny model's ids, with a
  Gemma-style chat template (the real checkpoint ships its own)."""
  special = {'<start_of_image>': tg.BOI_ID, '<image_soft_token>': tg.IMAGE_TOKEN_ID,
             '<end_of_image>': tg.EOI_ID, '<bos>': 2, '<eos>': 1, '<start_of_turn>': 105,
             '<end_of_turn>': 106}
  words = ['[UNK]', 'user', 'model', 'Describe', 'the', 'image', 'content', 'accurately', '.']
  vocab = {w: i + 3 for i, w in enumerate(words)}
  vocab.update(special)
  tok = Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token='[UNK]', bos_token='<bos>', eos_token='<eos>',
      additional_special_tokens=[t for t in special if t not in ('<bos>', '<eos>')])
  fast.chat_template = TEMPLATE
  fast.save_pretrained(folder)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('harvest_gemma3')
  folder = str(root / 'model')
  model, config = tg.make_tiny_gemma3(folder)  # 3 text layers: layer 1 is not the last
  save_tiny_tokenizer(folder)
  image_dir = root / 'images'
  for name, photo in PHOTOS.items():
    (image_dir / os.path.dirname(name)).mkdir(parents=True, exist_ok=True)
    Image.fromarray(getattr(skimage_data, photo)()).save(image_dir / name)
  return folder, model, config, str(image_dir)


def _reference(model, config, image: Image.Image, ids: np.ndarray):
  """transformers end to end: its image processor, vision tower, projector and decoder."""
  pixels = np.asarray(tg.image_processor(config)(images=[image], return_tensors='np')
                      ['pixel_values'], np.float32)
  with torch.no_grad():
    vo = model.model.vision_tower(pixel_values=torch.from_numpy(pixels),
                                  output_hidden_states=True)
    proj = model.model.multi_modal_projector(vo.last_hidden_state)[0].numpy()
    out = model(**tg.hf_inputs(ids[None], pixels), output_hidden_states=True)
  return vo.hidden_states[2][0].numpy(), proj, out.hidden_states[2][0].numpy()


def test_cli_rows_match_transformers_then_csae(setup, tmp_path):
  folder, model, config, image_dir = setup
  wd = str(tmp_path / 'wd')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  cmd = [sys.executable, '-m', 'experiments.run', '--config=experiments/configs/harvest.py',
         '--config.model=gemma-3', f'--config.model_path={folder}',
         f'--config.images={image_dir}', '--config.sites=vision/block_1,vision/projector,'
         'text/layer_1', '--config.batch_size=2', '--config.chunk_images=2', f'--workdir={wd}']
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  act = os.path.join(wd, 'activations')
  with open(os.path.join(act, 'vision_block_1', 'manifest.json')) as f:
    assert json.load(f)['image_size'] == 32  # 0 = the checkpoint's own size
  with open(os.path.join(act, 'vision_block_1', 'images.json')) as f:
    files = {int(i): v['file'] for i, v in json.load(f).items()}
  pre = preprocess.Gemma3Preprocessor(folder)
  ids = pre.prompt_ids(np.ones((1, 3)))
  # the processor's expansion: BOI, 4 soft tokens, EOI (whitespace has no ids in this tokenizer)
  boi = int(np.flatnonzero(ids == tg.BOI_ID)[0])
  np.testing.assert_array_equal(ids[boi:boi + 6], [tg.BOI_ID] + [tg.IMAGE_TOKEN_ID] * 4 +
                                [tg.EOI_ID])
  assert ids[0] == 2  # the template's <bos>, not doubled
  src = {s: arrays.ArraySource(os.path.join(act, s), batch_size=2, seed=0, holdout_rows=2)
         for s in ('vision_block_1', 'vision_projector', 'text_layer_1')}
  with np.load(os.path.join(act, 'vision_block_1', 'index.npz')) as z:
    index = {k: z[k] for k in z.files}
  assert src['vision_block_1'].n_rows == 3 * 16 and src['vision_projector'].n_rows == 3 * 4
  for i in range(3):
    image = Image.open(os.path.join(image_dir, files[i]))
    block_1, proj, text_1 = _reference(model, config, image, ids)
    rows = np.flatnonzero(index['image_id'] == i)
    np.testing.assert_array_equal(index['row'][rows], np.arange(16) // 4)
    np.testing.assert_array_equal(index['col'][rows], np.arange(16) % 4)
    for site, want in (('vision_block_1', block_1), ('vision_projector', proj),
                       ('text_layer_1', text_1[ids == tg.IMAGE_TOKEN_ID])):
      n = len(want)
      got = src[site].read_rows(np.arange(n * i, n * (i + 1)))
      err = float(np.max(np.abs(got - want)))
      assert err < 1e-4, f'{site} image {i}: max abs diff {err:.3g}'
  csae_on_harvest.train_csae_on(os.path.join(act, 'vision_block_1'), str(tmp_path / 'csae'), 32)


def test_preprocessor_matches_the_image_processor(setup):
  folder, _, config, _ = setup
  pre = preprocess.Gemma3Preprocessor(folder)
  images = [Image.fromarray(skimage_data.coffee()), Image.fromarray(skimage_data.chelsea())]
  pixels, grid = pre.images(images)
  want = tg.image_processor(config)(images=images, return_tensors='np')['pixel_values']
  np.testing.assert_allclose(pixels, want, atol=1e-6)
  np.testing.assert_array_equal(grid, [[1, 4, 4]] * 2)
  with pytest.raises(ValueError, match='takes 32x32 images only'):
    preprocess.Gemma3Preprocessor(folder, image_size=64)
