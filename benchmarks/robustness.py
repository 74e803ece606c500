"""The robustness suite: does the pipeline's output hold on hierarchies it was never tuned on?

    python -m benchmarks.robustness                      # every family, seeds 0,1 (hours, 2 cores)
    python -m benchmarks.robustness --families=base,correlated --seeds=0 --methods=csae,reference
    python -m benchmarks.robustness --set level1.arch=batch_topk --out=/tmp/rob_bt  # a variant

Each family is the built-in synthetic generator (csae_jax/sources/synthetic.py) with one
property changed from `BASE` (or several, the `combo` families); nothing in the code knows a
family. For every family and seed it runs the comparison (csae_jax/compare) on the same data,
n1, k and budget:
  * at n2 = 2K (K = true parents): CSAE staged and joint, flat + co-activation, Matryoshka,
    stacked, the clusterings of CSAE's level-1 rows, the plain TopK + AuxK reference (its rows
    grouped by k-means) and the oracle grouping;
  * at n2 = K and n2 = n1 / 8: CSAE staged, the clusterings and the oracle, on the same level 1
    (its finished stage is copied, not retrained).
The budget is the user's, fixed by rule for every family: n1 = `--overcomplete` x the number of
true children (a family may change it), k = ceil(1.7 x the expected active atoms per input)
(generous, as a user who does not know the true L0 gives it), `--steps` x `--batch_size`.

Scores, from each method's export (csae_jax/evals/synthetic.py): children recovered (an alive
level-1 row within cosine 0.8 of the child), mean max cosine, and ARI of the recovered
children's concepts against their true parents. Writes <out>/robustness.json (every number per
seed), robustness.md (mean +- std over seeds) and robustness.png.

Resumable: a finished comparison is read, not re-run; one that lacks some of `--methods` runs
only those (on the finished level 1) and merges them in. `--rescore` re-runs the CSAE methods of
finished comparisons on their finished SAE stages: after a change to the concept step (the
stages leave its keys out of their hashes) it re-scores the whole suite in minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time

import numpy as np

# The families: overrides of BASE (data.synthetic.*), plus 'overcomplete' (n1 / n_children).
BASE = dict(d=96, n_parents=10, n_children=5, child_parent_cos=0.6, p_parent=0.18,
            parent_emission=0.0, log_mag_std=0.25, noise_std=0.02)
FAMILIES: dict[str, dict] = {
    'base': {},
    'branching_unequal': dict(n_children=2, n_children_max=12),
    'correlated_parents': dict(parent_corr=0.6),
    'emission_0.3': dict(parent_emission=0.3),
    'emission_0.7': dict(parent_emission=0.7),
    'tails_heavy': dict(log_mag_std=1.0),
    'active_poisson': dict(active_count='poisson', mean_active=1.8),
    'active_fixed': dict(active_count='fixed', mean_active=2),
    'noise_anisotropic': dict(noise_std=0.02, noise_std_max=0.08),
    'low_snr': dict(noise_std=0.08),
    'd_64': dict(d=64),
    'd_512': dict(d=512),
    'overcomplete_2': dict(overcomplete=2),
    'overcomplete_8': dict(overcomplete=8),
    'cooccurring': dict(scene_size=2, scene_cooccur=0.5),
    'combo_issue': dict(n_children=3, n_children_max=10, child_parent_cos=0.64, parent_corr=0.5,
                        active_count='poisson', mean_active=1.8, parent_emission=0.3,
                        log_mag_std=0.5, noise_std=0.02, noise_std_max=0.08),
    'combo_hard': dict(parent_emission=0.7, log_mag_std=1.0, scene_size=2, scene_cooccur=0.5,
                       active_count='fixed', mean_active=2, noise_std=0.06),
}
METHODS_2K = 'csae,joint,flat,matryoshka,stacked,clustering,reference,oracle'
METHODS_N2 = 'csae,clustering,oracle'
SCORES = ('synthetic/children_recovered', 'synthetic/child_mean_max_cos',
          'synthetic/parent_ari_recovered')


def family_config(name: str, seed: int, args) -> tuple['ml_collections.ConfigDict', dict]:
  """The compare config of one family and seed, and its budget."""
  from csae_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from csae_jax.sources import synthetic  # pylint: disable=g-import-not-at-top
  from experiments import overrides as overrides_lib  # pylint: disable=g-import-not-at-top
  from experiments.configs import compare as compare_config  # pylint: disable=g-import-not-at-top
  over = dict(FAMILIES[name])
  overcomplete = over.pop('overcomplete', args.overcomplete)
  syn = config_lib.validate_synthetic(config_lib.SyntheticConfig(**{
      **BASE, **over, 'seed': 1000 + seed}))
  n_children = len(synthetic.make_ground_truth(syn).children_cd)
  atoms = config_lib.mean_active_parents(syn) * (1 + syn.parent_emission)
  k_parents = syn.n_parents
  budget = {'n1': int(overcomplete * n_children), 'k1': int(math.ceil(1.7 * atoms)),
            'K': k_parents, 'children': n_children, 'expected_l0': round(atoms, 3)}
  budget['n2'] = {'K': k_parents, '2K': 2 * k_parents, 'n1/8': max(2, budget['n1'] // 8)}
  c = compare_config.get_config('independent')  # scenes only where the family asks for them
  c.data.synthetic.update(dataclasses.asdict(syn))
  c.level1.n_latents, c.level1.k = budget['n1'], budget['k1']
  c.train.steps, c.train.batch_size, c.train.seed = args.steps, args.batch_size, seed
  c.train.log_every = 100
  c.joint.level2_start = args.steps // 2
  c.train.checkpoint_every = args.steps
  c.data.eval_rows = args.eval_rows
  c.compare.n_perm = args.n_perm
  c.compare.alphas = args.alphas
  c.update_from_flattened_dict(overrides_lib.parse_assignments(args.set))
  return c, budget


def run_family(name: str, seed: int, args) -> dict:
  """{n2 label: {method: scores}} for one family and seed (resumes: finished runs are read)."""
  from csae_jax import modes  # pylint: disable=g-import-not-at-top
  c, budget = family_config(name, seed, args)
  root = os.path.join(args.out, 'runs', name, f'seed_{seed}')
  out = {'budget': budget}
  first = None
  for label in args.n2.split(','):
    n2 = budget['n2'][label]
    wd = os.path.join(root, 'n2_' + label.replace('/', '_'))
    done = os.path.join(wd, 'compare.json')
    methods = args.methods if label == '2K' else args.methods_n2
    if os.path.exists(done):
      extend(c, wd, n2, methods, args.rescore)
    else:
      cl = c.copy_and_resolve_references()
      cl.level2.n_latents = n2
      cl.compare.methods = methods
      if first is not None:  # the same level 1: its finished stage, not a second training
        src = os.path.join(first, 'csae', 'level1')
        dst = os.path.join(wd, 'csae', 'level1')
        if os.path.isdir(src) and not os.path.exists(dst):
          shutil.copytree(src, dst)
      t0 = time.perf_counter()
      modes.run(cl, wd)
      print(f'  {name} seed {seed} n2={n2} ({label}): {time.perf_counter() - t0:.0f} s',
            flush=True)
    first = first or wd
    with open(done) as f:
      results = json.load(f)
    out[label] = {m: {k: r.get(k) for k in SCORES + ('level2/concepts_used',)}
                  for m, r in results.items()}
    out[label]['_n2'] = n2
  return out


def extend(c, wd: str, n2: int, methods: str, rescore: bool) -> None:
  """A finished comparison in `wd` gains the method families of `methods` it lacks (and, with
  `rescore`, re-runs its CSAE families: staged and joint), merged into its compare.json; the
  other methods' scores stay as first run.

  Every SAE stage resumes from its checkpoint: the stage hashes leave out the post-training keys
  (stages.POST_TRAINING_KEYS: the concept step's), so a changed concept step re-runs only that
  step, its export and scoring, and CSAE's finished level 1 is what the added methods share."""
  from csae_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from csae_jax import modes  # pylint: disable=g-import-not-at-top
  from csae_jax.compare import report  # pylint: disable=g-import-not-at-top
  done = os.path.join(wd, 'compare.json')
  with open(done) as f:
    before = json.load(f)
  have = {r.get('family') for r in before.values()}
  wanted = config_lib.compare_families(config_lib.CompareConfig(methods=methods))
  run = [f for f in wanted if f not in have or (rescore and f in ('csae', 'joint'))]
  if not run:
    return
  cl = c.copy_and_resolve_references()
  cl.level2.n_latents = n2
  cl.compare.methods = ','.join(run)
  t0 = time.perf_counter()
  modes.run(cl, wd)  # writes compare.json / .md of these methods alone
  with open(done) as f:
    fresh = json.load(f)
  merged = {**before, **fresh}
  merged = {m: merged[m] for m in list(before) + [m for m in fresh if m not in before]}
  report.write_json_md(wd, merged, f'Methods {", ".join(fresh)} (re-)run by benchmarks.robustness '
                       f'on the finished stages; the others as first run.', report.table(merged))
  print(f'  {wd}: {", ".join(fresh)} (re-)run in {time.perf_counter() - t0:.0f} s', flush=True)


def aggregate(per_seed: dict[int, dict]) -> dict:
  """{n2 label: {method: {score: (mean, std)}}} over seeds."""
  agg: dict = {}
  first = next(iter(per_seed.values()))
  for label in [lab for lab in ('2K', 'K', 'n1/8') if lab in first]:
    agg[label] = {}
    for m in first[label]:
      if m.startswith('_'):
        continue
      agg[label][m] = {}
      for k in SCORES:
        v = [per_seed[s][label][m][k] for s in per_seed if m in per_seed[s][label]
             and per_seed[s][label][m][k] is not None]
        v = [x for x in v if not (isinstance(x, float) and math.isnan(x))]
        agg[label][m][k] = ((float(np.mean(v)), float(np.std(v)), len(v)) if v
                            else (math.nan, math.nan, 0))
  return agg


def _fmt(ms, seeds: int | None = None) -> str:
  """mean ± std; '(n seeds)' when fewer seeds than the run's have this number."""
  m, s, n = (tuple(ms) + (None,))[:3]
  if math.isnan(m):
    return '—'
  few = f' ({n} seed{"s" if n != 1 else ""})' if seeds and n is not None and n < seeds else ''
  return f'{m:.3f} ± {s:.3f}{few}'


def markdown(results: dict, args, wall_s: float) -> str:
  fams = list(results)
  n_seeds = len(str(args.seeds).split(','))
  fmt = lambda ms: _fmt(ms, n_seeds)
  lines = [f'# Robustness suite\n',
           f'Command: `{" ".join(["python -m benchmarks.robustness"] + sys.argv[1:])}`; '
           f'seeds {args.seeds}; {args.steps} steps x {args.batch_size}; wall {wall_s / 60:.0f} '
           f'min. Mean ± std over seeds. Recovered: fraction of true children with an alive '
           f'level-1 row at cosine > 0.8; ARI: of the recovered children\'s concepts vs their '
           f'true parents.' + (' Re-scored (`--rescore`): the CSAE methods\' concept step and '
                               'scores re-run on stages a first run of the same command without '
                               '`--rescore` trained; the wall time is the re-score\'s.'
                               if getattr(args, 'rescore', False) else '') + '\n']
  lines += ['## Level 1 (children recovered / mean max cosine)\n',
            '| family | n1 / k / K / children | CSAE level 1 | TopK + AuxK reference | joint | '
            'Matryoshka |', '|---|---|---|---|---|---|']
  if not all('2K' in results[f]['agg'] for f in fams):
    fams_2k = []
  else:
    fams_2k = fams
  for f in fams_2k:
    a, b = results[f]['agg']['2K'], results[f]['budget']
    cell = lambda m: (f'{fmt(a[m][SCORES[0]])} / {a[m][SCORES[1]][0]:.3f}' if m in a else '—')
    joint = next((m for m in a if m.startswith('csae_joint')), '')
    lines.append(f'| {f} | {b["n1"]} / {b["k1"]} / {b["K"]} / {b["children"]} | {cell("csae")} '
                 f'| {cell("topk_reference")} | {cell(joint)} | {cell("matryoshka_cosine")} |')
  methods = [m for m in results[fams[0]]['agg'].get('2K', {}) if m != '_n2']
  lines += ['\n## Grouping ARI at n2 = 2K\n', '| family | ' + ' | '.join(methods) + ' |',
            '|---|' + '---|' * len(methods)]
  for f in fams_2k:
    a = results[f]['agg']['2K']
    lines.append(f'| {f} | ' + ' | '.join(fmt(a[m][SCORES[2]]) if m in a else '—'
                                         for m in methods) + ' |')
  lines += ['\n## CSAE ARI at n2 = K, 2K, n1/8 (best clustering of the same rows beside it)\n',
            '| family | CSAE K | CSAE 2K | CSAE n1/8 | best clustering K | 2K | n1/8 |',
            '|---|---|---|---|---|---|---|']
  for f in fams:
    row = [f]
    best = []
    for label in ('K', '2K', 'n1/8'):
      a = results[f]['agg'].get(label, {})
      row.append(fmt(a['csae'][SCORES[2]]) if 'csae' in a else '—')
      cl = [(a[m][SCORES[2]], m) for m in ('agglomerative', 'spectral', 'kmeans') if m in a]
      b = max(cl, key=lambda x: -1 if math.isnan(x[0][0]) else x[0][0]) if cl else None
      best.append(f'{fmt(b[0])} ({b[1]})' if b else '—')
    lines.append('| ' + ' | '.join(row + best) + ' |')
  return '\n'.join(lines) + '\n'


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fams = [f for f in results if '2K' in results[f]['agg']]
  if not fams:
    return
  methods = [m for m in results[fams[0]]['agg']['2K']]
  ari = np.array([[results[f]['agg']['2K'].get(m, {SCORES[2]: (np.nan, 0)})[SCORES[2]][0]
                   for m in methods] for f in fams])
  rec = np.array([[results[f]['agg']['2K'][m][SCORES[0]][0]
                   for m in ('csae', 'topk_reference') if m in results[f]['agg']['2K']]
                  for f in fams])
  nan = {SCORES[2]: (np.nan, 0.0)}
  n2s = np.array([[results[f]['agg'].get(lab, {}).get('csae', nan)[SCORES[2]][0]
                   for lab in ('K', '2K', 'n1/8')] for f in fams])
  fig, axes = plt.subplots(1, 3, figsize=(18, 0.38 * len(fams) + 2.5),
                           gridspec_kw={'width_ratios': [len(methods), 2, 3]})
  for ax, mat, cols, title in ((axes[0], ari, methods, 'grouping ARI at n2 = 2K'),
                               (axes[1], rec, ['CSAE L1', 'TopK ref'][:rec.shape[1]],
                                'children recovered'),
                               (axes[2], n2s, ['K', '2K', 'n1/8'], 'CSAE ARI by n2')):
    im = ax.imshow(mat, vmin=0, vmax=1, cmap='viridis', aspect='auto')
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha='right', fontsize=8)
    ax.set_yticks(range(len(fams)), fams if ax is axes[0] else [''] * len(fams), fontsize=8)
    for i in range(mat.shape[0]):
      for j in range(mat.shape[1]):
        if not np.isnan(mat[i, j]):
          ax.text(j, i, f'{mat[i, j]:.2f}', ha='center', va='center', fontsize=6,
                  color='w' if mat[i, j] < 0.6 else 'k')
    ax.set_title(title)
  fig.colorbar(im, ax=axes, shrink=0.6)
  fig.savefig(path, dpi=110, bbox_inches='tight')
  plt.close(fig)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--families', default=','.join(FAMILIES), help='comma-separated')
  p.add_argument('--seeds', default='0,1')
  p.add_argument('--methods', default=METHODS_2K, help='compare.methods at n2 = 2K')
  p.add_argument('--methods_n2', default=METHODS_N2, help='compare.methods at n2 = K, n1/8')
  p.add_argument('--n2', default='2K,K,n1/8', help='n2 settings (2K first: it has --methods)')
  p.add_argument('--steps', type=int, default=4000)
  p.add_argument('--batch_size', type=int, default=1024)
  p.add_argument('--overcomplete', type=float, default=4.0, help='n1 / true children')
  p.add_argument('--eval_rows', type=int, default=16384)
  p.add_argument('--n_perm', type=int, default=20, help='HMS null permutations (not reported)')
  p.add_argument('--alphas', default='0.1', help='joint CSAE alphas (compare.alphas)')
  p.add_argument('--set', action='append', default=[],
                 help='config override KEY=VALUE applied to every run (a variant)')
  p.add_argument('--out', default='benchmarks/results/robustness')
  p.add_argument('--rescore', action='store_true',
                 help='finished comparisons: re-run only their CSAE methods on the finished '
                      'stages (a changed concept step) and merge the new scores')
  args = p.parse_args(argv)
  os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=1')
  fams = [f.strip() for f in args.families.split(',') if f.strip()]
  unknown = sorted(set(fams) - set(FAMILIES))
  if unknown:
    raise SystemExit(f'unknown families {unknown}; known: {sorted(FAMILIES)}')
  seeds = [int(s) for s in args.seeds.split(',')]
  os.makedirs(args.out, exist_ok=True)
  t0 = time.perf_counter()
  results = {}
  for f in fams:
    per_seed = {s: run_family(f, s, args) for s in seeds}
    results[f] = {'budget': per_seed[seeds[0]]['budget'], 'per_seed': per_seed,
                  'agg': aggregate(per_seed)}
  wall = time.perf_counter() - t0
  with open(os.path.join(args.out, 'robustness.json'), 'w') as fh:
    json.dump({'args': vars(args), 'wall_s': wall, 'results': results}, fh, indent=1)
  md = markdown(results, args, wall)
  with open(os.path.join(args.out, 'robustness.md'), 'w') as fh:
    fh.write(md)
  plot(results, os.path.join(args.out, 'robustness.png'))
  print(md)


if __name__ == '__main__':
  main()
