"""mode='sweep': a grid of level-1 SAEs (seeds x learning rates x k x sparsity coefficients)
trained on the same batches by one vmapped, jitted step, so the data is read once for all.

Writes <workdir>/sweep/results.json, results.md and pareto.png (FVU against L0).
"""

from __future__ import annotations

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np

from csae_jax import checkpoint as ckpt_lib
from csae_jax import config as config_lib
from csae_jax import stages
from csae_jax.evals import recon
from csae_jax.evals import synthetic as synthetic_eval
from csae_jax.reports import plots
from csae_jax.train import loop

AXES = ('seeds', 'lr', 'k', 'l1_coeff', 'l0_coeff')


def grid(cfg: config_lib.Config) -> list[dict]:
  s1, t = cfg.level1, cfg.train
  base = {'seeds': [t.seed], 'lr': [t.lr], 'k': [s1.k], 'l1_coeff': [s1.l1_coeff],
          'l0_coeff': [s1.l0_coeff]}
  axes = [config_lib.sweep_values(cfg.sweep, a) or base[a] for a in AXES]
  return [dict(zip(AXES, combo)) for combo in itertools.product(*axes)]


def run(cfg: config_lib.Config, source, mesh, workdir: str, *, hooks=()) -> dict:
  s1, t = cfg.level1, cfg.train
  members = grid(cfg)
  if t.sparse_decode:
    raise ValueError('mode=sweep traces k per SAE; set --config.train.sparse_decode=False')
  if max(m['k'] for m in members) > s1.n_latents:
    raise ValueError(f'sweep.k has a value larger than level1.n_latents = {s1.n_latents}')
  k_n = np.asarray([int(m['k']) for m in members], np.int32)
  hp = {'lr_scale': np.asarray([m['lr'] / t.lr for m in members], np.float32),
        'k': k_n,
        'l1_coeff': np.asarray([m['l1_coeff'] for m in members], np.float32),
        'l0_coeff': np.asarray([m['l0_coeff'] for m in members], np.float32),
        'target_l0': (k_n.astype(np.float32) if s1.target_l0 < 0
                      else np.full(len(members), s1.target_l0, np.float32))}
  x0_bd = stages.first_global_batch(source)
  stage = stages.make_stage(cfg, workdir, 'sweep', ('data', 'level1', 'train', 'sweep'), source)
  spec = stages.level_spec(s1, source.d, t.steps, t.compute_dtype)
  res = loop.fit(
      stage=stage, mesh=mesh, levels={'level1': spec},
      init_params=lambda: {'level1': jax.tree.map(lambda *xs: jnp.stack(xs), *[
          stages.init_sae(jax.random.key(int(m['seeds'])), s1, x0_bd) for m in members])},
      optimizer=stages.optimizer(t.lr, t.steps, t), source=source, steps=t.steps,
      log_every=t.log_every, checkpoint_every=t.checkpoint_every, hooks=hooks,
      desc=f'sweep x{len(members)}', stacked=True, stack_hparams=hp)
  eval_rows = list(source.eval_batches(cfg.data.eval_rows, stages.EVAL_BATCH))  # read once
  rows = []
  truth = stages.ground_truth(cfg, source)
  for r, m in enumerate(members):
    p = jax.tree.map(lambda a, r=r: a[r], res.state.params['level1'])
    thr = float(res.state.threshold['level1'][r])
    ev = recon.evaluate(p, eval_rows, thr, arch=s1.arch, k=int(m['k']))
    row = {**{a: m[a] for a in AXES}, 'fvu': ev['fvu'], 'l0': ev['l0'],
           'dead_frac': ev['dead_frac'], 'dense_frac': ev['dense_frac']}
    if truth is not None:
      alive = ev['fires_n'] > 0
      n = len(alive)
      sc = synthetic_eval.scores(truth.children_cd, truth.parent_of_child_c,
                                 stages.unit_rows(p), alive, np.full(n, -1))
      row['child_mcc'] = sc['synthetic/child_mcc']
      row['children_recovered'] = sc['synthetic/children_recovered']
      row['child_mean_max_cos'] = sc['synthetic/child_mean_max_cos']
    rows.append(row)
  out_dir = os.path.join(workdir, 'sweep')
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    ckpt_lib.write_json_atomic(os.path.join(out_dir, 'results.json'), rows)
    with open(os.path.join(out_dir, 'results.md'), 'w') as f:
      f.write(table(rows) + '\n')
    plots.pareto(rows, os.path.join(out_dir, 'pareto.png'), title=f'{s1.arch} sweep')
  best = min(rows, key=lambda r: r['fvu'])
  return {'mode': 'sweep', 'sweep/n': len(rows), 'sweep/best_fvu': best['fvu'],
          'sweep/best_l0': best['l0'], 'sweep/results': rows}


def table(rows: list[dict]) -> str:
  cols = list(rows[0])
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for r in rows:
    lines.append('| ' + ' | '.join(f'{r[c]:.4g}' if isinstance(r[c], float) else str(r[c])
                                   for c in cols) + ' |')
  return '\n'.join(lines)
