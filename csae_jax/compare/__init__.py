"""mode='compare': CSAE against its baselines on the same activations, n1, n2 and budget.

`run(cfg, source, mesh, workdir)` trains every selected method (`compare.methods`), writes each
one's export under `<workdir>/<method>/export/`, scores them all with one scorer and writes
`compare.json`, `compare.md` and the plots. Resumable: every SAE stage resumes from its
checkpoint, so a killed comparison continues where it stopped. HMS reference embeddings computed
by a vision port (`compare.embedding_model`) are cached in `<workdir>/embeddings/`; `embed_fn`
(image ids -> [len(ids), e]) plugs in any other encoder from Python.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
from absl import logging
from tqdm.auto import tqdm

from csae_jax import config as config_lib
from csae_jax import stages
from csae_jax.compare import methods as methods_lib
from csae_jax.compare import report, score
from csae_jax.evals import embeddings as embeddings_lib
from csae_jax.reports import html as report_html

FAMILY_ORDER = config_lib.COMPARE_FAMILIES


def _methods(cfg, source, mesh, workdir) -> list[methods_lib.Method]:
  fams = set(config_lib.compare_families(cfg.compare))
  out: list[methods_lib.Method] = []
  # The shared flat level 1 is CSAE-staged's; the grouping baselines reuse it.
  csae, l1 = methods_lib.csae_staged(cfg, source, mesh, workdir)
  if 'csae' in fams:
    out += csae
  if 'joint' in fams:
    for a in config_lib.compare_alphas(cfg.compare):
      out.append(methods_lib.csae_joint(cfg, workdir, alpha=a, stop_gradient='none',
                                        name=f'csae_joint_alpha{a:g}'))
  if 'stop_gradient' in fams:
    for sg in ('partial', 'bilateral'):
      out.append(methods_lib.csae_joint(cfg, workdir, alpha=cfg.compare.ablation_alpha,
                                        stop_gradient=sg, name=f'csae_{sg}'))
  if 'flat' in fams:
    out.append(methods_lib.flat_coactivation(cfg, source, mesh, workdir, l1))
  if 'matryoshka' in fams:
    out += methods_lib.matryoshka_methods(cfg, source, mesh, workdir)
  if 'stacked' in fams:
    out.append(methods_lib.stacked_sae(cfg, source, mesh, workdir, l1))
  if 'clustering' in fams:
    out += methods_lib.clustering_methods(cfg, source, workdir, l1)
  if 'reference' in fams:
    out.append(methods_lib.topk_reference(cfg, source, mesh, workdir, l1))
  if 'oracle' in fams:
    out += methods_lib.oracle_grouping(source, workdir, l1,
                                       truth=stages.ground_truth(cfg, source))
  return out


def embedding_fn(cfg, workdir: str = '') -> embeddings_lib.EmbedFn | None:
  """The config's port embeddings (compare.embedding_model; None without one), cached in
  <workdir>/embeddings/ (no cache without a workdir)."""
  if not cfg.data.path:
    return None
  return embeddings_lib.from_config(
      cfg.compare, cfg.data.path, cache=os.path.join(workdir, 'embeddings') if workdir else '')


def eval_set(cfg, source, embed_fn: embeddings_lib.EmbedFn | None = None,
             workdir: str = '') -> score.EvalSet:
  """The held-out set; on real data its reference embeddings come from `embed_fn` when given
  (any callable: image ids -> [len(ids), e]), else from compare.embeddings or
  compare.embedding_model (cached under <workdir>/embeddings/ when workdir is set)."""
  if cfg.data.path:
    embed_fn = embed_fn or embedding_fn(cfg, workdir)
    return score.harvested_eval_set(source, cfg.data.eval_rows, cfg.compare.embeddings,
                                    cfg.compare.taxonomy, embed_fn=embed_fn)
  if embed_fn is not None:
    raise ValueError('an embedding function describes the images of real data; set data.path '
                     '(synthetic data uses its ground truth as the embedding)')
  return score.synthetic_eval_set(source, cfg.data.eval_rows)


def run(cfg: config_lib.Config, source, mesh, workdir: str,
        embed_fn: embeddings_lib.EmbedFn | None = None) -> dict:
  """One comparison per seed of `compare.seeds` (in <workdir>/seed_<s>/ when several), then
  the mean and std over seeds (a grouping's ARI moves by several hundredths between seeds:
  a single-seed gap of that size is not a difference between methods). embed_fn: HMS reference
  embeddings of real data (default: the config's, computed once for every seed)."""
  seeds = config_lib.compare_seeds(cfg.compare) or [cfg.train.seed]
  embed_fn = embed_fn or embedding_fn(cfg, workdir)
  if len(seeds) == 1:
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seeds[0]))
    if source.seed != seeds[0]:
      source = stages.make_source(cfg)
    return run_one(cfg, source, mesh, workdir, embed_fn)
  t0 = time.perf_counter()
  per_seed = {}
  for s in seeds:
    cfg_s = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=s))
    per_seed[s] = run_one(cfg_s, stages.make_source(cfg_s), mesh,
                          os.path.join(workdir, f'seed_{s}'), embed_fn)['compare/results']
  mean, std = report.aggregate(per_seed)
  header = (f'# CSAE vs baselines, mean +- std over seeds {seeds}\n\nPer seed: '
            + ', '.join(f'seed_{s}/compare.md' for s in seeds) + '.')
  if jax.process_index() == 0:  # one writer of tables and reports
    report.write_seeds(workdir, per_seed, mean, std, header)
    report_html.write_compare(workdir)  # <workdir>/report/index.html, linking each seed's
  return {'mode': 'compare', 'compare/methods': list(mean), 'compare/results': mean,
          'compare/std': std, 'compare/table': report.table(mean, std),
          'wall_s': round(time.perf_counter() - t0, 2)}


