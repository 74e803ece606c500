"""Harvest throughput of a port's vision tower (random weights), on whatever JAX device.

    python -m benchmarks.vision_throughput [--model qwen3-vl] [--batch 8] [--iters 3]
        [--dtypes float32,bfloat16] [--layers N]

--model qwen3-vl (default): the published Qwen3-VL-4B-Instruct vision config (24 blocks, hidden
1024), real images (scikit-learn's sample photos) preprocessed to the paper's 256 x 256, timed to
the paper's site (`vision/block_23`) through the tower's jitted forward. --model gemma-3: the
published Gemma-3-4B-IT SigLIP tower (896 px, patch 14, 27 layers, hidden 1152) to
`vision/block_26`; --model llava-1.5: LLaVA-1.5's CLIP ViT-L/14-336 (24 layers, hidden 1024) to
`vision/block_22` (feature layer -2). Those two go through the model's `vision_forward` with the
port's own preprocessor (`registry.preprocessor`), as the harvester calls them.

Reported: images/s after compilation, the median of `--iters` timed batches, plus the achieved
FLOP/s (matmul FLOPs counted analytically). --layers N builds the tower with N layers and times
the site at the same distance from the top (a cheaper run on slow machines); the row then also
carries a full-depth estimate scaled by FLOPs. Writes
benchmarks/results/vision_throughput_<device>.json (qwen3-vl) or
vision_throughput_<model>_<device>.json. Timings depend on the machine: compare only numbers from
one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from benchmarks import _results
from csae_jax.vlms import gemma3, llava, preprocess, qwen3_vl, registry
from csae_jax.vlms import qwen3_vl_vision as vision_lib

# Published image-processor settings (preprocessor_config.json of google/gemma-3-4b-it and
# llava-hf/llava-1.5-7b-hf), so the ports' own preprocessors run as on the real checkpoints.
_PREPROCESSOR_CONFIGS = {
    'gemma-3': {'do_rescale': True, 'rescale_factor': 1 / 255, 'do_normalize': True,
                'image_mean': [0.5] * 3, 'image_std': [0.5] * 3, 'do_pan_and_scan': False},
    'llava-1.5': {'do_rescale': True, 'rescale_factor': 1 / 255, 'do_normalize': True,
                  'image_mean': [0.48145466, 0.4578275, 0.40821073],
                  'image_std': [0.26862954, 0.26130258, 0.27577711]},
}
_CONFIGS = {'gemma-3': gemma3.GEMMA3_4B_CONFIG, 'llava-1.5': llava.LLAVA_15_7B_CONFIG}


def vision_flops_per_image(cfg, n_patches: int, n_blocks: int, n_tokens: int = 0) -> float:
  """Matmul FLOPs (2 per multiply-add) of patch embedding + the first n_blocks blocks, for any
  tower whose config has hidden_size, intermediate_size and patch_dim (Qwen3-VL, SigLIP, CLIP).
  n_tokens: tokens per block (0: n_patches; CLIP adds a CLS token); the blocks are q/k/v/o,
  a 2-matmul MLP and full attention (scores and weighted sum) over one image's tokens."""
  d, f, n = cfg.hidden_size, cfg.intermediate_size, n_tokens or n_patches
  per_block = 2 * n * (4 * d * d + 2 * d * f) + 2 * 2 * n * n * d
  return 2 * n_patches * cfg.patch_dim * d + n_blocks * per_block


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


def _sig(x: float, places: int) -> float:
  """round(x, places), but 3 significant digits below 1 (a shared 2-core CPU gives 0.03
  images/s, where round(x, 2) would keep one digit)."""
  return round(x, places) if abs(x) >= 1 else float(f'{x:.3g}')


def _row(dtype, batch, site, image_size, n_patches, n_params, t_pre, t_compile, times, flops,
         n_layers, full_flops):
  t = float(np.median(times))
  row = {'dtype': dtype, 'batch': batch, 'site': site, 'image_size': image_size,
         'patches_per_image': n_patches, 'vision_params': int(n_params),
         'compile_s': round(t_compile, 2), 'batch_s': round(t, 4),
         'images_per_s': _sig(batch / t, 2), 'preprocess_images_per_s': round(batch / t_pre, 1),
         'tflops': _sig(flops / t / 1e12, 3)}
  if n_layers:
    # A shallower tower: the same per-layer work, so at the achieved FLOP/s the full-depth tower
    # would run flops / full_flops as many images per second (an estimate, not a measurement).
    row.update(vision_layers=n_layers, full_depth_images_per_s_estimate=_sig(
        batch / t * flops / full_flops, 2))
  return row


