"""Qwen3-VL preprocessing without torch: sizes, patch order and the prompt's image placeholders."""

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as ip

from csae_jax.vlms import preprocess


@pytest.fixture(name='folder')
def _folder(tmp_path):
  ip.Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2).save_pretrained(
      tmp_path)
  return str(tmp_path)


def test_patch_order_matches_the_processor(folder):
  """Paint each 16x16 patch with its (row, col); the processor's rows must follow
  patch_grid_positions."""
  pre = preprocess.Qwen3VLPreprocessor(folder, image_size=64)
  arr = np.zeros((64, 64, 3), np.uint8)
  r, c = np.meshgrid(np.arange(64) // 16, np.arange(64) // 16, indexing='ij')
  arr[..., 0], arr[..., 1] = r * 40, c * 40
  pv, grid = pre.images([Image.fromarray(arr)])
  assert grid.tolist() == [[1, 4, 4]] and pv.shape == (16, 3 * 2 * 16 * 16)
  x = pv.reshape(16, 3, 2, 16, 16)
  mean, std = np.array(pre.processor.image_mean), np.array(pre.processor.image_std)
  got_r = np.round((x[:, 0, 0, 8, 8] * std[0] + mean[0]) * 255 / 40).astype(int)
  got_c = np.round((x[:, 1, 0, 8, 8] * std[1] + mean[1]) * 255 / 40).astype(int)
  want_r, want_c = preprocess.patch_grid_positions(4, 4, 2)
  np.testing.assert_array_equal(got_r, want_r)
  np.testing.assert_array_equal(got_c, want_c)
  mr, mc = preprocess.merged_grid_positions(4, 4, 2)
  np.testing.assert_array_equal(mr * 2, want_r[::4])
  np.testing.assert_array_equal(mc * 2, want_c[::4])


def test_every_image_is_resized_to_image_size(folder):
  pre = preprocess.Qwen3VLPreprocessor(folder, image_size=96)
  ims = [Image.new('RGB', (50, 130)), Image.new('RGB', (300, 97))]
  pv, grid = pre.images(ims)
  assert grid.tolist() == [[1, 6, 6], [1, 6, 6]] and len(pv) == 72


def test_bad_sizes_and_folders(folder, tmp_path):
  with pytest.raises(ValueError, match='multiple of patch_size x merge_size = 32'):
    preprocess.Qwen3VLPreprocessor(folder, image_size=100)
  with pytest.raises(ValueError, match='preprocessor_config.json'):
    preprocess.Qwen3VLPreprocessor(str(tmp_path / 'empty'))


def test_vectorised_patchify_equals_the_processor(folder):
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  pre = preprocess.Qwen3VLPreprocessor(folder, image_size=64)
  ims = [Image.fromarray(a) for a in load_sample_images().images] + [Image.new('RGB', (5, 9))]
  want_pv, want_grid = pre.images(ims)
  got_pv, got_grid = pre.patchify(np.stack([pre.resize(im) for im in ims]))
  np.testing.assert_array_equal(got_grid, want_grid)
  np.testing.assert_allclose(got_pv, want_pv, atol=1e-6)
