"""Harvest throughput of the Qwen3-VL-4B vision tower (random weights), on whatever JAX device.

    python -m benchmarks.vision_throughput [--batch 8] [--dtypes float32,bfloat16] [--iters 3]

Builds the published Qwen3-VL-4B-Instruct vision config (24 blocks, hidden 1024) with random
weights, preprocesses real images (scikit-learn's sample photos) to the paper's 256 x 256, and
times the jitted forward up to the paper's site (`vision/block_23`) the way the harvester calls
it: images/s after compilation, the median of `--iters` timed batches, plus the achieved FLOP/s
(matmul FLOPs counted analytically). Writes benchmarks/results/vision_throughput_<device>.json.
Timings depend on the machine: compare only numbers from one run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from benchmarks import _results
from csae_jax.vlms import preprocess, qwen3_vl
from csae_jax.vlms import qwen3_vl_vision as vision_lib


def vision_flops_per_image(cfg: vision_lib.VisionConfig, n_patches: int, last_block: int) -> float:
  """Matmul FLOPs (2 per multiply-add) of patch embedding + blocks [0, last_block]."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  per_block = 2 * n_patches * (4 * d * d + 2 * d * f) + 2 * 2 * n_patches * n_patches * d
  return 2 * n_patches * cfg.patch_dim * d + (last_block + 1) * per_block


def _images(n: int) -> list[Image.Image]:
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  photos = [Image.fromarray(a) for a in load_sample_images().images]
  return [photos[i % len(photos)] for i in range(n)]


def _preprocessor(cfg: vision_lib.VisionConfig, image_size: int) -> preprocess.Qwen3VLPreprocessor:
  from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as ip  # slow import
  folder = tempfile.mkdtemp()
  ip.Qwen2VLImageProcessorPil(patch_size=cfg.patch_size, merge_size=cfg.spatial_merge_size,
                              temporal_patch_size=cfg.temporal_patch_size,
                              image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
  return preprocess.Qwen3VLPreprocessor(folder, image_size=image_size)


def measure(dtype: str, batch: int, iters: int, site: str, image_size: int) -> dict:
  cfg = vision_lib.VisionConfig.from_hf(qwen3_vl.QWEN3_VL_4B_CONFIG['vision_config'])
  model = vision_lib.Qwen3VLVision(cfg, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype),
                                   rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  n_params = sum(x.size for x in jax.tree.leaves(state))
  pre = _preprocessor(cfg, image_size)
  t0 = time.perf_counter()
  pixels, grid = pre.images(_images(batch))
  t_pre = time.perf_counter() - t0
  pixels = jnp.asarray(pixels)
  kw = dict(grid_thw=vision_lib.static_grid(grid), sites=(site,))
  t0 = time.perf_counter()
  jax.block_until_ready(vision_lib.forward(graphdef, state, pixels, **kw))
  t_compile = time.perf_counter() - t0
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(vision_lib.forward(graphdef, state, pixels, **kw))
    times.append(time.perf_counter() - t0)
  t = float(np.median(times))
  n_patches = int(np.prod(grid[0]))
  flops = vision_flops_per_image(cfg, n_patches, int(site.rsplit('_', 1)[1])) * batch
  return {'dtype': dtype, 'batch': batch, 'site': site, 'image_size': image_size,
          'patches_per_image': n_patches, 'vision_params': int(n_params),
          'compile_s': round(t_compile, 2), 'batch_s': round(t, 4),
          'images_per_s': round(batch / t, 2), 'preprocess_images_per_s': round(batch / t_pre, 1),
          'tflops': round(flops / t / 1e12, 3)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--iters', type=int, default=3)
  ap.add_argument('--dtypes', default='float32,bfloat16')
  ap.add_argument('--site', default='vision/block_23')
  ap.add_argument('--image_size', type=int, default=256)
  ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results'))
  args = ap.parse_args()
  rows = [measure(d, args.batch, args.iters, args.site, args.image_size)
          for d in args.dtypes.split(',')]
  result = {**_results.device(), 'results': rows}
  _results.save(result, args.out, 'vision_throughput')


if __name__ == '__main__':
  main()
