"""Stage 'level2' of staged CSAE: a level-2 SAE on the frozen level-1 decoder rows.

Each alive level-1 feature's unit decoder row is one training example. `level2.restarts` SAEs
from different seeds are trained together by one vmapped step on the same row batches, and the
one with the lowest reconstruction loss of the rows is kept (like k-means' n_init: a k = 1 SAE
on a few thousand rows has local minima). The stage's manifest names level 1's config hash and
step as its parent, so a level 2 is never silently reused on another level 1.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from csae_jax import config as config_lib
from csae_jax import stages
from csae_jax.cascade import concepts
from csae_jax.cascade import rows as rows_lib
from csae_jax.evals import recon
from csae_jax.train import loop


@dataclasses.dataclass
class Level2:
  params: dict          # the selected SAE (unstacked)
  threshold: float
  metrics: dict         # level2/* numbers of the selected restart
  history: list[dict]   # the stage's logged metrics (per restart: [R] means)
  stage: object         # the open orbax stage
  arch: str = ''        # the exported SAE's inference rule and k ('' : the config's)
  k: int = 0


def metrics(cfg: config_lib.Config, params2, threshold2, rows_rd) -> dict:
  """Reconstruction of the rows by a level-2 SAE under its inference rule."""
  s = cfg.level2
  ev = recon.evaluate(params2, [rows_rd], threshold2, arch=s.arch, k=s.k)
  return {'level2/fvu': ev['fvu'], 'level2/variance_explained': 1 - ev['fvu'],
          'level2/l0': ev['l0'], 'level2/dead_frac': ev['dead_frac']}


def select_restart(cfg: config_lib.Config, state, rows_rd) -> tuple[dict, float, dict]:
  """The restart with the lowest reconstruction loss of the rows (inference rule); returns its
  params, threshold and level-2 metrics."""
  runs = []
  for r in range(cfg.level2.restarts):
    p = jax.tree.map(lambda a, r=r: a[r], state.params['level2'])
    thr = float(state.threshold['level2'][r])
    runs.append((p, thr, metrics(cfg, p, thr, rows_rd)))
  fvus = [m['level2/fvu'] for _, _, m in runs]
  best = int(np.argmin(fvus))
  p, thr, picked = runs[best]
  return p, thr, {**picked, 'level2/restart_fvus': [round(f, 6) for f in fvus],
                  'level2/restart_selected': best}


def sae_config(cfg: config_lib.Config, n_rows: int, n_latents: int | None = None
               ) -> config_lib.SAEConfig:
  """The level-2 SAE as trained on `n_rows` rows (n_latents: level2.n_latents, or a sweep's n2):
  surplus latents are welcome when the concepts step merges their fragments (concepts.py)."""
  s2 = cfg.level2 if n_latents is None else dataclasses.replace(cfg.level2, n_latents=n_latents)
  return dataclasses.replace(s2, n_latents=concepts.internal_latents(s2, n_rows))


def init_keys(seed: int, restarts: int) -> jax.Array:
  """The init keys of a level 2 trained with train.seed = seed (one per restart)."""
  return jax.random.split(jax.random.split(jax.random.key(seed))[1], restarts)


def fit(cfg: config_lib.Config, source, mesh, stage, rows_rd: np.ndarray, s2, init_params, *,
        desc: str, hooks=(), stack_hparams=None) -> loop.FitResult:
  """A stack of level-2 SAEs (leading axis R) trained by one vmapped step on the same row
  batches: a run's restarts, or a sweep's members (per-SAE stack_hparams, `step.make_step`)."""
  t = cfg.train
  row_source = rows_lib.RowSource(rows_rd, batch_size=s2.batch_size or min(len(rows_rd), 4096),
                                  seed=t.seed)
  spec2 = stages.level_spec(s2, source.d, s2.steps, t.compute_dtype)
  return loop.fit(stage=stage, mesh=mesh, levels={'level2': spec2}, init_params=init_params,
                  optimizer=stages.optimizer(s2.lr, s2.steps, t), source=row_source,
                  steps=s2.steps, log_every=t.log_every, checkpoint_every=t.checkpoint_every,
                  hooks=hooks, desc=desc, batch_axes=(None, 'embed'), stacked=True,
                  stack_hparams=stack_hparams)


def train(cfg: config_lib.Config, source, mesh, workdir: str, rows_rd: np.ndarray,
          parent: dict, *, hooks=()) -> Level2:
  """Trains (or resumes) stage 'level2' on `rows_rd` [r, d], the alive unit level-1 rows."""
  s2 = sae_config(cfg, len(rows_rd))
  keys2 = init_keys(cfg.train.seed, s2.restarts)
  stage2 = stages.make_stage(cfg, workdir, 'level2', ('level2',), source, parent=parent)
  res2 = fit(cfg, source, mesh, stage2, rows_rd, s2,
             lambda: {'level2': stages.stack([stages.init_sae(k, s2, rows_rd) for k in keys2])},
             desc=f'level 2 (x{s2.restarts})', hooks=hooks)
  p2, thr2, picked = select_restart(cfg, res2.state, rows_rd)
  return Level2(p2, thr2, picked, res2.history, stage2, cfg.level2.arch, cfg.level2.k)
