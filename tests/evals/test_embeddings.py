"""HMS reference embeddings from a vision port run over a harvest's own images: rows line up with
the harvest's image ids, the result is cached, mistakes are named, and a comparison on harvested
activations scores HMS with them."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from csae_jax import config as config_lib
from csae_jax import compare, modes, stages
from csae_jax.compare import score
from csae_jax.evals import embeddings
from csae_jax.sources import harvest
from csae_jax.vlms import registry
from experiments.configs import compare as compare_config
from experiments.configs import harvest as harvest_config
from tests.vlms import conftest as vlm

N_IMAGES = 7


@pytest.fixture(scope='module')
def harvested(tmp_path_factory):
  """A tiny Qwen3-VL, 7 random images in an ImageFolder, and a harvest of two sites."""
  root = tmp_path_factory.mktemp('embeddings')
  folder = str(root / 'model')
  vlm.make_tiny_qwen3_vl(folder)
  image_dir = root / 'images'
  rng = np.random.default_rng(0)
  for i in range(N_IMAGES):
    name = image_dir / ('ab'[i % 2]) / f'{i}.png'  # two labels: ids interleave the folders
    name.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (20 + 5 * i, 40, 3), dtype=np.uint8)).save(name)
  c = harvest_config.get_config()
  c.update_from_flattened_dict({'model_path': folder, 'images': str(image_dir),
                                'image_size': 64, 'batch_size': 4, 'chunk_images': 4,
                                'sites': 'vision/block_2,vision/merger'})
  wd = str(root / 'harvest')
  harvest.run(c, wd)
  return folder, str(image_dir), os.path.join(wd, 'activations')


def _site_means(site_dir: str) -> np.ndarray:
  """[n_images, d]: mean over each image's harvested rows of a site."""
  acts = np.concatenate([np.load(os.path.join(site_dir, f)) for f in
                         sorted(os.listdir(site_dir)) if f.endswith('.npy') and 'shard' in f])
  with np.load(os.path.join(site_dir, 'index.npz')) as z:
    image_id = z['image_id']
  return np.stack([acts[image_id == i].mean(0) for i in range(N_IMAGES)])


def test_rows_are_the_harvested_images_and_the_cache_is_reused(harvested, tmp_path,
                                                                 monkeypatch):
  folder, _, acts = harvested
  cache = str(tmp_path / 'cache')
  # from the block_2 folder (the SAE's data.path), embedded at the merger, in batches of 3
  # (a padded last batch): equal to the merger rows harvested for the same image ids
  emb_ie = embeddings.port_embeddings(os.path.join(acts, 'vision_block_2'), 'qwen3-vl', folder,
                                      batch_size=3, cache=cache)
  assert emb_ie.shape == (N_IMAGES, 32) and emb_ie.dtype == np.float32
  np.testing.assert_allclose(emb_ie, _site_means(os.path.join(acts, 'vision_merger')), atol=1e-5)
  assert np.abs(emb_ie[1:] - emb_ie[:-1]).max(1).min() > 1e-2  # a shifted id would show
  (cached,) = os.listdir(cache)
  assert cached.startswith('qwen3-vl_vision_merger_mean_') and cached.endswith('.npy')

  def no_model(*a, **k):
    raise AssertionError('the port was loaded although the embeddings are cached')
  monkeypatch.setattr(registry, 'load', no_model)
  again = embeddings.port_fn(acts, 'qwen3-vl', folder, 'vision/merger', cache=cache)
  np.testing.assert_array_equal(again([4, 0]), emb_ie[[4, 0]])


def test_mistakes_are_named(harvested, tmp_path):
  folder, image_dir, acts = harvested
  site = os.path.join(acts, 'vision_block_2')
  with pytest.raises(ValueError, match='compare.embedding_model: unknown model'):
    embeddings.port_embeddings(site, 'dino-9000', folder)
  with pytest.raises(ValueError, match="compare.embedding_site 'vision/block_9'"):
    embeddings.port_embeddings(site, 'qwen3-vl', folder, site='vision/block_9')
  with pytest.raises(ValueError, match='no CLS token'):
    embeddings.port_embeddings(site, 'qwen3-vl', folder, pool='cls')
  with pytest.raises(ValueError, match='not a harvest'):
    embeddings.port_embeddings(str(tmp_path), 'qwen3-vl', folder)
  # a site folder without images.json, then one whose images changed since the harvest
  fake = tmp_path / 'fake'
  fake.mkdir()
  shutil.copy(os.path.join(site, 'manifest.json'), fake)
  with pytest.raises(ValueError, match='recorded harvest config'):
    embeddings.port_embeddings(str(fake), 'qwen3-vl', folder)
  shutil.copy(os.path.join(site, 'images.json'), fake)
  fewer = tmp_path / 'fewer'
  shutil.copytree(image_dir, fewer)
  os.remove(fewer / 'a' / '0.png')
  manifest = json.load(open(fake / 'manifest.json'))
  json.dump({**manifest, 'images': str(fewer)}, open(fake / 'manifest.json', 'w'))
  with pytest.raises(ValueError, match=f'now holds {N_IMAGES - 1} images'):
    embeddings.port_embeddings(str(fake), 'qwen3-vl', folder)
  # the config: one source of embeddings, a model needs its folder
  base = {'compare.embedding_model': 'qwen3-vl', 'data.path': site}
  with pytest.raises(ValueError, match='keep one'):
    _config(**base, **{'compare.embeddings': 'x.npy', 'compare.embedding_model_path': folder})
  with pytest.raises(ValueError, match='embedding_model_path=DIR'):
    _config(**base)
  with pytest.raises(ValueError, match='compare.embedding_model: unknown model'):
    _config(**{**base, 'compare.embedding_model': 'dino-9000'})
  with pytest.raises(ValueError, match='data.path'):
    _config(**{'compare.embedding_model': 'qwen3-vl', 'compare.embedding_model_path': folder})


def _config(**over):
  c = compare_config.get_config('small')
  c.update_from_flattened_dict(over)
  return config_lib.from_config_dict(c)


def test_compare_scores_hms_with_the_port_embeddings(harvested, tmp_path):
  folder, _, acts = harvested
  c = compare_config.get_config('small')
  c.update_from_flattened_dict({
      'data.path': os.path.join(acts, 'vision_block_2'), 'data.holdout_rows': 128,
      'data.eval_rows': 128, 'compare.methods': 'clustering', 'compare.n_perm': 10,
      'compare.embedding_model': 'qwen3-vl', 'compare.embedding_model_path': folder,
      'level1.n_latents': 32, 'level1.k': 4, 'level2.n_latents': 4, 'level2.steps': 20,
      'train.steps': 20, 'train.batch_size': 64, 'train.warmup_steps': 2,
      'train.checkpoint_every': 20})
  wd = str(tmp_path / 'compare')
  out = modes.run(c, wd)
  kmeans = out['compare/results']['kmeans']
  assert np.isfinite(kmeans['hms/mean']) and np.isfinite(kmeans['hms/null_mean'])
  assert len(os.listdir(os.path.join(wd, 'embeddings'))) == 1
  # from Python, any callable of image ids gives the embeddings; never with a second source
  cfg = config_lib.from_config_dict(c)
  src = stages.make_source(cfg)
  es = compare.eval_set(cfg, src, embed_fn=lambda ids: np.ones((len(ids), 3)))
  assert es.emb_ie.shape == (es.n_images, 3)
  with pytest.raises(ValueError, match='given twice'):
    score.harvested_eval_set(src, 16, 'x.npy', embed_fn=embeddings.array_fn(es.emb_ie))
