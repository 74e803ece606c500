"""Harvesting from images through the Qwen3-VL port: rows equal the reference model's activations,
the index locates every row, runs resume, and the output is a CSAE data.path."""

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

from csae_jax import config as config_lib
from csae_jax.sources import arrays, harvest
from csae_jax.vlms import preprocess
from tests.vlms import conftest as vlm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_tiny_tokenizer(folder: str, extra_words=()) -> None:
  """A word-level tokenizer whose special tokens carry the tiny model's ids, with a Qwen-style
  chat template (the real checkpoint ships its own). extra_words take the free ids in turn
  (steering decodes generated ids: give every id of the tiny vocabulary a word)."""
  special = {'<|image_pad|>': vlm.IMAGE_TOKEN_ID, '<|video_pad|>': vlm.VIDEO_TOKEN_ID,
             '<|vision_start|>': vlm.VISION_START_ID, '<|vision_end|>': vlm.VISION_END_ID,
             '<|im_start|>': 104, '<|im_end|>': 105}
  words = ['[UNK]', 'user', 'assistant', 'Describe', 'the', 'image', 'content', 'accurately',
           '.', 'What', 'is', 'this', '?']
  vocab = {w: i for i, w in enumerate(words)}
  vocab.update(special)
  free = (i for i in range(10_000) if i not in vocab.values())
  vocab.update({w: next(free) for w in extra_words})
  tok = Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token='[UNK]', eos_token='<|im_end|>',
      additional_special_tokens=list(special))
  fast.chat_template = TEMPLATE
  fast.save_pretrained(folder)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('harvest')
  folder = str(root / 'model')
  # 3 text layers: HF's last hidden state is taken after the final norm, so layer 1 must not
  # be the last one for the comparison below
  model, config = vlm.make_tiny_qwen3_vl(folder, num_hidden_layers=3)
  save_tiny_tokenizer(folder)
  image_dir = root / 'images'
  rng = np.random.default_rng(0)
  names = ['cat/a.png', 'cat/b.png', 'dog/c.png', 'dog/d.png', 'e.png']
  for i, n in enumerate(names):
    (image_dir / os.path.dirname(n)).mkdir(parents=True, exist_ok=True)
    size = (30 + 7 * i, 50 - 3 * i)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(image_dir / n)
  return root, folder, model, config, str(image_dir), names


def _cfg(folder, image_dir, **kw):
  base = dict(model='qwen3-vl', model_path=folder, images=image_dir, image_size=32,
              batch_size=2, chunk_images=4, sites='vision/block_1,vision/merger,text/layer_1')
  base.update(kw)
  return config_lib.harvest_from_config_dict(base)


def test_rows_match_the_reference_and_resume(setup, tmp_path):
  _, folder, model, config, image_dir, names = setup
  wd = str(tmp_path / 'wd')
  result = harvest.run(_cfg(folder, image_dir), wd)
  assert result['n_images'] == 5 and result['chunks_run'] == 2
  pre = preprocess.Qwen3VLPreprocessor(folder, image_size=32)
  block_dir = os.path.join(wd, 'activations', 'vision_block_1')
  src = arrays.ArraySource(block_dir, batch_size=4, seed=0, holdout_rows=8)
  with np.load(os.path.join(block_dir, 'index.npz')) as z:
    index = {k: z[k] for k in z.files}
  assert src.n_rows == 5 * 16 and len(index['image_id']) == src.n_rows
  with open(os.path.join(block_dir, 'images.json')) as f:
    images = json.load(f)
  assert [images[str(i)]['file'] for i in range(5)] == names
  assert [images[str(i)]['label'] for i in range(5)] == ['cat', 'cat', 'dog', 'dog', None]
  # every image's rows equal the torch reference on that image alone (the padded last batch
  # and the batching leave no trace)
  for i in (0, 4):
    pixels, grid = pre.images([Image.open(os.path.join(image_dir, names[i]))])
    ref = vlm.torch_vision_outputs(model, pixels, grid)
    rows = np.flatnonzero(index['image_id'] == i)
    np.testing.assert_allclose(src.read_rows(rows), ref['vision/block_1'], atol=1e-4)
    np.testing.assert_array_equal(index['token_index'][rows], np.arange(16))
    r, c = preprocess.patch_grid_positions(4, 4, 2)
    np.testing.assert_array_equal(index['row'][rows], r)
    np.testing.assert_array_equal(index['col'][rows], c)
    merged = arrays.ArraySource(os.path.join(wd, 'activations', 'vision_merger'), batch_size=2,
                                seed=0, holdout_rows=2)
    np.testing.assert_allclose(merged.read_rows(np.arange(4 * i, 4 * i + 4)),
                               ref['vision/merger'], atol=1e-4)
  # text sites: the image tokens' residual stream after layer 1, as HF computes it
  ids = pre.prompt_ids(np.array([[1, 4, 4]]))
  assert int(np.sum(ids == vlm.IMAGE_TOKEN_ID)) == 4
  pixels, grid = pre.images([Image.open(os.path.join(image_dir, names[2]))])
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids[None]), pixel_values=torch.from_numpy(pixels),
                image_grid_thw=torch.from_numpy(grid),
                mm_token_type_ids=torch.from_numpy((ids == vlm.IMAGE_TOKEN_ID)[None].astype(np.int64)),
                output_hidden_states=True)
  text = arrays.ArraySource(os.path.join(wd, 'activations', 'text_layer_1'), batch_size=2, seed=0,
                            holdout_rows=2)
  # the site is the stream layer 2 reads: HF's hidden state plus the deepstack feature it adds
  # at the image tokens after layer 1
  deepstack_1 = vlm.torch_vision_outputs(model, pixels, grid)['vision/deepstack_1']
  want = out.hidden_states[2][0].numpy()[ids == vlm.IMAGE_TOKEN_ID] + deepstack_1
  np.testing.assert_allclose(text.read_rows(np.arange(8, 12)), want, atol=1e-4)
  # resume: drop the last chunk of one site; only that chunk is recomputed, identically, also
  # when a pool of preprocessing processes prepares the images
  before = np.load(os.path.join(block_dir, 'shard_00001.npy'))
  os.remove(os.path.join(block_dir, 'shard_00001.idx.npz'))
  again = harvest.run(_cfg(folder, image_dir, workers=2), wd)
  assert again['chunks_run'] == 1
  np.testing.assert_array_equal(np.load(os.path.join(block_dir, 'shard_00001.npy')), before)
  with pytest.raises(ValueError, match='other settings'):
    harvest.run(_cfg(folder, image_dir, image_size=64), wd)


