"""Reference embeddings for HMS: one vector per image of a harvest, from any source.

An `EmbedFn` maps image ids of a harvest (the `image_id` of its index.npz) to [len(ids), e]
float32 embeddings. Two sources are built in:
- `from_array`: a provided [n_images, e] .npy (row i = image id i), e.g. DINO CLS vectors;
- `port_embeddings`: a registered vision port (csae_jax.vlms.registry) run over the SAME images
  the harvest read (its recorded images spec, split, data_dir and image size; image loading,
  preprocessing and the forward are the harvest's own code, `harvest.site_batches`), up to a
  site, its tokens pooled per image. Cached as an .npy, so a second comparison reuses it.
Any other callable with the `EmbedFn` signature can be passed to `compare.eval_set`.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable

import numpy as np
from absl import logging

from csae_jax import checkpoint as ckpt_lib
from csae_jax import config as config_lib
from csae_jax.sources import harvest as harvest_lib
from csae_jax.sources import harvest_store, images as images_lib
from csae_jax.vlms import preprocess, registry

EmbedFn = Callable[[list[int]], np.ndarray]
POOLS = ('mean', 'cls')


def from_array(path: str, n_images: int) -> np.ndarray:
  """[n_images, e] float32: the first n_images rows of a [>= n_images, e] .npy."""
  emb_ie = np.load(path).astype(np.float32)
  if emb_ie.ndim != 2 or len(emb_ie) < n_images:
    raise ValueError(f'compare.embeddings {path!r} has shape {emb_ie.shape}; it needs one row '
                     f'per image id, at least [{n_images}, e]')
  return emb_ie[:n_images]


def array_fn(emb_ie: np.ndarray) -> EmbedFn:
  """An in-memory [n_images, e] array as an EmbedFn."""
  return lambda ids: np.asarray(emb_ie, np.float32)[np.asarray(ids, np.int64)]


def call(embed_fn: EmbedFn, n_images: int) -> np.ndarray:
  """embed_fn on image ids 0..n_images-1, checked: [n_images, e] finite float32."""
  emb_ie = np.asarray(embed_fn(list(range(n_images))), np.float32)
  if emb_ie.ndim != 2 or len(emb_ie) != n_images:
    raise ValueError(f'the embedding function returned shape {emb_ie.shape} for {n_images} '
                     f'image ids; it must return [len(ids), e], one row per id in order')
  if not np.all(np.isfinite(emb_ie)):
    raise ValueError('the embedding function returned non-finite values (NaN / inf)')
  return emb_ie


# ---- the harvest a folder came from --------------------------------------------------------------

def _site_dir(path: str) -> str:
  """A harvested site folder (has manifest.json) from a site folder, activations/ or the
  harvest's workdir."""
  path = os.path.abspath(path)
  if os.path.isfile(path):
    path = os.path.dirname(path)
  if os.path.exists(os.path.join(path, 'manifest.json')):
    return path
  for root in (path, os.path.join(path, 'activations')):
    summary = os.path.join(root, 'harvest.json')
    if os.path.exists(summary):
      for d in ckpt_lib.read_json(summary).get('dirs', {}).values():
        if os.path.exists(os.path.join(d, 'manifest.json')):
          return d
  raise ValueError(f'{path!r} is not a harvest (no manifest.json, nor activations/harvest.json): '
                   f'reference embeddings from a model (compare.embedding_model) re-read the '
                   f'images a harvest recorded; set data.path to a folder written by '
                   f'experiments/configs/harvest.py, or pass compare.embeddings=EMB.npy')