def measure(dtype: str, batch: int, iters: int, site: str, image_size: int,
            n_layers: int = 0) -> dict:
  vision_config = dict(qwen3_vl.QWEN3_VL_4B_CONFIG['vision_config'])
  full_cfg = vision_lib.VisionConfig.from_hf(vision_config)
  if n_layers:
    vision_config['depth'] = n_layers
    vision_config['deepstack_visual_indexes'] = [
        i for i in full_cfg.deepstack_visual_indexes if i < n_layers]
  cfg = vision_lib.VisionConfig.from_hf(vision_config)
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
  n_patches = int(np.prod(grid[0]))
  n_blocks = int(site.rsplit('_', 1)[1]) + 1
  flops = vision_flops_per_image(cfg, n_patches, n_blocks) * batch
  full_flops = vision_flops_per_image(cfg, n_patches, n_blocks + full_cfg.depth - cfg.depth)
  return _row(dtype, batch, site, image_size, n_patches, n_params, t_pre, t_compile, times,
              flops, n_layers, full_flops * batch)


def _bench_config(model: str, n_layers: int) -> dict:
  """The published config.json with the vision tower at n_layers (0: as published) and the
  text model cut to one narrow layer and a small vocabulary: `vision_forward` at a vision site
  never runs it, and the published 4B / 7B decoder would take 15-27 GB of random float32 for
  nothing (the projector keeps its published shape)."""
  d = copy.deepcopy(_CONFIGS[model])
  if n_layers:
    d['vision_config']['num_hidden_layers'] = n_layers
  d['text_config'].update(num_hidden_layers=1, vocab_size=512, intermediate_size=256)
  return d


def measure_port(model: str, dtype: str, batch: int, iters: int, site: str,
                 n_layers: int = 0) -> dict:
  """Gemma-3 / LLaVA-1.5: the whole model class (random weights) called as the harvester does,
  `model.vision_forward(pixels, grid, sites=(site,))` on the preprocessor's numpy output."""
  config = _bench_config(model, n_layers)
  folder = tempfile.mkdtemp()
  for name, d in (('config.json', config),
                  ('preprocessor_config.json', _PREPROCESSOR_CONFIGS[model])):
    with open(os.path.join(folder, name), 'w') as f:
      json.dump(d, f)
  port = registry.resolve(model)[0]
  cls = gemma3.Gemma3 if model == 'gemma-3' else llava.Llava
  vlm = cls(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))
  vcfg = vlm.cfg.vision
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(vlm.vision_tower)))
  pre = registry.preprocessor(port, folder)
  t0 = time.perf_counter()
  pixels, grid = pre.images(_images(batch))
  t_pre = time.perf_counter() - t0
  call = lambda: vlm.vision_forward(pixels, grid, sites=(site,))  # noqa: E731
  t0 = time.perf_counter()
  jax.block_until_ready(call())
  t_compile = time.perf_counter() - t0
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t0)
  n_blocks = int(site.rsplit('_', 1)[1]) + 1
  n_tok = vcfg.n_patches + (model == 'llava-1.5')  # CLIP's CLS token
  flops = vision_flops_per_image(vcfg, vcfg.n_patches, n_blocks, n_tok) * batch
  full_depth = _CONFIGS[model]['vision_config']['num_hidden_layers']
  full_flops = vision_flops_per_image(vcfg, vcfg.n_patches,
                                      n_blocks + full_depth - vcfg.num_hidden_layers, n_tok)
  return _row(dtype, batch, site, vcfg.image_size, vcfg.n_patches, n_params, t_pre, t_compile,
              times, flops, n_layers, full_flops * batch)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--model', default='qwen3-vl', choices=('qwen3-vl', 'gemma-3', 'llava-1.5'))
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--iters', type=int, default=3)
  ap.add_argument('--dtypes', default='float32,bfloat16')
  ap.add_argument('--site', default='', help="default: the port's (registry.PORTS)")
  ap.add_argument('--image_size', type=int, default=256, help='qwen3-vl only (the others take '
                  'their checkpoint size)')
  ap.add_argument('--layers', type=int, default=0,
                  help='vision layers to build (0: the published depth)')
  ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results'))
  args = ap.parse_args()
  site = args.site or registry.PORTS[args.model].default_site
  if args.layers and not args.site:
    # Keep the default site's distance from the top (Gemma-3 / Qwen3-VL: the last layer, LLaVA:
    # the -2 feature layer), so a shallow run times the same kind of forward.
    depth = (qwen3_vl.QWEN3_VL_4B_CONFIG['vision_config']['depth'] if args.model == 'qwen3-vl'
             else _CONFIGS[args.model]['vision_config']['num_hidden_layers'])
    block = int(site.rsplit('_', 1)[1]) - depth + args.layers
    if block < 0:
      raise ValueError(f'--layers {args.layers} is too shallow for the default site {site}')
    site = f'vision/block_{block}'
  if args.model == 'qwen3-vl':
    rows = [measure(d, args.batch, args.iters, site, args.image_size, args.layers)
            for d in args.dtypes.split(',')]
    name = 'vision_throughput'  # the original file name, kept
  else:
    rows = [measure_port(args.model, d, args.batch, args.iters, site, args.layers)
            for d in args.dtypes.split(',')]
    name = f'vision_throughput_{args.model}'
  result = {**_results.device(), 'model': args.model, 'results': rows}
  _results.save(result, args.out, name)


if __name__ == '__main__':
  main()
