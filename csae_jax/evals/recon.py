"""Reconstruction quality of one SAE under its inference rule, streamed over evaluation batches."""

from __future__ import annotations

import functools
import sys
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from csae_jax.saes import common, get_arch


@functools.partial(jax.jit, static_argnames=('arch', 'k'))
def encode(params: common.Params, x_bd, threshold, *, arch: str, k: int):
  """Inference codes: TopK keeps k per input; BatchTopK uses its learned threshold."""
  return get_arch(arch).infer_codes(params, common.pre_acts(params, x_bd), k, threshold)


@jax.jit
def stats_from_codes(params: common.Params, x_bd, codes_bn) -> dict:
  """One batch's sums for `RunningStats`, from codes already computed (callers that need the
  codes for something else encode once)."""
  x_hat_bd = common.decode(params, codes_bn)
  cos_b = jnp.sum(x_hat_bd * x_bd, -1) / jnp.maximum(
      jnp.linalg.norm(x_hat_bd, axis=-1) * jnp.linalg.norm(x_bd, axis=-1), 1e-12)
  return {'sq_err': jnp.sum((x_hat_bd - x_bd) ** 2), 'sum_x': jnp.sum(x_bd, 0),
          'sum_sq': jnp.sum(x_bd ** 2), 'l0': jnp.sum(codes_bn > 0), 'cos': jnp.sum(cos_b),
          'fires_n': jnp.sum(codes_bn > 0, 0), 'code_sum_n': jnp.sum(codes_bn, 0)}


@functools.partial(jax.jit, static_argnames=('arch', 'k'))
def _batch_stats(params, x_bd, threshold, *, arch, k):
  return stats_from_codes(params, x_bd, encode(params, x_bd, threshold, arch=arch, k=k))


# A latent firing on more than this fraction of inputs counts as dense (as in the train state).
DENSE_RATE = 0.1


class RunningStats:
  """Host-side float64 totals of batch sums, so the result does not depend on batching."""

  def __init__(self):
    self.n, self.tot = 0, None

  def add(self, stats: dict, n_rows: int) -> None:
    s = {key: np.asarray(v, np.float64) for key, v in jax.device_get(stats).items()}
    self.tot = s if self.tot is None else {key: self.tot[key] + s[key] for key in self.tot}
    self.n += n_rows

  def result(self) -> dict:
    """FVU (1 - variance explained), MSE, cosine, L0, dead / dense fractions, per-latent firing
    counts and densities (fraction of inputs each latent fires on)."""
    n, tot = self.n, self.tot
    if not n:
      raise ValueError('evaluation got no rows; raise data.eval_rows / data.holdout_rows')
    total_var = tot['sum_sq'] - np.sum(tot['sum_x'] ** 2) / n
    fires_n = tot['fires_n'].astype(np.int64)
    density_n = fires_n / n
    return {'fvu': float(tot['sq_err'] / max(total_var, 1e-12)),
            'mse': float(tot['sq_err'] / n), 'cos': float(tot['cos'] / n),
            'l0': float(tot['l0'] / n), 'dead_frac': float(np.mean(fires_n == 0)),
            'dense_frac': float(np.mean(density_n > DENSE_RATE)), 'fires_n': fires_n,
            'density_n': density_n, 'n_rows': n,
            # mean code of each latent over the inputs it fires on (0 where it never fires)
            'mean_code_n': tot['code_sum_n'] / np.maximum(fires_n, 1)}


def evaluate(params: common.Params, batches: Iterable[np.ndarray], threshold, *, arch: str,
             k: int, desc: str = 'eval') -> dict:
  """`RunningStats.result()` of the SAE's inference codes over `batches`. A progress bar (rows,
  with an ETA when `batches` says its `n_rows`, as a source's `eval_batches` does) shows once
  the pass has taken 2 s."""
  acc = RunningStats()
  total = getattr(batches, 'n_rows', None)
  if total is None and isinstance(batches, (list, tuple)):
    total = sum(len(x) for x in batches)
  bar = tqdm(total=total, desc=desc, unit='row', file=sys.stderr, dynamic_ncols=True,
             delay=2.0, leave=False, disable=jax.process_index() != 0)
  for x_bd in batches:
    acc.add(_batch_stats(params, jnp.asarray(x_bd), threshold, arch=arch, k=k), len(x_bd))
    bar.update(len(x_bd))
  bar.close()
  return acc.result()