def recorded_harvest(path: str) -> dict:
  """What the harvest under `path` read: images, data_dir, split, image_size, n_images, files
  (image key per id, from images.json)."""
  site_dir = _site_dir(path)
  manifest = ckpt_lib.read_json(os.path.join(site_dir, 'manifest.json'))
  images_path = os.path.join(site_dir, 'images.json')
  missing = [k for k in ('images', 'split', 'image_size', 'n_images') if k not in manifest]
  if missing or not os.path.exists(images_path):
    raise ValueError(f'{site_dir} lacks its recorded harvest config ({missing or "images.json"}'
                     f' missing; an unfinished or older harvest?); re-run the harvest command '
                     f'to finish it, or pass compare.embeddings=EMB.npy')
  images = ckpt_lib.read_json(images_path)
  n = int(manifest['n_images'])
  if sorted(int(k) for k in images) != list(range(n)):
    raise ValueError(f'{images_path} lists {len(images)} images but the harvest recorded {n}; '
                     f're-run the harvest command to finish it')
  # data_dir (TFDS) is not in the site manifest; harvest.json holds the last run's whole config
  data_dir = ''
  summary = os.path.join(os.path.dirname(site_dir), 'harvest.json')
  if os.path.exists(summary):
    cfg = ckpt_lib.read_json(summary).get('config', {})
    if cfg.get('images') == manifest['images']:
      data_dir = cfg.get('data_dir', '')
  if manifest['images'].startswith('tfds:') and not data_dir:
    raise ValueError(f'{site_dir}: the harvest read {manifest["images"]!r} but its data_dir is '
                     f'not recorded ({summary} missing or from another harvest); re-run the '
                     f'harvest command so harvest.json records it')
  return {'dir': site_dir, 'images': manifest['images'], 'split': manifest['split'],
          'data_dir': data_dir, 'image_size': int(manifest['image_size']), 'n_images': n,
          'files': [images[str(i)]['file'] for i in range(n)]}


def _open_same_images(rec: dict):
  """The harvest's image collection, checked to give the same image for every id."""
  imgs = images_lib.open_images(rec['images'], data_dir=rec['data_dir'], split=rec['split'])
  n = rec['n_images']
  if len(imgs) < n:
    raise ValueError(f'{rec["images"]!r} now holds {len(imgs)} images but the harvest in '
                     f'{rec["dir"]} read {n}; restore the images or re-harvest')
  changed = [i for i in range(n) if imgs.key(i) != rec['files'][i]]
  if changed:
    i = changed[0]
    raise ValueError(f'image id {i} of {rec["dir"]} was {rec["files"][i]!r} but {rec["images"]!r}'
                     f' now gives {imgs.key(i)!r} ({len(changed)} ids differ): the images changed '
                     f'since the harvest; restore them or re-harvest')
  return imgs


# ---- a vision port's embeddings ------------------------------------------------------------------

def port_embeddings(harvest_dir: str, model: str, model_path: str, site: str = '',
                    pool: str = 'mean', *, batch_size: int = 8, dtype: str = 'float32',
                    image_size: int = 0, workers: int = 0, cache: str = '') -> np.ndarray:
  """[n_images, e] float32: row i is image id i of the harvest in `harvest_dir` (a site folder,
  its activations/ or the harvest workdir) through `model`'s port up to `site` ('' = the port's
  embedding site), its tokens pooled by `pool` ('mean', or 'cls' where the port has a CLS
  token). image_size 0 = the harvest's. cache: a folder; the result is kept there as an .npy
  keyed by model, site, pool and what made it, and reused."""
  try:
    port, _ = registry.resolve(model)
  except ValueError as e:
    raise ValueError(f'compare.embedding_model: {e}') from e
  site = site or port.embedding_site
  if not site:
    raise ValueError(f'port {port.name!r} names no embedding site; set compare.embedding_site')
  if pool not in POOLS:
    raise ValueError(f'compare.embedding_pool is {pool!r}; choose one of {list(POOLS)}')
  if pool == 'cls' and not port.cls_token:
    raise ValueError(f'compare.embedding_pool=cls: port {port.name!r} has no CLS token; set '
                     f'--config.compare.embedding_pool=mean')
  rec = recorded_harvest(harvest_dir)
  size = image_size or rec['image_size']
  key = config_lib.stable_hash({'model_path': os.path.abspath(model_path), 'dtype': dtype,
                                'image_size': size, **{k: rec[k] for k in (
                                    'images', 'split', 'data_dir', 'n_images', 'files')}})
  path = ''
  if cache:
    name = f'{model.strip().lower()}_{harvest_store.site_dirname(site)}_{pool}_{key}.npy'
    path = os.path.join(cache, name)
    if os.path.exists(path):
      logging.info('reference embeddings from the cache %s', path)
      return np.load(path)
  emb_ie = _run_port(port, model, model_path, site, pool, rec, size, batch_size, dtype, workers)
  if path:
    os.makedirs(cache, exist_ok=True)
    tmp = f'{path}.tmp.{os.getpid()}'
    with open(tmp, 'wb') as f:  # a file handle stops np.save from appending ".npy"
      np.save(f, emb_ie)
    os.replace(tmp, path)
  return emb_ie


