"""End-to-end harvest throughput: image files -> preprocessing -> the port -> shards on disk.

    python -m benchmarks.harvest_e2e [--model 4b|tiny] [--images 512] [--workers 0,8]

Makes a random-weight checkpoint folder with transformers (torch is a benchmark-time tool here,
as in the tests; csae_jax never imports it), writes `--images` JPEGs cut from scikit-learn's
sample photos, and runs `csae_jax.sources.harvest.run` at the paper's site and image size once
per `--workers` value (preprocessing processes), reporting images/s (first batch excluded) next
to the vision tower alone (benchmarks/vision_throughput.py) so the host-side share is visible.
Writes benchmarks/results/harvest_e2e_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
from PIL import Image

from benchmarks import _results
from csae_jax.sources import harvest
from csae_jax.vlms import qwen3_vl


def make_checkpoint(folder: str, which: str) -> None:
  import torch  # pylint: disable=g-import-not-at-top  (benchmark-time only)
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = json.loads(json.dumps(qwen3_vl.QWEN3_VL_4B_CONFIG))
  if which == 'tiny':
    cfg['text_config'].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              vocab_size=152000)
    cfg['text_config']['rope_scaling']['mrope_section'] = [4, 2, 2]
    cfg['vision_config'].update(depth=24, hidden_size=32, intermediate_size=64, num_heads=2,
                                out_hidden_size=64)
  config = transformers.Qwen3VLConfig(**cfg)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  with torch.device(device):
    model = transformers.Qwen3VLForConditionalGeneration(config).to(torch.bfloat16)
  model.save_pretrained(folder)
  v = config.vision_config
  transformers.Qwen2VLImageProcessorPil(
      patch_size=v.patch_size, merge_size=v.spatial_merge_size,
      temporal_patch_size=v.temporal_patch_size, image_mean=[0.5] * 3,
      image_std=[0.5] * 3).save_pretrained(folder)


def write_images(folder: str, n: int) -> None:
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  photos = load_sample_images().images
  rng = np.random.default_rng(0)
  for i in range(n):
    p = photos[i % len(photos)]
    h, w = rng.integers(200, p.shape[0]), rng.integers(200, p.shape[1])
    y, x = rng.integers(0, p.shape[0] - h + 1), rng.integers(0, p.shape[1] - w + 1)
    Image.fromarray(p[y:y + h, x:x + w]).save(os.path.join(folder, f'{i:05d}.jpg'), quality=90)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--model', default='4b', choices=('4b', 'tiny'))
  ap.add_argument('--images', type=int, default=512)
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--workers', default='0,8')
  ap.add_argument('--dtype', default='bfloat16')
  ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results'))
  args = ap.parse_args()
  root = tempfile.mkdtemp()
  t0 = time.perf_counter()
  make_checkpoint(os.path.join(root, 'model'), args.model)
  os.makedirs(os.path.join(root, 'images'))
  write_images(os.path.join(root, 'images'), args.images)
  setup_s = time.perf_counter() - t0
  rows = []
  for w in [int(v) for v in args.workers.split(',')]:
    wd = os.path.join(root, f'wd_{w}')
    t0 = time.perf_counter()
    res = harvest.run({'model': 'qwen3-vl-4b-instruct', 'model_path': os.path.join(root, 'model'),
                       'images': os.path.join(root, 'images'), 'batch_size': args.batch,
                       'chunk_images': args.batch * 4, 'workers': w, 'dtype': args.dtype,
                       'store_dtype': 'float16'}, wd)
    rows.append({'workers': w, 'images_per_s': res['images_per_s'],
                 'wall_s': round(time.perf_counter() - t0, 1), 'rows': res['rows']})
    print(rows[-1], flush=True)
    shutil.rmtree(wd)
  result = {**_results.device(), 'model': args.model, 'images': args.images,
            'batch': args.batch, 'dtype': args.dtype, 'setup_s': round(setup_s, 1),
            'results': rows}
  _results.save(result, args.out, 'harvest_e2e')
  shutil.rmtree(root)


if __name__ == '__main__':
  main()