def test_all_tokens_keeps_the_text_tokens(setup, tmp_path):
  _, folder, _, _, image_dir, _ = setup
  harvest.run(_cfg(folder, image_dir, sites='text/layer_0', all_tokens=True, max_images=2),
              str(tmp_path))
  pre = preprocess.Qwen3VLPreprocessor(folder, image_size=32)
  ids = pre.prompt_ids(np.array([[1, 4, 4]]))
  site_dir = os.path.join(str(tmp_path), 'activations', 'text_layer_0')
  with np.load(os.path.join(site_dir, 'index.npz')) as z:
    index = {k: z[k] for k in z.files}
  assert len(index['image_id']) == 2 * len(ids)
  np.testing.assert_array_equal(index['token_index'][:len(ids)], np.arange(len(ids)))
  is_img = ids == vlm.IMAGE_TOKEN_ID
  assert np.all(index['row'][:len(ids)][~is_img] == -1)
  np.testing.assert_array_equal(index['row'][:len(ids)][is_img], [0, 0, 1, 1])
  np.testing.assert_array_equal(index['col'][:len(ids)][is_img], [0, 1, 0, 1])


def test_bad_sites_and_config(setup, tmp_path):
  _, folder, _, _, image_dir, _ = setup
  with pytest.raises(ValueError, match="unknown vision site 'vision/block_9'"):
    harvest.run(_cfg(folder, image_dir, sites='vision/block_9'), str(tmp_path))
  with pytest.raises(ValueError, match='multiple of batch_size'):
    _cfg(folder, image_dir, chunk_images=3)
  with pytest.raises(ValueError, match="'model_path' is required"):
    config_lib.harvest_from_config_dict({'images': image_dir})
  with pytest.raises(ValueError, match='unknown model'):
    harvest.run(_cfg(folder, image_dir, model='llava-9000'), str(tmp_path))


def test_cli_harvest_then_csae_on_it(setup, tmp_path):
  """The issue's exact command, then its output as --config.data.path of the CSAE run."""
  _, folder, _, _, image_dir, _ = setup
  wd = str(tmp_path / 'wd')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  cmd = [sys.executable, '-m', 'experiments.run', '--config=experiments/configs/harvest.py',
         '--config.model=qwen3-vl', f'--config.model_path={folder}',
         f'--config.images={image_dir}', '--config.sites=vision/block_2', f'--workdir={wd}',
         '--config.image_size=64']
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'vision/block_2' in r.stdout and '320 rows' in r.stdout
  data = os.path.join(wd, 'activations', 'vision_block_2')
  cmd = [sys.executable, '-m', 'experiments.run', '--config=experiments/configs/csae.py:small',
         f'--config.data.path={data}', '--config.train.steps=40', '--config.level2.steps=40',
         '--config.train.batch_size=64', '--config.level2.restarts=2',
         '--config.data.holdout_rows=64', f'--workdir={tmp_path / "csae"}']
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert os.path.exists(tmp_path / 'csae' / 'export' / 'hierarchy.json')
