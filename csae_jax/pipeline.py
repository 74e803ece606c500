"""The CSAE pipeline: `run(config, workdir)` trains level 1 and level 2 (staged or joint), builds
the hierarchy, scores it and writes the export. CLI, Colab and tests call it (through
`csae_jax.modes.run`, which also dispatches the compare and sweep modes).

staged: level 1 (orbax stage 'level1', cascade/level1.py) -> alive decoder rows -> level 2
        (stage 'level2', cascade/staged.py; its manifest names level 1's config hash and step as
        its parent) -> hierarchy -> export.
joint:  one stage 'joint' (cascade/joint.py) optimises L1 + alpha * L2 over both levels ->
        hierarchy -> export.
Every stage resumes from its last checkpoint; a stage made with another config is refused.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np

from csae_jax import checkpoint as ckpt_lib
from csae_jax import config as config_lib
from csae_jax import export, stages
from csae_jax.cascade import concepts
from csae_jax.cascade import hierarchy as hierarchy_lib
from csae_jax.cascade import joint as joint_lib
from csae_jax.cascade import level1 as level1_lib
from csae_jax.cascade import staged
from csae_jax.evals import stability as stability_lib
from csae_jax.evals import structure
from csae_jax.evals import synthetic as synthetic_eval
from csae_jax.reports import html as report_html
from csae_jax.reports import plots

CSAE_MODES = ('staged', 'joint')


@dataclasses.dataclass
class Result:
  metrics: dict
  level1: level1_lib.Level1
  level2: staged.Level2
  hierarchy: dict


def fit(cfg: config_lib.Config, source, mesh, workdir: str, *, hooks=()) -> Result:
  """Both levels, the hierarchy, the metrics and the export, for a resolved config."""
  t_start = time.perf_counter()
  if cfg.mode == 'staged':
    l1, res1, stage1 = level1_lib.train(cfg, source, mesh, workdir, hooks=hooks)
    parent = {'stage': 'level1', 'config_hash': stage1.manifest['config_hash'],
              'step': int(res1.state.step)}
    _, rows_rd = l1.alive_rows()
    l2 = staged.train(cfg, source, mesh, workdir, rows_rd, parent, hooks=hooks)
    histories = {'level1': res1.history, 'level2': l2.history}
    open_stages = [stage1, l2.stage]
  elif cfg.mode == 'joint':
    l1, l2 = joint_lib.train(cfg, source, mesh, workdir, hooks=hooks)
    histories = {'joint': l2.history}
    open_stages = [l2.stage]
  else:
    raise ValueError(f'mode {cfg.mode!r} is not a CSAE training mode ({list(CSAE_MODES)}); '
                     f'call csae_jax.modes.run for every mode')
  alive_ids, rows_rd = l1.alive_rows()
  hier, concept_params, info = concepts.build(jax.device_get(l2.params), rows_rd, alive_ids,
                                              cfg.level2, code_r=l1.alive_codes())
  if concept_params is not None:  # one latent per concept (concepts.py)
    l2 = dataclasses.replace(l2, params=concept_params, threshold=-1.0, arch='topk', k=1)
  metrics = {**l2.metrics, **info, **_metrics(cfg, source, l1, l2, hier)}
  result = Result(metrics, l1, l2, hier)
  if cfg.stability:
    metrics.update(stability(cfg, mesh, workdir, result, hooks=hooks))
  metrics['wall_s'] = round(time.perf_counter() - t_start, 2)
  _write(cfg, workdir, source, l1, l2, hier, metrics, histories)
  for st in open_stages:
    st.close()
  return result


def _metrics(cfg: config_lib.Config, source, l1: level1_lib.Level1, l2: staged.Level2,
             hier: dict) -> dict:
  ev1 = l1.ev
  w_dec1 = stages.unit_rows(l1.params)
  out = {
      'config_hash': config_lib.stable_hash(cfg), 'mode': cfg.mode, 'd': source.d,
      'level1/n_latents': cfg.level1.n_latents, 'level1/k': cfg.level1.k,
      'level2/n_latents': cfg.level2.n_latents, 'level2/k': cfg.level2.k,
      'level1/fvu': ev1['fvu'], 'level1/variance_explained': 1 - ev1['fvu'],
      'level1/l0': ev1['l0'], 'level1/cos': ev1['cos'], 'level1/dead_frac': ev1['dead_frac'],
      'level1/dense_frac': ev1['dense_frac'], 'level1/mse': ev1['mse'],
      'level1/alive': int(l1.alive_n.sum()), 'eval_rows': ev1['n_rows'],
  }
  out.update(structure.stats(hier, w_dec1, cfg.level2.n_latents,
                             w_dec2_md=np.asarray(jax.device_get(l2.params['w_dec']))))
  truth = stages.ground_truth(cfg, source)
  if truth is not None:
    out.update(synthetic_eval.scores(truth.children_cd, truth.parent_of_child_c, w_dec1,
                                     l1.alive_n, hierarchy_lib.labels(hier, len(w_dec1))))
  return out


def _write(cfg, workdir, source, l1, l2, hier, metrics, histories) -> None:
  export.write(os.path.join(workdir, 'export'), level1=l1.params, level1_threshold=l1.threshold,
               level1_arch=cfg.level1.arch, level1_k=cfg.level1.k, scale=source.scale,
               level2=l2.params, level2_threshold=l2.threshold, level2_arch=l2.arch,
               level2_k=l2.k, hierarchy=hier, metrics=metrics)
  if jax.process_index() == 0:
    ckpt_lib.write_json_atomic(os.path.join(workdir, 'histories.json'), histories)
    plots.training_curves(histories, os.path.join(workdir, 'export', 'curves.png'))
    plots.density_histogram(l1.ev['density_n'],
                            os.path.join(workdir, 'export', 'level1_density.png'),
                            title=f'level-1 feature density ({l1.ev["n_rows"]} held-out inputs)')
    # <workdir>/report/index.html; on a harvest its top images come from the first images only
    # (the report mode re-renders with --config.max_images=0 for all of them)
    report_html.write(workdir, max_images=report_html.PIPELINE_MAX_IMAGES)


def stability(cfg: config_lib.Config, mesh, workdir: str, result: Result, *, hooks=()) -> dict:
  """Trains the same config with the next seed in <workdir>/stability/ and compares the two
  hierarchies (evals/stability.py): the seed-stability signal for data without ground truth."""
  cfg_b = dataclasses.replace(cfg, stability=False,
                              train=dataclasses.replace(cfg.train, seed=cfg.train.seed + 1))
  res_b = fit(cfg_b, stages.make_source(cfg_b), mesh, os.path.join(workdir, 'stability'),
              hooks=hooks)
  out = stability_lib.hierarchy_stability(stages.unit_rows(result.level1.params),
                                          result.hierarchy, stages.unit_rows(res_b.level1.params),
                                          res_b.hierarchy)
  out['stability/seed'] = cfg_b.train.seed
  return out


def run(cd_or_cfg, workdir: str, *, hooks=()) -> dict:
  """Runs the CSAE pipeline (mode staged or joint); returns the metrics (also in
  <workdir>/export/metrics.json)."""
  t_start = time.perf_counter()
  workdir = os.path.abspath(workdir)
  cfg, source, mesh = stages.setup(cd_or_cfg, workdir)
  metrics = fit(cfg, source, mesh, workdir, hooks=hooks).metrics
  metrics['wall_s'] = round(time.perf_counter() - t_start, 2)
  return metrics
