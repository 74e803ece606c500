"""Run folders built directly (no training) for the report's tests and its size benchmark:
a pipeline workdir with export/ and histories.json, a compare workdir, and a harvest whose
activations plant known features on known patches of known images."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from csae_jax.reports import plots


def _json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(obj, f)


def pipeline_workdir(wd: str, *, n1: int = 40, n_concepts: int = 8, d: int = 16, seed: int = 0,
                     data_path: str = '', w_dec_nd: np.ndarray | None = None,
                     figures: bool = False, sae: dict | None = None) -> dict:
  """export/ (hierarchy.json, level1_decoder.npy, metrics.json, [level1_sae.npz]) and
  histories.json of a staged run; concepts take consecutive features, the last 10% unassigned.
  Returns the hierarchy."""
  rng = np.random.default_rng(seed)
  if w_dec_nd is None:
    w_dec_nd = rng.standard_normal((n1, d)).astype(np.float32)
    w_dec_nd /= np.linalg.norm(w_dec_nd, axis=1, keepdims=True)
  assigned = int(n1 * 0.9)
  bounds = np.linspace(0, assigned, n_concepts + 1).round().astype(int)
  concepts = []
  for c in range(n_concepts):
    members = list(range(bounds[c], bounds[c + 1]))
    concepts.append({'id': c, 'members': members,
                     'weights': sorted(rng.uniform(0.2, 1.0, len(members)).round(4).tolist(),
                                       reverse=True)})
  hier = {'schema_version': 1, 'concepts': concepts, 'unassigned': list(range(assigned, n1)),
          'alive': list(range(n1))}
  export = os.path.join(wd, 'export')
  _json(os.path.join(export, 'hierarchy.json'), hier)
  _json(os.path.join(export, 'metrics.json'),
        {'schema_version': 1, 'mode': 'staged', 'config_hash': 'f' * 16, 'd': d,
         'level1/n_latents': n1, 'level1/fvu': 0.1234, 'level2/concepts': n_concepts})
  np.save(os.path.join(export, 'level1_decoder.npy'), w_dec_nd)
  if sae is not None:
    np.savez(os.path.join(export, 'level1_sae.npz'), **sae['params'],
             threshold=np.float32(sae.get('threshold', 0.0)), arch=np.array(sae['arch']),
             k=np.int64(sae['k']))
  hist = {'level1': [{'step': s, 'level1/loss': 1.0 / s, 'level1/fvu': 1.0 / s, 'level1/l0': 4,
                      'level1/dead_frac': 0.0} for s in (10, 20, 30)],
          'level2': [{'step': s, 'level2/loss': 2.0 / s, 'level2/fvu': 2.0 / s} for s in (10, 20)]}
  _json(os.path.join(wd, 'histories.json'), hist)
  if figures:
    plots.training_curves(hist, os.path.join(export, 'curves.png'))
    plots.density_histogram(rng.uniform(0, 0.2, n1), os.path.join(export, 'level1_density.png'))
  _json(os.path.join(wd, 'level1', 'manifest.json'), {'data': {'path': data_path}})
  return hier


# The planted harvest: 6 images of a 2 x 3 patch grid, d = n1 = 8, an identity TopK(k=1) SAE.
# Image i lights feature i % 4 on patch (i % 2, i % 3) with code i + 1; every other row is 0.
GRID = (2, 3)
N_IMAGES = 6
FILES = ['cat/0.png', 'cat/1.png', 'cat/2.png', 'dog/3.png', 'dog/4.png', 'dog/5.png']


def planted(i: int) -> tuple[int, int, float]:
  """(feature, patch cell, code) planted in image i."""
  return i % 4, (i % 2) * GRID[1] + i % 3, float(i + 1)


def harvest_folder(root: str) -> tuple[str, str]:
  """(site folder, image folder) of the planted harvest, in the harvest's on-disk format."""
  images = os.path.join(root, 'images')
  rng = np.random.default_rng(0)
  for name in FILES:
    os.makedirs(os.path.join(images, os.path.dirname(name)), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
        os.path.join(images, name))
  site = os.path.join(root, 'activations', 'vision_block_1')
  os.makedirs(site)
  per = GRID[0] * GRID[1]
  x = np.zeros((N_IMAGES * per, 8), np.float32)
  x[:, 7] = 0.01  # no row is all zero (the source normalises by the mean norm)
  for i in range(N_IMAGES):
    f, cell, code = planted(i)
    x[i * per + cell, f] = code
  np.save(os.path.join(site, 'shard_00000.npy'), x)
  cells = np.tile(np.arange(per), N_IMAGES)
  np.savez(os.path.join(site, 'index.npz'), image_id=np.repeat(np.arange(N_IMAGES), per),
           token_index=cells, row=cells // GRID[1], col=cells % GRID[1])
  _json(os.path.join(site, 'images.json'),
        {str(i): {'file': f, 'label': os.path.dirname(f)} for i, f in enumerate(FILES)})
  _json(os.path.join(site, 'manifest.json'),
        {'schema_version': 1, 'site': 'vision/block_1', 'images': images, 'split': 'train',
         'n_images': N_IMAGES, 'image_size': 32})
  return site, images


def identity_sae(d: int = 8) -> dict:
  eye = np.eye(d, dtype=np.float32)
  return {'params': {'w_enc': eye, 'b_enc': np.zeros(d, np.float32), 'w_dec': eye,
                     'b_dec': np.zeros(d, np.float32)}, 'arch': 'topk', 'k': 1}


def image_workdir(root: str) -> tuple[str, dict]:
  """A pipeline workdir trained (nominally) on the planted harvest; concepts {0, 1}, {2, 3}."""
  site, _ = harvest_folder(os.path.join(root, 'harvest'))
  wd = os.path.join(root, 'wd')
  hier = pipeline_workdir(wd, n1=8, n_concepts=2, d=8, data_path=site,
                          w_dec_nd=np.eye(8, dtype=np.float32), sae=identity_sae())
  hier['concepts'] = [{'id': 0, 'members': [0, 1], 'weights': [1.0, 1.0]},
                      {'id': 1, 'members': [2, 3], 'weights': [1.0, 1.0]}]
  hier['unassigned'] = [4, 5, 6, 7]
  _json(os.path.join(wd, 'export', 'hierarchy.json'), hier)
  return wd, hier
