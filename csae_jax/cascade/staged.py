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


def train(cfg: config_lib.Config, source, mesh, workdir: str, rows_rd: np.ndarray,
          parent: dict, *, hooks=()) -> Level2:
  """Trains (or resumes) stage 'level2' on `rows_rd` [r, d], the alive unit level-1 rows."""
  t = cfg.train
  # surplus latents are welcome when the concepts step merges their fragments (concepts.py)
  s2 = dataclasses.replace(cfg.level2, n_latents=concepts.internal_latents(cfg.level2,
                                                                          len(rows_rd)))
  key2 = jax.random.split(jax.random.key(t.seed))[1]
  row_source = rows_lib.RowSource(rows_rd, batch_size=s2.batch_size or min(len(rows_rd), 4096),
                                  seed=t.seed)
  stage2 = stages.make_stage(cfg, workdir, 'level2', ('level2',), source, parent=parent)
  spec2 = stages.level_spec(s2, source.d, s2.steps, t.compute_dtype)
  keys2 = jax.random.split(key2, s2.restarts)
  res2 = loop.fit(stage=stage2, mesh=mesh, levels={'level2': spec2},
                  init_params=lambda: {'level2': stages.stack(
                      [stages.init_sae(k, s2, rows_rd) for k in keys2])},
                  optimizer=stages.optimizer(s2.lr, s2.steps, t), source=row_source,
                  steps=s2.steps, log_every=t.log_every, checkpoint_every=t.checkpoint_every,
                  hooks=hooks, desc=f'level 2 (x{s2.restarts})', batch_axes=(None, 'embed'),
                  stacked=True)
  p2, thr2, picked = select_restart(cfg, res2.state, rows_rd)
  return Level2(p2, thr2, picked, res2.history, stage2, cfg.level2.arch, cfg.level2.k)