def _run_port(port, model, model_path, site, pool, rec, size, batch_size, dtype, workers
              ) -> np.ndarray:
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  cfg = config_lib.HarvestConfig(
      model=model, model_path=model_path, images=rec['images'], data_dir=rec['data_dir'],
      split=rec['split'], sites=site, image_size=size, batch_size=batch_size,
      chunk_images=batch_size, workers=workers, max_images=rec['n_images'], dtype=dtype)
  imgs = _open_same_images(rec)
  pre = registry.preprocessor(port, model_path, size)
  net = registry.load(port, model_path, dtype=dtype)
  if site not in net.site_names():
    kinds = list(dict.fromkeys(re.sub(r'_\d+$', '_{i}', n) for n in net.site_names()))
    raise ValueError(f'compare.embedding_site {site!r} is not a site of {model!r} (its sites: '
                     f'{", ".join(kinds)}); set --config.compare.embedding_site, or leave it '
                     f'empty for {port.embedding_site!r}')
  harvester = harvest_lib.Harvester(net, pre, [site], prompt=preprocess.DEFAULT_PROMPT,
                                    all_tokens=False)
  prep = harvest_lib.Preprocessing(cfg, imgs, pre)
  n, parts = rec['n_images'], []
  bar = tqdm(total=n, desc=f'embeddings {model} {site} ({pool})', unit='img', file=sys.stderr,
             dynamic_ncols=True, mininterval=1.0)
  try:
    for ids, _, out in harvest_lib.site_batches(prep, harvester, list(range(n)), batch_size,
                                                'float32'):
      acts_td, _ = out[site]
      acts_bpd = acts_td.reshape(len(ids), -1, acts_td.shape[-1])  # each image's rows contiguous
      parts.append(acts_bpd[:, 0] if pool == 'cls' else acts_bpd.mean(1, dtype=np.float64))
      bar.update(len(ids))
  finally:
    bar.close()
    prep.close()
  return np.concatenate(parts).astype(np.float32)


def port_fn(harvest_dir: str, model: str, model_path: str, site: str = '', pool: str = 'mean',
            **kw) -> EmbedFn:
  """`port_embeddings` as an EmbedFn, computed (or read from the cache) on its first call."""
  memo: list[np.ndarray] = []

  def fn(ids: list[int]) -> np.ndarray:
    if not memo:
      memo.append(port_embeddings(harvest_dir, model, model_path, site, pool, **kw))
    ids = np.asarray(ids, np.int64)
    if len(ids) and ids.max() >= len(memo[0]):
      raise ValueError(f'image id {ids.max()} is beyond the {len(memo[0])} images of the harvest '
                       f'in {harvest_dir}; the activations and the harvest disagree')
    return memo[0][ids]
  return fn


def from_config(c: config_lib.CompareConfig, data_path: str, cache: str = '') -> EmbedFn | None:
  """The EmbedFn `compare.embedding_*` describe (None when compare.embedding_model is empty)."""
  if not c.embedding_model:
    return None
  return port_fn(data_path, c.embedding_model, c.embedding_model_path, c.embedding_site,
                 c.embedding_pool, cache=cache)
