"""`run(config, workdir)`: THE entry point of the CSAE pipeline (CLI, Colab and tests call it).

staged: level 1 (orbax stage 'level1') -> alive decoder rows -> level 2 (stage 'level2', its
        manifest names level 1's config hash and step as its parent) -> hierarchy -> export.
joint:  one stage 'joint' optimises L1 + alpha * L2 over both levels -> hierarchy -> export.
Every stage resumes from its last checkpoint; a stage made with another config is refused.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import sklearn.cluster
from absl import logging

from csae_jax import checkpoint as ckpt_lib
from csae_jax import config as config_lib
from csae_jax import export, sharding
from csae_jax.cascade import hierarchy as hierarchy_lib
from csae_jax.cascade import rows as rows_lib
from csae_jax.evals import recon, structure
from csae_jax.evals import synthetic as synthetic_eval
from csae_jax.reports import plots
from csae_jax.saes import common, get_arch, objective
from csae_jax.sources import arrays, synthetic
from csae_jax.train import loop, optim
from csae_jax.train import step as step_lib

EVAL_BATCH = 4096


def make_source(cfg: config_lib.Config):
  kw = dict(batch_size=cfg.train.batch_size, seed=cfg.train.seed,
            process_index=jax.process_index(), process_count=jax.process_count())
  if cfg.data.path:
    holdout = None if cfg.data.holdout_rows < 0 else cfg.data.holdout_rows
    return arrays.ArraySource(cfg.data.path, holdout_rows=holdout, **kw)
  return synthetic.SyntheticSource(cfg.data.synthetic, **kw)


def first_global_batch(source) -> np.ndarray:
  """The whole first batch, identical on every host (initialisation must agree across hosts)."""
  if hasattr(source, 'global_batch'):
    return source.global_batch(0)
  return source.read_rows(source.global_indices(0)) * np.float32(source.scale)


def level_spec(sae: config_lib.SAEConfig, d: int, steps: int,
               compute_dtype: str = 'float32', sparse_decode: bool = False
               ) -> step_lib.LevelSpec:
  hyper = objective.SAEHyper(
      arch=sae.arch, k=sae.k, k_aux=sae.k_aux, auxk_weight=sae.auxk_weight,
      dead_tokens=sae.dead_tokens, k_anneal_steps=int(sae.k_anneal_frac * steps),
      d=min(d, sae.n_latents), l1_coeff=sae.l1_coeff,
      sparsity_warmup_steps=int(sae.sparsity_warmup_frac * steps),
      bandwidth=sae.jumprelu_bandwidth, l0_coeff=sae.l0_coeff,
      target_l0=float(sae.k) if sae.target_l0 < 0 else sae.target_l0,
      groups=config_lib.matryoshka_groups(sae.matryoshka_groups, sae.n_latents),
      compute_dtype=compute_dtype, sparse_decode=sparse_decode)
  return step_lib.LevelSpec(hyper, sae.threshold_decay, sae.threshold_start)


def init_sae(key: jax.Array, sae: config_lib.SAEConfig, x_bd: np.ndarray) -> common.Params:
  """Decoder rows (random, or data rows), encoder = decoder^T, b_dec from the first batch."""
  x = jnp.asarray(x_bd)
  b_dec = jnp.zeros(x.shape[1], jnp.float32)
  if sae.b_dec_init == 'geometric_median':
    b_dec = jax.jit(common.geometric_median)(x)
  elif sae.b_dec_init == 'mean':
    b_dec = jnp.mean(x, 0)
  rows = None
  if sae.decoder_init in ('data', 'kmeans++'):
    centred = np.asarray(x - b_dec, np.float64)
    if sae.decoder_init == 'kmeans++':
      # k-means++ seeding (D^2 sampling): latents start spread over the data, far from each
      # other, which avoids the merged / split groups a k=1 SAE otherwise gets stuck in.
      seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
      n_seed = min(sae.n_latents, len(centred))
      rows, _ = sklearn.cluster.kmeans_plusplus(centred, n_seed, random_state=seed)
    else:
      rows = centred
    rows = common.normalize_rows(jnp.asarray(rows, jnp.float32))
  params = common.init_params(key, x.shape[1], sae.n_latents, rows_nd=rows)
  params['b_dec'] = b_dec
  params.update(get_arch(sae.arch).extra_params(sae.n_latents, sae))
  return params


def _stage_config(cfg: config_lib.Config, *parts: str) -> dict:
  d = config_lib.to_dict(cfg)
  out = {p: d[p] for p in parts}
  if 'data' in out:
    out['data'] = {k: v for k, v in out['data'].items() if k != 'eval_rows'}
  return out


def _stage(cfg, workdir, name, parts, source, parent=None) -> ckpt_lib.Stage:
  stage_cfg = _stage_config(cfg, *parts)
  manifest = {'config': stage_cfg, 'config_hash': config_lib.stable_hash(stage_cfg),
              'data_fingerprint': source.fingerprint, 'data': source.manifest(), 'parent': parent}
  return ckpt_lib.Stage(workdir, name, manifest=manifest, keep=cfg.train.keep_checkpoints,
                        overwrite=cfg.overwrite)


def _optimizer(lr, steps, t: config_lib.TrainConfig):
  return optim.make_optimizer(lr, steps, t.warmup_steps, t.decay_start, t.grad_clip,
                              t.lr_schedule)


def _eval_level1(cfg, source, params, threshold):
  s = cfg.level1
  ev = recon.evaluate(params, source.eval_batches(cfg.data.eval_rows, EVAL_BATCH), threshold,
                      arch=s.arch, k=s.k)
  alive = ev['fires_n'] >= max(1.0, s.alive_min_density * ev['n_rows'])
  return ev, alive


def _stack(trees: list) -> dict:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _select_restart(cfg, st, rows_rd) -> tuple[dict, float, dict]:
  """The restart with the lowest reconstruction loss of the rows (inference rule); returns its
  params, threshold and level-2 metrics."""
  runs = []
  for r in range(cfg.level2.restarts):
    p = jax.tree.map(lambda a, r=r: a[r], st.params['level2'])
    thr = float(st.threshold['level2'][r])
    runs.append((p, thr, _level2_metrics(cfg, p, thr, rows_rd)))
  fvus = [m['level2/fvu'] for _, _, m in runs]
  best = int(np.argmin(fvus))
  p, thr, metrics = runs[best]
  return p, thr, {**metrics, 'level2/restart_fvus': [round(f, 6) for f in fvus],
                  'level2/restart_selected': best}


def unit_rows(params) -> np.ndarray:
  """[n, d] float32 unit decoder rows of an SAE's params (level 2's training data)."""
  w_nd = np.asarray(jax.device_get(params['w_dec']), np.float32)
  return w_nd / np.maximum(np.linalg.norm(w_nd, axis=1, keepdims=True), 1e-12)


def _level2_metrics(cfg, params2, threshold2, rows_rd) -> dict:
  s = cfg.level2
  ev = recon.evaluate(params2, [rows_rd], threshold2, arch=s.arch, k=s.k)
  return {'level2/fvu': ev['fvu'], 'level2/variance_explained': 1 - ev['fvu'],
          'level2/l0': ev['l0'], 'level2/dead_frac': ev['dead_frac']}


def setup(cd_or_cfg, workdir: str):
  """Validated + resolved config, the data source and the mesh: what every stage needs."""
  cfg = cd_or_cfg if isinstance(cd_or_cfg, config_lib.Config) else config_lib.from_config_dict(
      cd_or_cfg)
  os.makedirs(workdir, exist_ok=True)
  source = make_source(cfg)
  cfg = config_lib.resolve(cfg, d=source.d,
                           synthetic_atoms=getattr(source, 'n_atoms', None) if not cfg.data.path else None)
  mesh = sharding.make_mesh(cfg.mesh)
  n_data = mesh.shape['data']
  if cfg.train.batch_size % n_data:
    raise ValueError(f'train.batch_size = {cfg.train.batch_size} is not divisible by the '
                     f'{n_data} devices of the mesh data axis; pick a multiple of {n_data}')
  if cfg.level1.n_latents % mesh.shape['model'] or cfg.level2.n_latents % mesh.shape['model']:
    raise ValueError(f'level1.n_latents and level2.n_latents must be divisible by mesh.model = '
                     f'{mesh.shape["model"]}')
  logging.info('resolved config: %s', config_lib.to_dict(cfg))
  return cfg, source, mesh


def train_level1(cfg: config_lib.Config, source, mesh, workdir: str, *, hooks=()):
  """Stage 'level1' (resumable). Returns (fit result, stage, held-out eval, alive mask)."""
  t = cfg.train
  key1 = jax.random.split(jax.random.key(t.seed))[0]
  x0_bd = first_global_batch(source)
  stage1 = _stage(cfg, workdir, 'level1', ('data', 'level1', 'train'), source)
  res1 = loop.fit(stage=stage1, mesh=mesh, levels={'level1': level_spec(
                      cfg.level1, source.d, t.steps, t.compute_dtype, t.sparse_decode)},
                  init_params=lambda: {'level1': init_sae(key1, cfg.level1, x0_bd)},
                  optimizer=_optimizer(t.lr, t.steps, t), source=source, steps=t.steps,
                  log_every=t.log_every, checkpoint_every=t.checkpoint_every, hooks=hooks,
                  desc='level 1')
  p1, thr1 = res1.state.params['level1'], float(res1.state.threshold['level1'])
  ev1, alive = _eval_level1(cfg, source, p1, thr1)
  return res1, stage1, ev1, alive


def run(cd_or_cfg, workdir: str, *, hooks=()) -> dict:
  """Runs the whole pipeline; returns the metrics (also in <workdir>/export/metrics.json)."""
  t_start = time.perf_counter()
  workdir = os.path.abspath(workdir)
  cfg, source, mesh = setup(cd_or_cfg, workdir)
  if cfg.mode == 'compare':
    from csae_jax import compare  # pylint: disable=g-import-not-at-top  (compare imports pipeline)
    return compare.run(cfg, source, mesh, workdir)
  if cfg.mode == 'sweep':
    from csae_jax import sweep  # pylint: disable=g-import-not-at-top  (sweep imports pipeline)
    return {**sweep.run(cfg, source, mesh, workdir, hooks=hooks),
            'wall_s': round(time.perf_counter() - t_start, 2)}
  key1, key2 = jax.random.split(jax.random.key(cfg.train.seed))
  t, d = cfg.train, source.d
  x0_bd = first_global_batch(source)
  spec1 = level_spec(cfg.level1, d, t.steps, t.compute_dtype)
  metrics: dict = {}

  if cfg.mode == 'staged':
    res1, stage1, ev1, alive = train_level1(cfg, source, mesh, workdir, hooks=hooks)
    p1, thr1 = res1.state.params['level1'], float(res1.state.threshold['level1'])
    rows_rd = unit_rows(p1)[alive]
    s2 = cfg.level2
    row_source = rows_lib.RowSource(rows_rd, batch_size=s2.batch_size or min(len(rows_rd), 4096),
                                    seed=t.seed)
    parent = {'stage': 'level1', 'config_hash': stage1.manifest['config_hash'],
              'step': int(res1.state.step)}
    stage2 = _stage(cfg, workdir, 'level2', ('level2',), source, parent=parent)
    spec2 = level_spec(s2, d, s2.steps, t.compute_dtype)
    keys2 = jax.random.split(key2, s2.restarts)
    res2 = loop.fit(stage=stage2, mesh=mesh, levels={'level2': spec2},
                    init_params=lambda: {'level2': _stack([init_sae(k, s2, rows_rd) for k in keys2])},
                    optimizer=_optimizer(s2.lr, s2.steps, t), source=row_source, steps=s2.steps,
                    log_every=t.log_every, checkpoint_every=t.checkpoint_every, hooks=hooks,
                    desc=f'level 2 (x{s2.restarts})', batch_axes=(None, 'embed'), stacked=True)
    p2, thr2, picked = _select_restart(cfg, res2.state, rows_rd)
    metrics.update(picked)
    histories = {'level1': res1.history, 'level2': res2.history}
    stages = [stage1, stage2]
  else:
    stage = _stage(cfg, workdir, 'joint', ('data', 'level1', 'level2', 'train', 'joint'), source)
    spec2 = level_spec(cfg.level2, d, t.steps - cfg.joint.level2_start, t.compute_dtype)
    jspec = step_lib.JointSpec(cfg.joint.alpha, cfg.joint.level2_start, cfg.joint.stop_gradient)

    def start_level2(s, st):
      """At level2_start: b_dec2 = geometric median of the decoder rows of atoms alive so far."""
      if s != cfg.joint.level2_start:
        return st
      alive_n = np.asarray(jax.device_get(st.since_fired['level1'])) < spec1.hyper.dead_tokens
      rows = unit_rows(st.params['level1'])[alive_n if alive_n.any() else slice(None)]
      fresh = init_sae(key2, cfg.level2, rows)
      params = {**st.params, 'level2': jax.device_put(
          fresh, jax.tree.map(lambda a: a.sharding, st.params['level2']))}
      return st.replace(params=params)

    res = loop.fit(stage=stage, mesh=mesh, levels={'level1': spec1, 'level2': spec2},
                   # level 2 is a placeholder until level2_start re-initialises it from rows
                   init_params=lambda: {'level1': init_sae(key1, cfg.level1, x0_bd),
                                        'level2': init_sae(key2, dataclasses.replace(
                                            cfg.level2, decoder_init='random',
                                            b_dec_init='zeros'), x0_bd)},
                   optimizer=_optimizer(t.lr, t.steps, t), source=source, steps=t.steps,
                   log_every=t.log_every, checkpoint_every=t.checkpoint_every, joint=jspec,
                   before_step=start_level2, hooks=hooks, desc='joint CSAE')
    p1, thr1 = res.state.params['level1'], float(res.state.threshold['level1'])
    p2, thr2 = res.state.params['level2'], float(res.state.threshold['level2'])
    ev1, alive = _eval_level1(cfg, source, p1, thr1)
    rows_rd = unit_rows(p1)[alive]
    metrics.update(_level2_metrics(cfg, p2, thr2, rows_rd))
    histories = {'joint': res.history}
    stages = [stage]

  alive_ids = np.nonzero(alive)[0]
  parent_r, strength_r = hierarchy_lib.assign_parents(p2, rows_rd, cfg.level2.assign_threshold)
  hier = hierarchy_lib.build(parent_r, strength_r, alive_ids)
  w_dec1 = unit_rows(p1)
  metrics.update({
      'config_hash': config_lib.stable_hash(cfg), 'mode': cfg.mode, 'd': d,
      'level1/n_latents': cfg.level1.n_latents, 'level1/k': cfg.level1.k,
      'level2/n_latents': cfg.level2.n_latents, 'level2/k': cfg.level2.k,
      'level1/fvu': ev1['fvu'], 'level1/variance_explained': 1 - ev1['fvu'],
      'level1/l0': ev1['l0'], 'level1/cos': ev1['cos'], 'level1/dead_frac': ev1['dead_frac'],
      'level1/dense_frac': ev1['dense_frac'], 'level1/mse': ev1['mse'],
      'level1/alive': int(alive.sum()), 'eval_rows': ev1['n_rows'],
  })
  metrics.update(structure.stats(hier, w_dec1, cfg.level2.n_latents))
  if not cfg.data.path:
    truth = source.truth
    metrics.update(synthetic_eval.scores(truth.children_cd, truth.parent_of_child_c, w_dec1,
                                         alive, hierarchy_lib.labels(hier, len(w_dec1))))
  metrics['wall_s'] = round(time.perf_counter() - t_start, 2)
  export.write(os.path.join(workdir, 'export'), level1=p1, level1_threshold=thr1,
               level1_arch=cfg.level1.arch, level1_k=cfg.level1.k, scale=source.scale, level2=p2,
               level2_threshold=thr2, level2_arch=cfg.level2.arch, level2_k=cfg.level2.k,
               hierarchy=hier, metrics=metrics)
  if jax.process_index() == 0:
    ckpt_lib.write_json_atomic(os.path.join(workdir, 'histories.json'), histories)
    plots.training_curves(histories, os.path.join(workdir, 'export', 'curves.png'))
    plots.density_histogram(ev1['density_n'], os.path.join(workdir, 'export', 'level1_density.png'),
                            title=f'level-1 feature density ({ev1["n_rows"]} held-out inputs)')
  for st in stages:
    st.close()
  return metrics