def run_one(cfg: config_lib.Config, source, mesh, workdir: str,
            embed_fn: embeddings_lib.EmbedFn | None = None) -> dict:
  t0 = time.perf_counter()
  trained = _methods(cfg, source, mesh, workdir)
  es = eval_set(cfg, source, embed_fn, workdir)
  results, per_concept = {}, {}
  # HMS with its n_perm-partition null is the slow part of scoring: one bar step per method
  bar = tqdm(trained, desc='scoring', unit='method', file=sys.stderr, dynamic_ncols=True,
             disable=jax.process_index() != 0)
  for m in bar:
    bar.set_postfix_str(m.name, refresh=False)
    logging.info('scoring %s', m.name)
    scores, per_concept[m.name] = score.score(m.export_dir, es, parent_codes=m.parent_codes,
                                              n_perm=cfg.compare.n_perm,
                                              seed=cfg.compare.null_seed)
    results[m.name] = {'family': m.family, **m.metrics, **scores}
  s = cfg.data.synthetic
  data = (f'activations {cfg.data.path}' if cfg.data.path else
          f'synthetic hierarchy (d={s.d}, K={s.n_parents}, C={s.n_children}, '
          f'child-parent cos a={s.child_parent_cos}, parent emission {s.parent_emission})')
  header = (f'# CSAE vs baselines\n\nData: {data}. n1 = {cfg.level1.n_latents}, k1 = '
            f'{cfg.level1.k}, n2 = {cfg.level2.n_latents}, {cfg.train.steps} steps x '
            f'{cfg.train.batch_size}; {len(es.x_nd)} held-out rows; HMS null: '
            f'{cfg.compare.n_perm} size-matched random partitions.')
  if jax.process_index() == 0:  # one writer of tables and reports
    report.write(workdir, results, per_concept, header)
    report_html.write_compare(workdir)  # <workdir>/report/index.html and one per method
  return {'mode': 'compare', 'compare/methods': list(results), 'compare/results': results,
          'compare/table': report.table(results),
          'wall_s': round(time.perf_counter() - t0, 2)}
