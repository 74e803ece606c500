"""Level-1 train-step throughput at the paper's scale, on whatever JAX device is present.

    python -m benchmarks.train_step_throughput [--d 1024 --n 20000 --k 6 --batch 4096]

The jitted, donated step of the pipeline (BatchTopK + AuxK, Adam, decoder renormalisation),
on device-resident random activations (the input pipeline is not timed), for dense vs sparse
decoding and float32 vs bfloat16 matmuls. Reports ms/step, tokens/s, the ratio of each
setting to dense float32 measured in the same process, and FLOP utilisation: the useful FLOPs of
a k-sparse step (the encoder GEMM 2 B d n plus 8 d per selected pair) per second over the
device's bf16 matmul peak (f32 accumulation) measured here at the encoder's shape (the issue's
GPU goal: >= 50%). Writes benchmarks/results/train_step_<device>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _results, train_throughput
from csae_jax import config as config_lib
from csae_jax import sharding
from csae_jax.saes import common, objective
from csae_jax.train import optim, state as state_lib, step as step_lib


def measure(d: int, n: int, k: int, batch: int, dtype: str, sparse: bool, iters: int,
            arch: str = 'batch_topk', dead_tokens: int | None = None, warm: int = 3,
            dead_frac: float = 0.0) -> dict:
  """ms/step of the jitted level-1 step. dead_tokens=None: no latent is dead (AuxK skipped);
  0: every latent counts as dead, so AuxK runs every step. dead_frac > 0: the first dead_frac n
  latents are held dead (their counters are set before every step; the rest never are)."""
  if dead_frac > 0:
    dead_tokens = state_lib.SINCE_FIRED_MAX
  hyper = objective.SAEHyper(arch=arch, k=k, k_aux=d // 2, auxk_weight=1 / 32,
                             dead_tokens=10 * batch if dead_tokens is None else dead_tokens,
                             k_anneal_steps=0, d=d, compute_dtype=dtype, sparse_decode=sparse)
  spec = step_lib.LevelSpec(hyper, 0.999, 10)
  mesh = sharding.make_mesh(config_lib.MeshConfig())
  opt = optim.make_optimizer(1e-4, 10_000, 100, 0.8, 1.0)
  params = common.init_params(jax.random.key(0), d, n)
  params['b_dec'] = jnp.zeros(d)
  st = state_lib.create(mesh, {'level1': params}, opt)
  fn, _ = step_lib.make_step({'level1': spec}, opt)
  bsh = sharding.named(mesh, 'batch', 'embed')
  jstep = step_lib.jit_step(fn, state_lib.shardings_of(st), bsh)
  x = jax.device_put(jax.random.normal(jax.random.key(1), (batch, d)) / np.sqrt(d), bsh)
  t0 = time.perf_counter()
  jstep = jstep.lower(st, x).compile()  # compile time alone, then the compiled step is timed
  compile_s = time.perf_counter() - t0
  mem = jstep.memory_analysis()
  hold = lambda s: s  # pylint: disable=unnecessary-lambda-assignment
  if dead_frac > 0:
    since_n = jax.device_put(jnp.where(jnp.arange(n) < round(dead_frac * n),
                                       state_lib.SINCE_FIRED_MAX, 0).astype(jnp.int32),
                             st.since_fired['level1'].sharding)
    hold = lambda s: s.replace(since_fired={'level1': since_n + 0})  # pylint: disable=unnecessary-lambda-assignment
  for _ in range(warm):
    st, m = jstep(hold(st), x)
  jax.block_until_ready(m['loss'])
  step_s = []
  for _ in range(iters):  # the median step (as the peers'): robust to one slow step
    t0 = time.perf_counter()
    st, m = jstep(hold(st), x)
    jax.block_until_ready(m['loss'])
    step_s.append(time.perf_counter() - t0)
  t = statistics.median(step_s)
  return {'dtype': dtype, 'sparse_decode': sparse, 'ms_per_step': round(1e3 * t, 3),
          'steps_s': [round(v, 4) for v in step_s],
          'tokens_per_s': round(batch / t), 'compile_s': round(compile_s, 2),
          'temp_bytes': None if mem is None else int(mem.temp_size_in_bytes),
          'loss': float(m['loss'])}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--d', type=int, default=1024)
  ap.add_argument('--n', type=int, default=20000)
  ap.add_argument('--k', type=int, default=6)
  ap.add_argument('--batch', type=int, default=4096)
  ap.add_argument('--iters', type=int, default=20)
  ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results'))
  args = ap.parse_args()
  rows = [measure(args.d, args.n, args.k, args.batch, dt, sp, args.iters)
          for dt in ('float32', 'bfloat16') for sp in (False, True)]
  base = rows[0]['ms_per_step']
  peak = train_throughput.matmul_peak(args.d, args.n, args.batch, reps=5, dtype='bfloat16')
  useful = train_throughput.useful_flops(args.d, args.n, args.k, args.batch, 'alive')
  for r in rows:
    r['time_vs_dense_f32'] = round(r['ms_per_step'] / base, 3)
    r['util_vs_bf16_peak'] = round(useful / (r['ms_per_step'] / 1e3) / (peak * 1e9), 4)
  result = {**_results.device(), 'd': args.d, 'n': args.n,
            'k': args.k, 'batch': args.batch, 'bf16_matmul_gflops': round(peak, 1),
            'useful_gflop_per_step': useful / 1e9, 'results': rows}
  _results.save(result, args.out, 'train_step')


if __name__ == '__main__':
  main()
