"""Image collections and the harvest's chunked store (resumable, atomic, refuses other settings)."""

import os

import numpy as np
import pytest
from PIL import Image

from csae_jax.sources import arrays, harvest_store, images


def _write_images(root, layout):
  for rel, size in layout.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(len(rel))
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


def test_image_folder_lists_sorted_with_labels(tmp_path):
  _write_images(tmp_path, {'cat/b.png': (5, 7), 'cat/a.jpg': (9, 4), 'dog/x.png': (3, 3),
                           'top.png': (4, 4)})
  (tmp_path / 'notes.txt').write_text('not an image')
  folder = images.ImageFolder(str(tmp_path))
  assert [folder.key(i) for i in range(len(folder))] == ['cat/a.jpg', 'cat/b.png', 'dog/x.png',
                                                         'top.png']
  assert [folder.label(i) for i in range(len(folder))] == ['cat', 'cat', 'dog', None]
  im = folder.load(1)
  assert im.mode == 'RGB' and im.size == (7, 5)


def test_image_folder_errors(tmp_path):
  with pytest.raises(ValueError, match='does not exist'):
    images.ImageFolder(str(tmp_path / 'missing'))
  (tmp_path / 'a.txt').write_text('x')
  with pytest.raises(ValueError, match='holds no images'):
    images.ImageFolder(str(tmp_path))
  (tmp_path / 'bad.png').write_bytes(b'not a png')
  with pytest.raises(ValueError, match='cannot read image'):
    images.ImageFolder(str(tmp_path)).load(0)


def test_tfds_needs_a_prepared_data_dir(tmp_path):
  with pytest.raises(ValueError, match='data_dir'):
    images.open_images('tfds:mnist', data_dir=str(tmp_path / 'nowhere'))


def _chunk(rng, n, d=4):
  acts = rng.standard_normal((n, d)).astype(np.float32)
  idx = {'image_id': np.arange(n) // 2, 'token_index': np.arange(n) % 2,
         'row': np.zeros(n), 'col': np.arange(n) % 2}
  return acts, idx


def test_store_chunks_resume_and_read_back(tmp_path):
  rng = np.random.default_rng(0)
  store = harvest_store.SiteStore(str(tmp_path), 'vision/block_1', {'model': 'm'},
                                  overwrite=False)
  assert store.dir.endswith('vision_block_1')
  a0, i0 = _chunk(rng, 6)
  store.write_chunk(0, a0, i0, 'float32', {'0': {'file': 'x.png', 'label': None}})
  assert store.done(0) and not store.done(1)
  # a second store with the same settings sees the finished chunk (resume)
  again = harvest_store.SiteStore(str(tmp_path), 'vision/block_1', {'model': 'm'},
                                  overwrite=False)
  assert again.done(0)
  a1, i1 = _chunk(rng, 4)
  again.write_chunk(1, a1, i1, 'float16', {'1': {'file': 'y.png', 'label': 'cat'}})
  n = again.finalize(2)
  assert n == 10
  src = arrays.ArraySource(again.dir, batch_size=2, seed=0, holdout_rows=2)
  assert src.n_rows == 10 and src.d == 4
  np.testing.assert_allclose(src.read_rows(np.arange(6)), a0)
  np.testing.assert_allclose(src.read_rows(np.arange(6, 10)), a1, atol=1e-3)
  with np.load(os.path.join(again.dir, 'index.npz')) as z:
    np.testing.assert_array_equal(z['image_id'], np.r_[i0['image_id'], i1['image_id']])


def test_store_refuses_other_settings(tmp_path):
  harvest_store.SiteStore(str(tmp_path), 's', {'model': 'a'}, overwrite=False).write_chunk(
      0, *_chunk(np.random.default_rng(0), 2), 'float32', {})
  with pytest.raises(ValueError, match=r"differs in \['model'\]"):
    harvest_store.SiteStore(str(tmp_path), 's', {'model': 'b'}, overwrite=False)
  fresh = harvest_store.SiteStore(str(tmp_path), 's', {'model': 'b'}, overwrite=True)
  assert not fresh.done(0)


def test_tfds_dataset_prepared_on_disk(tmp_path):
  """A TFDS dataset already prepared under data_dir (array_record) is read without download or
  TensorFlow; labels come back as their class names."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class CsaeTinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Tensor(shape=(12, 10, 3), dtype=np.uint8),
          'label': tfds.features.ClassLabel(names=['cat', 'dog'])}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i in range(5):
        yield i, {'image': np.full((12, 10, 3), 10 * i, np.uint8), 'label': i % 2}

  CsaeTinyImages(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  ds = images.open_images('tfds:csae_tiny_images', data_dir=str(tmp_path))
  assert len(ds) == 5
  labels = sorted(ds.label(i) for i in range(5))
  assert labels == ['cat', 'cat', 'cat', 'dog', 'dog']
  im = ds.load(0)
  assert im.size == (10, 12) and im.mode == 'RGB'
  assert ds.key(3) == 'csae_tiny_images/train[3]'
  with pytest.raises(ValueError, match="split 'test'"):
    images.open_images('tfds:csae_tiny_images', data_dir=str(tmp_path), split='test')
