"""mode='sweep': a grid of SAEs trained on the same batches by one vmapped, jitted step, so the
data is read once for all.

sweep.level=1: level-1 SAEs (seeds x learning rates x k x sparsity coefficients) on the
  activations; writes <workdir>/sweep/results.json, results.md and pareto.png (FVU against L0).
sweep.level=2: level-2 SAEs (seeds x level2.lr x n2) on the alive decoder rows of this config's
  level 1 (stage 'level1': trained once, or reused from a staged run in the same workdir), each
  followed by the concept step; writes <workdir>/sweep_level2/results.json, results.md and
  decoders.npz (each member's level-2 decoder).
  Different n2 share the step: every dictionary is padded to the largest with latents masked
  out of the selection (objective.SAEHyper.n_valid), so they never fire, get exactly zero
  gradient and Adam update, and each member trains as it would alone (tests/test_sweep.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np

from csae_jax import checkpoint as ckpt_lib
from csae_jax import config as config_lib
from csae_jax import stages
from csae_jax.cascade import concepts
from csae_jax.cascade import hierarchy as hierarchy_lib
from csae_jax.cascade import level1 as level1_lib
from csae_jax.cascade import staged
from csae_jax.evals import recon
from csae_jax.evals import synthetic as synthetic_eval
from csae_jax.reports import plots
from csae_jax.saes import common
from csae_jax.train import loop

AXES = ('seeds', 'lr', 'k', 'l1_coeff', 'l0_coeff')
AXES2 = ('seeds', 'lr', 'n2')
# Archs whose padded latents are exactly inert (a masked score is never selected); the others
# (matryoshka's groups depend on n) sweep one n2 at a time.
PADDABLE = ('topk', 'batch_topk')


def _write_results(out_dir: str, rows: list[dict]) -> None:
  """<out_dir>/results.json and results.md of a sweep's rows (process 0 calls it)."""
  os.makedirs(out_dir, exist_ok=True)
  ckpt_lib.write_json_atomic(os.path.join(out_dir, 'results.json'), rows)
  with open(os.path.join(out_dir, 'results.md'), 'w') as f:
    f.write(table(rows) + '\n')


def grid(cfg: config_lib.Config) -> list[dict]:
  s1, t = cfg.level1, cfg.train
  base = {'seeds': [t.seed], 'lr': [t.lr], 'k': [s1.k], 'l1_coeff': [s1.l1_coeff],
          'l0_coeff': [s1.l0_coeff]}
  axes = [config_lib.sweep_values(cfg.sweep, a) or base[a] for a in AXES]
  return [dict(zip(AXES, combo)) for combo in itertools.product(*axes)]


def run(cfg: config_lib.Config, source, mesh, workdir: str, *, hooks=()) -> dict:
  if cfg.sweep.level == 2:
    return run_level2(cfg, source, mesh, workdir, hooks=hooks)
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
    _write_results(out_dir, rows)
    plots.pareto(rows, os.path.join(out_dir, 'pareto.png'), title=f'{s1.arch} sweep')
  best = min(rows, key=lambda r: r['fvu'])
  return {'mode': 'sweep', 'sweep/n': len(rows), 'sweep/best_fvu': best['fvu'],
          'sweep/best_l0': best['l0'], 'sweep/results': rows}


def grid2(cfg: config_lib.Config) -> list[dict]:
  base = {'seeds': [cfg.train.seed], 'lr': [cfg.level2.lr], 'n2': [cfg.level2.n_latents]}
  axes = [config_lib.sweep_values(cfg.sweep, a) or base[a] for a in AXES2]
  return [{'seeds': int(s), 'lr': float(lr), 'n2': int(n2)}
          for s, lr, n2 in itertools.product(*axes)]


