"""Dense vs sparse (gather) decoding for k-sparse SAEs: forward + backward of the reconstruction
loss, timed in one process on whatever backend JAX sees. Prints the ratio; the train step uses
dense decoding unless this shows gather winning on the target hardware.

    python -m benchmarks.sparse_decode [--batch 1024 --n 4096 --d 256 --k 32]
"""

import argparse
import time

import jax
import jax.numpy as jnp

from csae_jax.saes import batch_topk, topk


def dense_loss(w_dec, acts, x, k):
  codes = topk.topk_codes(acts, k)
  return jnp.mean(jnp.sum((codes @ w_dec - x) ** 2, -1))


def sparse_loss(w_dec, acts, x, k):
  vals, idx = jax.lax.top_k(acts, k)                      # [B, k]
  x_hat = jnp.einsum('bk,bkd->bd', vals, w_dec[idx])      # gathers B * k rows: O(B k d)
  return jnp.mean(jnp.sum((x_hat - x) ** 2, -1))


def dense_batch_loss(w_dec, acts, x, k):
  codes = batch_topk.train_codes(acts, k)
  return jnp.mean(jnp.sum((codes @ w_dec - x) ** 2, -1))


def sparse_batch_loss(w_dec, acts, x, k):
  b, n = acts.shape
  vals, flat = jax.lax.top_k(acts.reshape(-1), k * b)     # the k*B selected pairs
  x_hat = jax.ops.segment_sum(vals[:, None] * w_dec[flat % n], flat // n, num_segments=b)
  return jnp.mean(jnp.sum((x_hat - x) ** 2, -1))


def bench(fn, *args, reps=20):
  g = jax.jit(jax.grad(fn, argnums=(0, 1)), static_argnums=(3,))
  jax.block_until_ready(g(*args))
  t = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(g(*args))
  return (time.perf_counter() - t) / reps


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--batch', type=int, default=1024)
  ap.add_argument('--n', type=int, default=4096)
  ap.add_argument('--d', type=int, default=256)
  ap.add_argument('--k', type=int, default=32)
  a = ap.parse_args()
  keys = jax.random.split(jax.random.key(0), 3)
  w_dec = jax.random.normal(keys[0], (a.n, a.d))
  acts = jax.nn.relu(jax.random.normal(keys[1], (a.batch, a.n)))
  x = jax.random.normal(keys[2], (a.batch, a.d))
  t_dense = bench(dense_loss, w_dec, acts, x, a.k)
  t_sparse = bench(sparse_loss, w_dec, acts, x, a.k)
  b_dense = bench(dense_batch_loss, w_dec, acts, x, a.k)
  b_sparse = bench(sparse_batch_loss, w_dec, acts, x, a.k)
  print(f'{jax.devices()[0].platform}: B={a.batch} n={a.n} d={a.d} k={a.k}\n'
        f'  topk:       dense {t_dense * 1e3:.2f} ms, sparse (gather) {t_sparse * 1e3:.2f} ms, '
        f'sparse/dense = {t_sparse / t_dense:.2f}\n'
        f'  batch_topk: dense {b_dense * 1e3:.2f} ms, sparse (gather) {b_sparse * 1e3:.2f} ms, '
        f'sparse/dense = {b_sparse / b_dense:.2f}')


if __name__ == '__main__':
  main()
