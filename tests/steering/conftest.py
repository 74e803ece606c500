"""A tiny steering setup: a random Qwen3-VL saved with save_pretrained, a word tokenizer that
names every id, labelled images, their harvest at two vision blocks, and exported SAEs of those
sites written by `csae_jax.export.write` (random dictionaries fitted to the harvested rows: the
steering code only needs the export format; training one is the pipeline's job)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from csae_jax import config as config_lib
from csae_jax import export
from csae_jax.sources import arrays, harvest
from tests.sources.test_harvest import save_tiny_tokenizer
from tests.vlms import conftest as vlm

SITES = ('vision/block_0', 'vision/block_2')
LABELS = ('cat', 'dog', 'bird')
WORDS = list(LABELS) + ['a', 'on', 'in', 'grass', 'red', 'small'] + [f'w{i}' for i in range(110)]
IMAGE_SIZE = 32


def write_random_export(out: str, rows_nd: np.ndarray, *, arch: str, n: int = 24, seed: int = 0,
                        hierarchy: dict | None = None) -> str:
  """An export of a random SAE whose codes are sparse on `rows_nd` (threshold / k / per-latent
  thresholds set from the rows' pre-activations)."""
  rng = np.random.default_rng(seed)
  d = rows_nd.shape[1]
  w_dec = rng.standard_normal((n, d)).astype(np.float32)
  w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
  b_dec = rows_nd.mean(0).astype(np.float32)
  params = {'w_enc': w_dec.T.copy(), 'b_enc': np.zeros(n, np.float32), 'w_dec': w_dec,
            'b_dec': b_dec}
  pre = np.maximum((rows_nd - b_dec) @ params['w_enc'], 0)
  threshold = float(np.quantile(pre, 0.8))
  if arch == 'jumprelu':
    params['log_threshold'] = np.log(np.quantile(pre, 0.8, axis=0) + 1e-3).astype(np.float32)
  hierarchy = hierarchy or {
      'schema_version': 1, 'unassigned': [], 'alive': list(range(n)),
      'concepts': [{'id': 0, 'members': [0, 1, 2, 3], 'weights': [1.0] * 4},
                   {'id': 1, 'members': [4, 5, 6], 'weights': [1.0] * 3},
                   {'id': 2, 'members': [7], 'weights': [1.0]}]}
  export.write(out, level1=params, level1_threshold=threshold, level1_arch=arch, level1_k=4,
               scale=1.0, level2=None, hierarchy=hierarchy, metrics={},
               level2_decoder_md=w_dec[:3])
  return out


@pytest.fixture(scope='package')
def steer_setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('steer')
  folder = str(root / 'model')
  # Untied embeddings: with tied O(1) random embeddings one token wins every step.
  torch_model, config = vlm.make_tiny_qwen3_vl(folder, seed=2, tie_word_embeddings=False)
  save_tiny_tokenizer(folder, extra_words=WORDS)
  image_dir = root / 'images'
  rng = np.random.default_rng(0)
  for i in range(6):
    label = LABELS[i % 3]
    (image_dir / label).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (20 + 3 * i, 30, 3), dtype=np.uint8)).save(
        image_dir / label / f'{i}.png')
  wd = str(root / 'harvest')
  harvest.run(config_lib.harvest_from_config_dict(dict(
      model='qwen3-vl', model_path=folder, images=str(image_dir), image_size=IMAGE_SIZE,
      batch_size=2, chunk_images=4, sites=','.join(SITES))), wd)
  site_dirs = {s: os.path.join(wd, 'activations', s.replace('/', '_')) for s in SITES}
  rows = {s: arrays.ArraySource(d, batch_size=1, seed=0, holdout_rows=0,
                                scale=1.0).read_rows(np.arange(6 * 16))
          for s, d in site_dirs.items()}
  return dict(root=root, folder=folder, torch_model=torch_model, config=config,
              image_dir=str(image_dir), site_dirs=site_dirs, rows=rows)
