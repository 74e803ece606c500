"""The whole steering chain on a tiny *random-weight* Qwen3-VL: harvest -> CSAE -> steer.

    python -m experiments.sweeps.steer_tiny_captions [--out experiments/results/steer_tiny_sample.md]

Builds a tiny random Qwen3-VL with transformers (torch and the test helpers are script-time
tools here, as in benchmarks/harvest_e2e.py: `pip install -e '.[test]'`), a word tokenizer that
names every id, 24 labelled crops of scikit-learn's two sample photos; harvests vision/block_2,
trains a small staged CSAE on it, and runs the steering protocol (every arm, +-v on every image).
The captions are random-weight captions: they show that the machinery runs end to end and what
its outputs look like, nothing about what steering does to a trained model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from csae_jax import config as config_lib
from csae_jax import pipeline
from csae_jax.sources import harvest
from csae_jax.steering import protocol

SITE = 'vision/block_2'


def make_inputs(root: str) -> tuple[str, str]:
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  from tests.sources.test_harvest import save_tiny_tokenizer  # pylint: disable=g-import-not-at-top
  from tests.steering.conftest import WORDS  # pylint: disable=g-import-not-at-top
  from tests.vlms.conftest import make_tiny_qwen3_vl  # pylint: disable=g-import-not-at-top
  folder = os.path.join(root, 'model')
  make_tiny_qwen3_vl(folder, seed=2, tie_word_embeddings=False)
  save_tiny_tokenizer(folder, extra_words=['temple', 'flower'] + WORDS)
  images = os.path.join(root, 'images')
  rng = np.random.default_rng(0)
  for label, photo in zip(('temple', 'flower'), load_sample_images().images):
    os.makedirs(os.path.join(images, label))
    for i in range(12):
      h, w = rng.integers(60, 200, 2)
      y, x = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
      Image.fromarray(photo[y:y + h, x:x + w]).save(os.path.join(images, label, f'{i}.png'))
  return folder, images


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--out', default='experiments/results/steer_tiny_sample.md')
  args = ap.parse_args()
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as root:
    folder, images = make_inputs(root)
    harvest.run(config_lib.harvest_from_config_dict(dict(
        model='qwen3-vl', model_path=folder, images=images, image_size=32, batch_size=8,
        chunk_images=8, sites=SITE)), os.path.join(root, 'harvest'))
    data = os.path.join(root, 'harvest', 'activations', SITE.replace('/', '_'))
    pipeline.run(config_lib.from_config_dict({
        'data': {'path': data, 'holdout_rows': 64},
        'level1': {'n_latents': 64, 'k': 4}, 'level2': {'n_latents': 8, 'steps': 500},
        'train': {'steps': 400, 'batch_size': 64}}), os.path.join(root, 'csae'))
    res = protocol.run(dict(model='qwen3-vl', model_path=folder, images=images,
                            export=os.path.join(root, 'csae', 'export'), n_concepts=2,
                            images_per_concept=6, max_new_tokens=12, suppress_on='all'),
                       os.path.join(root, 'steer'))
    with open(os.path.join(root, 'steer', 'steer', 'captions.jsonl')) as f:
      records = [json.loads(line) for line in f]
  base = {r['image']: r['text'] for r in records if r['arm'] == 'none'}
  lines = ['# Steering a tiny random-weight Qwen3-VL (machinery check, not a result)', '',
           f'`python -m experiments.sweeps.steer_tiny_captions`, {time.perf_counter() - t0:.0f} s '
           'on 2 CPU cores. Random weights: the captions are random word sequences; what matters '
           'is that each arm and sign produced its own captions through the port\'s edits, and '
           'that the protocol counted them.', '',
           res['table'], '', 'Concepts: ' + '; '.join(
               f'{c["id"]} ({c["n_members"]} members, words {c["words"]}, u = {c["u"]:.3f})'
               for c in res['concepts']), '', '| image | arm | sign | value | caption | unsteered |',
           '|---|---|---|---|---|---|']
  c0 = res['concepts'][0]['id']
  sample = [r for r in records if r['concept'] == c0][:12]
  for r in sample:
    lines.append(f'| {r["image"]} | {r["arm"]} | {r["sign"]} | {r["value"]:.3f} | {r["text"]} | '
                 f'{base[r["image"]]} |')
  with open(args.out, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
