"""Harvesting through the LLaVA-1.5 port with the same command as Qwen3-VL and Gemma-3: on real
photographs (skimage.data) every image's rows equal transformers' LLaVA on transformers' own CLIP
image processor; the `<image>` expansion and the CLS row; the output trains a CSAE run via
--config.data.path."""

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
from tests.vlms import tiny_llava as tl

skimage_data = pytest.importorskip('skimage.data')

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def save_tiny_tokenizer(folder: str) -> None:
  """Word-level, `<image>` = the tiny image id, a BOS the tokenizer adds, no chat template
  (so the port's LLaVA-1.5 prompt format is used)."""
  special = {'<image>': tl.IMAGE_TOKEN_ID, '<s>': 1, '</s>': 2}
  words = ['[UNK]', 'USER', ':', 'ASSISTANT', 'Describe', 'the', 'image', 'content',
           'accurately', '.']
  vocab = {w: i + 3 for i, w in enumerate(words)}
  vocab.update(special)
  tok = Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  from tokenizers import processors  # pylint: disable=g-import-not-at-top
  tok.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 1)])
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token='[UNK]', bos_token='<s>', eos_token='</s>',
      additional_special_tokens=['<image>']).save_pretrained(folder)


def test_cli_rows_match_transformers_then_csae(tmp_path):
  folder = str(tmp_path / 'model')
  model, config = tl.make_tiny_llava(folder)
  save_tiny_tokenizer(folder)
  image_dir = tmp_path / 'images'
  image_dir.mkdir()
  for name in ('astronaut', 'coffee', 'chelsea'):  # square, wide, wide: the crop matters
    Image.fromarray(getattr(skimage_data, name)()).save(image_dir / f'{name}.png')
  wd = str(tmp_path / 'wd')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  # `llava`: the port's short name, as the command spells it
  cmd = [sys.executable, '-m', 'experiments.run', '--config=experiments/configs/harvest.py',
         '--config.model=llava', f'--config.model_path={folder}', f'--config.images={image_dir}',
         '--config.sites=vision/block_1,vision/projector,text/layer_0', '--config.batch_size=2',
         '--config.chunk_images=2', f'--workdir={wd}']
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  act = os.path.join(wd, 'activations')
  with open(os.path.join(act, 'text_layer_0', 'manifest.json')) as f:
    assert json.load(f)['image_size'] == 32  # 0 = the checkpoint's own size
  pre = preprocess.LlavaPreprocessor(folder)
  ids = pre.prompt_ids(np.ones((1, 3)))
  assert ids[0] == 1 and int(np.sum(ids == tl.IMAGE_TOKEN_ID)) == 16  # <s>, 4x4 patches
  with open(os.path.join(act, 'vision_block_1', 'images.json')) as f:
    files = {int(i): v['file'] for i, v in json.load(f).items()}
  with np.load(os.path.join(act, 'vision_block_1', 'index.npz')) as z:
    rows_block = z['row']
  assert rows_block[0] == -1 and list(rows_block[1:5]) == [0, 0, 0, 0]  # CLS, then row 0
  src = {s: arrays.ArraySource(os.path.join(act, s), batch_size=2, seed=0, holdout_rows=2)
         for s in ('vision_block_1', 'vision_projector', 'text_layer_0')}
  proc = tl.image_processor(config)
  for i in range(3):
    image = Image.open(os.path.join(image_dir, files[i]))
    pixels = np.asarray(proc(images=[image], return_tensors='np')['pixel_values'], np.float32)
    np.testing.assert_allclose(pre.images([image])[0], pixels, atol=1e-5)
    with torch.no_grad():
      vo = model.model.vision_tower(pixel_values=torch.from_numpy(pixels),
                                    output_hidden_states=True)
      feats = model.model.get_image_features(pixel_values=torch.from_numpy(pixels))
      out = model(**tl.hf_inputs(ids[None], pixels), output_hidden_states=True)
    wants = {'vision_block_1': vo.hidden_states[2][0].numpy(),
             'vision_projector': feats.pooler_output[0].numpy(),
             'text_layer_0': out.hidden_states[1][0].numpy()[ids == tl.IMAGE_TOKEN_ID]}
    for site, want in wants.items():
      got = src[site].read_rows(np.arange(len(want) * i, len(want) * (i + 1)))
      err = float(np.max(np.abs(got - want)))
      assert err < 1e-4, f'{site} image {i}: max abs diff {err:.3g}'
  # The paper's LLaVA site kind (a text layer at the image tokens) trains a CSAE run.
  csae_on_harvest.train_csae_on(os.path.join(act, 'text_layer_0'), str(tmp_path / 'csae'), 32)