def members_level2(cfg: config_lib.Config, d: int, rows_rd: np.ndarray) -> tuple[list, dict]:
  """(per member: its grid point and level-2 SAEConfig; the stack's hyperparameters [R]).
  A member is the level 2 a staged run of this config with train.seed = seeds, level2.lr = lr,
  level2.n_latents = n2 and level2.restarts = 1 trains on the same rows (its other level-2
  fields as this config resolved them)."""
  members = []
  for m in grid2(cfg):
    if m['n2'] < 1 or m['n2'] > cfg.level1.n_latents:
      raise ValueError(f'sweep.n2 value {m["n2"]} must be in [1, level1.n_latents = '
                       f'{cfg.level1.n_latents}]')
    members.append((m, staged.sae_config(cfg, len(rows_rd), m['n2'])))
  sizes = {s2.n_latents for _, s2 in members}
  if len(sizes) > 1 and cfg.level2.arch not in PADDABLE:
    raise ValueError(f'sweep.n2 with level2.arch = {cfg.level2.arch!r}: dictionaries of '
                     f'different sizes share one step only for {list(PADDABLE)}; run one sweep '
                     f'per n2 (experiments/sweep.py --grid=sweep.n2=...)')
  for m, s2 in members:
    if s2.k > s2.n_latents:
      raise ValueError(f'level2.k = {s2.k} is larger than the dictionary of sweep.n2 = '
                       f'{m["n2"]} ({s2.n_latents} latents); lower level2.k or raise the n2')
  hp = {'lr_scale': np.asarray([m['lr'] / cfg.level2.lr for m, _ in members], np.float32),
        'n_valid': np.asarray([s2.n_latents for _, s2 in members], np.int32),
        'd': np.asarray([min(d, s2.n_latents) for _, s2 in members], np.int32)}
  return members, hp


def run_level2(cfg: config_lib.Config, source, mesh, workdir: str, *, hooks=()) -> dict:
  l1, res1, stage1 = level1_lib.train(cfg, source, mesh, workdir, hooks=hooks)
  parent = {'stage': 'level1', 'config_hash': stage1.manifest['config_hash'],
            'step': int(res1.state.step)}
  alive_ids, rows_rd = l1.alive_rows()
  members, hp = members_level2(cfg, source.d, rows_rd)
  n_max = int(hp['n_valid'].max())
  s2_max = dataclasses.replace(cfg.level2, n_latents=n_max)
  stage = stages.make_stage(cfg, workdir, 'sweep_level2', ('level2', 'sweep'), source,
                            parent=parent)
  res = staged.fit(
      cfg, source, mesh, stage, rows_rd, s2_max,
      lambda: {'level2': stages.stack([
          common.pad_latents(stages.init_sae(staged.init_keys(m['seeds'], 1)[0], s2, rows_rd),
                             n_max) for m, s2 in members])},
      desc=f'level-2 sweep x{len(members)}', hooks=hooks, stack_hparams=hp)
  truth = stages.ground_truth(cfg, source)
  w_dec1 = stages.unit_rows(l1.params)
  rows, decoders = [], {}
  for r, (m, s2) in enumerate(members):
    p = common.take_latents(jax.tree.map(lambda a, r=r: a[r], res.state.params['level2']),
                            s2.n_latents)
    thr = float(res.state.threshold['level2'][r])
    cfg_m = dataclasses.replace(cfg, level2=dataclasses.replace(cfg.level2, n_latents=m['n2']))
    fit_m = staged.metrics(cfg_m, p, thr, rows_rd)
    hier, _, info = concepts.build(jax.device_get(p), rows_rd, alive_ids, cfg_m.level2,
                                   code_r=l1.alive_codes())
    decoders[f'member_{r}'] = np.asarray(jax.device_get(p['w_dec']), np.float32)
    row = {'member': r, **m, 'latents_trained': s2.n_latents, 'fvu': fit_m['level2/fvu'],
           'l0': fit_m['level2/l0'], 'dead_frac': fit_m['level2/dead_frac'],
           'concepts': len(hier['concepts'])}
    if truth is not None:
      sc = synthetic_eval.scores(truth.children_cd, truth.parent_of_child_c, w_dec1, l1.alive_n,
                                 hierarchy_lib.labels(hier, len(w_dec1)))
      row['parent_ari'] = sc['synthetic/parent_ari']
      row['parent_nmi'] = sc['synthetic/parent_nmi']
    rows.append(row)
  stage.close()
  stage1.close()
  out_dir = os.path.join(workdir, 'sweep_level2')
  if jax.process_index() == 0:
    _write_results(out_dir, rows)
    # each member's level-2 decoder [n2_trained, d] (the rows of its `member` in results.json)
    np.savez(os.path.join(out_dir, 'decoders.npz'), **decoders)
  best = min(rows, key=lambda r: r['fvu'])
  return {'mode': 'sweep', 'sweep/level': 2, 'sweep/n': len(rows), 'sweep/best_fvu': best['fvu'],
          'sweep/best_l0': best['l0'], 'sweep/results': rows, 'sweep/dir': out_dir}


def table(rows: list[dict]) -> str:
  cols = list(rows[0])
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for r in rows:
    lines.append('| ' + ' | '.join(f'{r[c]:.4g}' if isinstance(r[c], float) else str(r[c])
                                   for c in cols) + ' |')
  return '\n'.join(lines)
