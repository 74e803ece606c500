"""Joint-mode collapse sweep: which (alpha, level-2 start, k annealing, stop-gradient) keep
level 1 intact? Runs the pipeline for each setting on the default synthetic data and prints a
markdown table (also written to WORKDIR/joint_sweep.md and .json).

    python -m experiments.sweeps.joint_collapse --workdir=runs/joint_sweep [--small]
"""

import itertools
import os

from absl import app, flags, logging

from csae_jax import checkpoint as ckpt_lib
from csae_jax import modes
from experiments.configs import csae

_WORKDIR = flags.DEFINE_string('workdir', 'runs/joint_sweep', 'Where the runs go.')
_SMALL = flags.DEFINE_bool('small', False, 'Use the small config (quick check).')

COLUMNS = ('level1/variance_explained', 'level1/alive', 'synthetic/child_mcc',
           'synthetic/parent_ari', 'level2/variance_explained', 'level2/largest_concept_share',
           'level2/near_duplicate_sibling_frac', 'level2/intra_concept_cos', 'level2/collapsed')


def settings():
  yield 'staged', dict(mode='staged')
  for alpha, start, sg in itertools.product((1.0, 0.1, 0.01), (0.5, 0.9), ('none',)):
    yield f'joint a={alpha} start={start}', dict(mode='joint', alpha=alpha, start=start, sg=sg)
  yield 'joint a=1 start=0.5 partial', dict(mode='joint', alpha=1.0, start=0.5, sg='partial')
  yield 'joint a=1 start=0.5 bilateral', dict(mode='joint', alpha=1.0, start=0.5, sg='bilateral')
  yield 'joint a=0.1 start=0.5 k-anneal', dict(mode='joint', alpha=0.1, start=0.5, sg='none',
                                               anneal=0.1)


def main(_):
  logging.set_verbosity(logging.WARNING)
  rows = []
  for name, s in settings():
    c = csae.get_config('small' if _SMALL.value else None)
    c.mode = s['mode']
    if s['mode'] == 'joint':
      c.joint.alpha = s['alpha']
      c.joint.level2_start = int(s['start'] * c.train.steps)
      c.joint.stop_gradient = s['sg']
      if 'anneal' in s:
        c.level1.k_anneal_frac = s['anneal']
    wd = os.path.join(_WORKDIR.value, name.replace(' ', '_').replace('=', ''))
    m = modes.run(c, wd)
    rows.append({'setting': name, **{k: m[k] for k in COLUMNS}})
  lines = ['| setting | ' + ' | '.join(k.split('/')[-1] for k in COLUMNS) + ' |',
           '|' + '---|' * (len(COLUMNS) + 1)]
  for r in rows:
    cells = [f'{r[k]:.3f}' if isinstance(r[k], float) else str(r[k]) for k in COLUMNS]
    lines.append(f'| {r["setting"]} | ' + ' | '.join(cells) + ' |')
  table = '\n'.join(lines)
  print(table)
  ckpt_lib.write_json_atomic(os.path.join(_WORKDIR.value, 'joint_sweep.json'), rows)
  with open(os.path.join(_WORKDIR.value, 'joint_sweep.md'), 'w') as f:
    f.write(table + '\n')


if __name__ == '__main__':
  app.run(main)
