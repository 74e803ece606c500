"""Issue 10's acceptance measurement: a hierarchy the defaults were never tuned on, given as files.

    python -m benchmarks.unseen_hierarchy --out=/tmp/unseen          # data + the run (~1 h, 2 cores)
    python -m benchmarks.unseen_hierarchy --out=/tmp/unseen --seed=8 # another draw of the same kind

Writes <out>/data/ (240,000 rows of d = 192, as .npy shards, with its ground_truth.npz beside
them): 20 parents with 3 to 10 children each, pairs of parents at cosine 0.5, children at
cosine 0.64 to their parent, a Poisson number of active parents per row (mean 1.8), the parent's
own direction in 30% of its activations, log-normal magnitudes (sigma 0.5), anisotropic noise
(std 0.02 to 0.08 across dimensions). Then runs, as a user would, the command of the issue:

    python -m experiments.run --config=experiments/configs/csae.py --config.data.path=<out>/data \
      --config.mode=staged --config.level1.n_latents=512 --config.level1.k=4 \
      --config.level2.n_latents=64 --config.level2.k=1 --config.train.steps=16000 \
      --config.train.batch_size=1024 --workdir=<out>/run

The run scores itself against ground_truth.npz (metrics.json: synthetic/children_recovered,
synthetic/parent_ari_recovered, ...); this script prints those and writes <out>/unseen.json.
--extra passes more overrides (e.g. --extra=--config.train.steps=4000 for a quick look).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

N_ROWS = 240_000
KNOBS = dict(d=192, n_parents=20, n_children=3, n_children_max=10, child_parent_cos=0.64,
             parent_corr=0.5, active_count='poisson', mean_active=1.8, parent_emission=0.3,
             log_mag_std=0.5, noise_std=0.02, noise_std_max=0.08)
RUN_FLAGS = ['--config=experiments/configs/csae.py', '--config.mode=staged',
             '--config.level1.n_latents=512', '--config.level1.k=4',
             '--config.level2.n_latents=64', '--config.level2.k=1',
             '--config.train.steps=16000', '--config.train.batch_size=1024']
REPORT = ('synthetic/children_recovered', 'synthetic/child_mean_max_cos',
          'synthetic/parent_ari_recovered', 'synthetic/parent_ari', 'level1/variance_explained',
          'level1/alive', 'level2/effective_concepts')


def write_data(out_dir: str, seed: int, n_rows: int = N_ROWS) -> dict:
  """The hierarchy's rows and ground truth in out_dir (kept when already complete)."""
  from csae_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from csae_jax.sources import synthetic  # pylint: disable=g-import-not-at-top
  cfg = config_lib.SyntheticConfig(**KNOBS, seed=seed)
  truth_path = os.path.join(out_dir, synthetic.GROUND_TRUTH_FILE)
  if not os.path.exists(truth_path):  # written last: its presence marks a complete export
    synthetic.SyntheticSource(cfg, batch_size=1024, seed=seed).write(out_dir, n_rows)
  branching = synthetic.branching(cfg)
  return {'n_rows': n_rows, 'children': int(branching.sum()),
          'branching': branching.tolist(), **KNOBS, 'seed': seed}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--out', required=True)
  p.add_argument('--seed', type=int, default=7, help='the hierarchy and its rows')
  p.add_argument('--extra', action='append', default=[], help='more experiments.run flags')
  args = p.parse_args(argv)
  data, wd = os.path.join(args.out, 'data'), os.path.join(args.out, 'run')
  t0 = time.perf_counter()
  info = write_data(data, args.seed)
  print(f'data: {data} ({info["children"]} children of {KNOBS["n_parents"]} parents, '
        f'{time.perf_counter() - t0:.0f} s)', flush=True)
  cmd = [sys.executable, '-m', 'experiments.run', *RUN_FLAGS, f'--config.data.path={data}',
         f'--workdir={wd}', *args.extra]
  print(' '.join(cmd), flush=True)
  t1 = time.perf_counter()
  subprocess.run(cmd, check=True)
  wall = time.perf_counter() - t1
  with open(os.path.join(wd, 'export', 'metrics.json')) as f:
    metrics = json.load(f)
  result = {'data': info, 'command': cmd, 'run_wall_s': round(wall, 1),
            **{k: metrics.get(k) for k in REPORT}}
  with open(os.path.join(args.out, 'unseen.json'), 'w') as f:
    json.dump(result, f, indent=1)
  for k in REPORT:
    print(f'{k:36s} {metrics.get(k)}')
  print(f'run wall time {wall:.0f} s')


if __name__ == '__main__':
  main()
