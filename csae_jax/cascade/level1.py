"""Stage 'level1': the flat SAE on activations, and the trained SAE as one object (`Level1`).

Every method that starts from a flat level 1 (CSAE staged, flat + co-activation, stacked, the
clusterings, the Matryoshka baseline's own SAE) trains it through `train` and hands the result
around as a `Level1`: params in the normalised input space, the inference threshold, the
held-out evaluation and the alive mask.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from csae_jax import config as config_lib
from csae_jax import stages
from csae_jax.evals import recon
from csae_jax.train import loop


@dataclasses.dataclass
class Level1:
  """A trained level-1 SAE in the normalised input space, with its held-out evaluation."""
  params: dict
  threshold: float
  arch: str
  k: int
  alive_n: np.ndarray   # [n1] bool: fires on at least alive_min_density of held-out inputs
  ev: dict              # recon.RunningStats.result() on the held-out rows

  def alive_codes(self) -> np.ndarray | None:
    """[r] mean code when firing x decoder norm of the alive features (None without it)."""
    mean_code_n = self.ev.get('mean_code_n') if self.ev else None
    if mean_code_n is None:
      return None
    norms_n = np.linalg.norm(np.asarray(self.params['w_dec']), axis=-1)
    return (np.asarray(mean_code_n) * norms_n)[np.nonzero(self.alive_n)[0]]

  def alive_rows(self) -> tuple[np.ndarray, np.ndarray]:
    """(ids of the alive features [r], their unit decoder rows [r, d]): what groupings group."""
    alive_ids = np.nonzero(self.alive_n)[0]
    return alive_ids, stages.unit_rows(self.params)[alive_ids]

  def encoder(self, scale: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    """Inference codes for inputs scaled by `scale` first (1: already in the training space)."""
    def fn(x_bd):
      x = jnp.asarray(x_bd if scale == 1.0 else x_bd * np.float32(scale))
      return np.asarray(recon.encode(self.params, x, self.threshold, arch=self.arch, k=self.k))
    return fn


def evaluate(cfg: config_lib.Config, source, params, threshold) -> tuple[dict, np.ndarray]:
  """(held-out reconstruction stats, alive mask [n1]) of level-1 params."""
  s = cfg.level1
  ev = recon.evaluate(params, source.eval_batches(cfg.data.eval_rows, stages.EVAL_BATCH),
                      threshold, arch=s.arch, k=s.k)
  alive = ev['fires_n'] >= max(1.0, s.alive_min_density * ev['n_rows'])
  return ev, alive


def from_params(cfg: config_lib.Config, source, params, threshold) -> Level1:
  ev, alive = evaluate(cfg, source, params, threshold)
  return Level1(params, float(threshold), cfg.level1.arch, cfg.level1.k, alive, ev)


def train(cfg: config_lib.Config, source, mesh, workdir: str, *, hooks=()
          ) -> tuple[Level1, loop.FitResult, object]:
  """Stage 'level1' (resumable: a finished stage is restored, not retrained).
  Returns (the trained Level1, the fit result with its history, the open stage)."""
  t = cfg.train
  key1 = jax.random.split(jax.random.key(t.seed))[0]
  x0_bd = stages.first_global_batch(source)
  stage1 = stages.make_stage(cfg, workdir, 'level1', ('data', 'level1', 'train'), source)
  init1 = stages.sae_init_fn(key1, cfg.level1, x0_bd)
  res1 = loop.fit(stage=stage1, mesh=mesh, levels={'level1': stages.level_spec(
                      cfg.level1, source.d, t.steps, t.compute_dtype,
                      config_lib.use_sparse_step(cfg, jax.default_backend()), mesh)},
                  init_params=lambda: {'level1': init1()}, jittable_init=True,
                  optimizer=stages.optimizer(t.lr, t.steps, t), source=source, steps=t.steps,
                  log_every=t.log_every, checkpoint_every=t.checkpoint_every, hooks=hooks,
                  desc='level 1')
  l1 = from_params(cfg, source, res1.state.params['level1'], res1.state.threshold['level1'])
  return l1, res1, stage1
