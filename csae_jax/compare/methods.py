"""Every method of the comparison, trained on the same activations with the same n1, n2, budget.

Each method ends in the same export format as CSAE (`<workdir>/<method>/export/`: level-1 SAE,
level-2 directions, `hierarchy.json`, `metrics.json`), so one scorer (`compare.score`) treats
them alike. A method also hands over, when it has them, its *parent activations* on inputs
(flat n2 SAE, Matryoshka's inner prefix, the stacked SAE): the P(parent | child) and parent-
detection metrics need them and CSAE, whose level 2 lives on decoder rows, has none.

Level 1 is shared where the method's definition allows: CSAE staged, flat + co-activation,
stacked and decoder clustering all start from the same flat BatchTopK level 1 (trained once in
`<workdir>/csae/`, and found there again by resuming its finished checkpoint), so their
differences are differences of the grouping rule alone. Matryoshka and the joint variants train
their own level 1, as their objectives demand.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import numpy as np

from csae_jax import config as config_lib
from csae_jax import export, pipeline, stages
from csae_jax.baselines import clustering, coactivation, matryoshka, stacked
from csae_jax.cascade import hierarchy as hierarchy_lib
from csae_jax.cascade import level1 as level1_lib

# x_bd (raw activations, input space) -> [B, m] parent activations
ParentCodes = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class Method:
  name: str
  family: str
  export_dir: str
  metrics: dict                          # method-specific numbers (level-2 fit, training)
  parent_codes: ParentCodes | None = None


Level1 = level1_lib.Level1


def _level1(cfg, source, mesh, workdir) -> Level1:
  l1, _, stage = level1_lib.train(cfg, source, mesh, workdir)
  stage.close()
  return l1


def _baseline_sae_cfg(cfg: config_lib.Config, n: int, d: int) -> config_lib.Config:
  """A flat BatchTopK of n latents on d-dim inputs with level 1's recipe and k (or
  compare.baseline_k)."""
  k = min(cfg.compare.baseline_k or cfg.level1.k, n)
  s = config_lib.resolve_sae(
      dataclasses.replace(cfg.level1, n_latents=n, k=k, k_aux=0),
      d=d, n_latents=n, k=k, steps=cfg.train.steps,
      batch_size=cfg.train.batch_size, key='level1')
  return dataclasses.replace(cfg, level1=s)


def _export(out_dir: str, scale: float, l1: Level1, hierarchy: dict, metrics: dict, **level2):
  export.write(os.path.join(out_dir, 'export'), level1=l1.params, level1_threshold=l1.threshold,
               level1_arch=l1.arch, level1_k=l1.k, scale=scale, hierarchy=hierarchy,
               metrics=metrics, **level2)


def csae_staged(cfg, source, mesh, workdir) -> tuple[list[Method], Level1]:
  """CSAE staged (= meta-SAE on a frozen level 1): the pipeline itself, in <workdir>/csae.
  Its level 1 is the shared one the grouping baselines start from."""
  wd = os.path.join(workdir, 'csae')
  res = pipeline.fit(dataclasses.replace(cfg, mode='staged'), source, mesh, wd)
  keep = {k: v for k, v in res.metrics.items() if k.startswith('level2/') and 'restart' not in k}
  return [Method('csae', 'csae', os.path.join(wd, 'export'), keep)], res.level1


def csae_joint(cfg, workdir, *, alpha: float, stop_gradient: str, name: str) -> Method:
  jcfg = dataclasses.replace(cfg, mode='joint', joint=dataclasses.replace(
      cfg.joint, alpha=alpha, stop_gradient=stop_gradient))
  config_lib.validate(jcfg)
  wd = os.path.join(workdir, name)
  metrics = pipeline.run(jcfg, wd)  # its own source: the joint config's seed and sizes
  keep = {k: v for k, v in metrics.items() if k.startswith('level2/')}
  return Method(name, 'joint' if stop_gradient == 'none' else 'stop_gradient',
                os.path.join(wd, 'export'), keep)


def flat_coactivation(cfg, source, mesh, workdir, l1: Level1) -> Method:
  """Separate flat SAEs at n1 (the shared level 1) and n2; parent = the n2 feature each n1
  feature co-activates with most on the held-out inputs."""
  n2 = cfg.level2.n_latents
  fcfg = _baseline_sae_cfg(cfg, n2, source.d)
  wd = os.path.join(workdir, 'flat_coactivation')
  l2 = _level1(fcfg, source, mesh, wd)
  counter = coactivation.CoactivationCounter(cfg.level1.n_latents, n2)
  enc1, enc2 = l1.encoder(), l2.encoder()
  for x_bd in source.eval_batches(cfg.data.eval_rows, stages.EVAL_BATCH):
    counter.add(enc1(x_bd), enc2(x_bd))
  parent_n, strength_n = coactivation.parents_by_coactivation(
      counter.counts, counter.fires_a, alive_a=l1.alive_n)
  alive_ids = np.nonzero(l1.alive_n)[0]
  hier = hierarchy_lib.build(parent_n[alive_ids], strength_n[alive_ids], alive_ids)
  metrics = {'level2/input': 'activations', 'level2/variance_explained': 1 - l2.ev['fvu'],
             'level2/l0': l2.ev['l0'], 'level2/dead_frac': l2.ev['dead_frac']}
  _export(wd, source.scale, l1, hier, metrics, level2=l2.params, level2_threshold=l2.threshold,
          level2_arch=l2.arch, level2_k=l2.k, level2_scale=source.scale)
  return Method('flat_coactivation', 'flat', os.path.join(wd, 'export'), metrics,
                l2.encoder(source.scale))


def matryoshka_methods(cfg, source, mesh, workdir) -> list[Method]:
  """Matryoshka BatchTopK with groups [n2, n1 - n2]: the inner prefix are the parents of the
  outer features, by P(inner | outer) or by decoder cosine (two hierarchies, one SAE)."""
  n1, n2 = cfg.level1.n_latents, cfg.level2.n_latents
  mcfg = dataclasses.replace(cfg, level1=dataclasses.replace(
      cfg.level1, arch='matryoshka', matryoshka_groups=f'{n2},{n1 - n2}'))
  config_lib.validate(mcfg)
  wd = os.path.join(workdir, 'matryoshka')
  l1 = _level1(mcfg, source, mesh, wd)
  enc = l1.encoder()
  counter = coactivation.CoactivationCounter(n1, n2)  # all latents x the inner ones
  for x_bd in source.eval_batches(cfg.data.eval_rows, stages.EVAL_BATCH):
    c_bn = enc(x_bd)
    counter.add(c_bn, c_bn[:, :n2])
  w_dec_nd = np.asarray(jax.device_get(l1.params['w_dec']))
  outer_alive = l1.alive_n.copy()
  outer_alive[:n2] = False
  outer_ids = np.nonzero(outer_alive)[0]
  rules = {
      'matryoshka_conditional': matryoshka.parents_conditional(counter.counts, counter.fires_a,
                                                               n2, l1.alive_n),
      'matryoshka_cosine': matryoshka.parents_decoder_cosine(w_dec_nd, n2, l1.alive_n),
  }
  raw = l1.encoder(source.scale)
  metrics = {'level2/input': 'activations (inner prefix)',
             'level1/inner_alive': int(l1.alive_n[:n2].sum())}
  out = []
  for name, (parent_o, strength_o) in rules.items():
    # the rules index outer features from 0 (= latent n2); members are level-1 ids
    parent_n = np.full(n1, -1)
    strength_n = np.zeros(n1)
    parent_n[n2:], strength_n[n2:] = parent_o, strength_o
    hier = hierarchy_lib.build(parent_n[outer_ids], strength_n[outer_ids], outer_ids)
    _export(os.path.join(workdir, name), source.scale, l1, hier, metrics,
            level2=None, level2_decoder_md=w_dec_nd[:n2])
    out.append(Method(name, 'matryoshka', os.path.join(workdir, name, 'export'), metrics,
                      lambda x, raw=raw: raw(x)[:, :n2]))
  return out


def stacked_sae(cfg, source, mesh, workdir, l1: Level1) -> Method:
  """A level-2 SAE on the level-1 sparse codes; parent of j = argmax of decoder column j."""
  n1, n2 = cfg.level1.n_latents, cfg.level2.n_latents
  codes = stacked.CodeSource(source, l1.params, l1.threshold, l1.arch, l1.k)
  scfg = _baseline_sae_cfg(cfg, n2, n1)  # its inputs are n1-dim codes
  wd = os.path.join(workdir, 'stacked')
  l2 = _level1(scfg, codes, mesh, wd)
  w_dec2_mn = np.asarray(jax.device_get(l2.params['w_dec']))
  parent_n, strength_n = stacked.parents_from_decoder_columns(w_dec2_mn)
  alive_ids = np.nonzero(l1.alive_n)[0]
  hier = hierarchy_lib.build(parent_n[alive_ids], strength_n[alive_ids], alive_ids)
  # concept directions in input space: the level-1 decoder applied to each level-2 atom
  w1_nd = np.asarray(jax.device_get(l1.params['w_dec']))
  metrics = {'level2/input': 'level-1 codes', 'level2/variance_explained': 1 - l2.ev['fvu'],
             'level2/l0': l2.ev['l0'], 'level2/dead_frac': l2.ev['dead_frac']}
  _export(wd, source.scale, l1, hier, metrics, level2=None, level2_decoder_md=w_dec2_mn @ w1_nd)
  enc2 = l2.encoder()

  def parent_codes(x_bd):  # raw activations -> level-1 codes as level 2 saw them -> level 2
    return enc2(codes.encode(x_bd * np.float32(source.scale)))
  return Method('stacked', 'stacked', os.path.join(wd, 'export'), metrics, parent_codes)


def clustering_methods(cfg, source, workdir, l1: Level1) -> list[Method]:
  """Agglomerative (cosine, average linkage), spectral and k-means on the unit decoder rows."""
  n2, seed = cfg.level2.n_latents, cfg.train.seed
  alive_ids, rows_rd = l1.alive_rows()
  n_clusters = min(n2, len(rows_rd))
  algos = {'agglomerative': lambda: clustering.agglomerative(rows_rd, n_clusters),
           'spectral': lambda: clustering.spectral(rows_rd, n_clusters, seed),
           'kmeans': lambda: clustering.kmeans(rows_rd, n_clusters, seed)}
  out = []
  for name, fn in algos.items():
    labels_r, strength_r, centres_md = fn()
    hier = hierarchy_lib.build(labels_r, strength_r, alive_ids)
    proj_r = np.sum(rows_rd * centres_md[labels_r], -1)
    resid = np.sum((rows_rd - proj_r[:, None] * centres_md[labels_r]) ** 2)
    total = np.sum((rows_rd - rows_rd.mean(0)) ** 2)
    metrics = {'level2/input': 'decoder rows',
               'level2/variance_explained': float(1 - resid / max(total, 1e-12))}
    _export(os.path.join(workdir, name), source.scale, l1, hier, metrics, level2=None,
            level2_decoder_md=centres_md)
    out.append(Method(name, 'clustering', os.path.join(workdir, name, 'export'), metrics))
  return out


def topk_reference(cfg, source, mesh, workdir, l1: Level1) -> Method:
  """The plain reference the suite holds level 1 to: a TopK SAE with the AuxK dead-latent loss
  (Gao et al. 2024: no k annealing, random decoder, encoder = decoder^T) at the same n1, k,
  steps, batch and learning rate, its rows grouped by k-means into n2 concepts. When CSAE's
  level 1 is exactly that SAE, it is reused rather than trained twice."""
  rcfg = dataclasses.replace(cfg, level1=config_lib.resolve_sae(
      dataclasses.replace(config_lib.SAEConfig(), n_latents=cfg.level1.n_latents,
                          k=cfg.level1.k, arch='topk', alive_min_density=cfg.level1.alive_min_density,
                          code_l1=0.0),  # plain: no code L1
      d=source.d, n_latents=cfg.level1.n_latents, k=cfg.level1.k, steps=cfg.train.steps,
      batch_size=cfg.train.batch_size, key='level1'))
  shared = rcfg.level1 == cfg.level1
  ref = l1 if shared else _level1(rcfg, source, mesh, os.path.join(workdir, 'topk_reference'))
  alive_ids, rows_rd = ref.alive_rows()
  labels_r, strength_r, centres_md = clustering.kmeans(rows_rd, min(cfg.level2.n_latents,
                                                                    len(rows_rd)), cfg.train.seed)
  hier = hierarchy_lib.build(labels_r, strength_r, alive_ids)
  metrics = {'level2/input': 'decoder rows (k-means)', 'level1/shared_with_csae': shared}
  wd = os.path.join(workdir, 'topk_reference')
  _export(wd, source.scale, ref, hier, metrics, level2=None, level2_decoder_md=centres_md)
  return Method('topk_reference', 'reference', os.path.join(wd, 'export'), metrics)


def oracle_grouping(source, workdir, l1: Level1, truth=None) -> list[Method]:
  """Synthetic data only (built-in, or exported with its ground truth): the same alive level-1 features grouped by the true parent of the
  true child each one is closest to (cosine). The ceiling of any grouping of this level 1: a
  method scoring like it on a metric cannot be beaten on that metric by a better grouping."""
  truth = truth if truth is not None else getattr(source, 'truth', None)
  if truth is None:
    return []
  alive_ids, rows_rd = l1.alive_rows()
  cos_rc = rows_rd @ truth.children_cd.T
  labels_r = truth.parent_of_child_c[cos_rc.argmax(1)]
  hier = hierarchy_lib.build(labels_r, cos_rc.max(1), alive_ids)
  metrics = {'level2/input': 'ground truth'}
  _export(os.path.join(workdir, 'oracle'), source.scale, l1, hier, metrics, level2=None,
          level2_decoder_md=truth.parents_kd)
  return [Method('oracle', 'oracle', os.path.join(workdir, 'oracle', 'export'), metrics)]
