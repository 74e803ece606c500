"""Co-occurring concepts: how each grouping rule fares as parents co-occur in "scenes".

Real images put concepts together (dog and grass, sky and cloud). Here the synthetic parents are
paired into scenes; the second parent of a pair copies the first's on/off state with probability
c (marginals unchanged), for c in --cooccur. For each c it runs the comparison (same level 1 for
every grouping, `compare.seeds` seeds) and writes WORKDIR/scene_sweep.{json,md,png}: ARI and
HMS - null per method against c, with the oracle (true grouping of the same level-1 features).

    python -m experiments.sweeps.scene_cooccur --workdir=runs/scene_sweep
"""

import os

from absl import app, flags, logging
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from csae_jax import checkpoint as ckpt_lib  # pylint: disable=wrong-import-position
from csae_jax import modes  # pylint: disable=wrong-import-position
from experiments.configs import compare  # pylint: disable=wrong-import-position

_WORKDIR = flags.DEFINE_string('workdir', 'runs/scene_sweep', 'Where the runs go.')
_COOCCUR = flags.DEFINE_list('cooccur', ['0', '0.5', '0.9'], 'scene_cooccur values.')
_SEEDS = flags.DEFINE_string('seeds', '0,1,2', 'compare.seeds of every comparison.')
_METHODS = flags.DEFINE_string('methods', 'csae,flat,stacked,clustering,oracle',
                               'compare.methods of every comparison.')
_SMALL = flags.DEFINE_bool('small', False, 'Use the small config (quick check).')

METRICS = (('synthetic/parent_ari', 'ARI'), ('hms/minus_null', 'HMS - null'))


def run_one(c: float, workdir: str) -> dict:
  cfg = compare.get_config('small' if _SMALL.value else None)
  cfg.data.synthetic.scene_size = 2
  cfg.data.synthetic.scene_cooccur = c
  cfg.compare.methods = _METHODS.value
  cfg.compare.seeds = _SEEDS.value
  modes.run(cfg, workdir)
  return ckpt_lib.read_json(os.path.join(workdir, 'compare.json'))


def _mean_std(res: dict, method: str, key: str) -> tuple[float, float]:
  if 'mean' in res:  # several seeds
    return res['mean'][method].get(key), res['std'][method].get(key) or 0.0
  return res[method].get(key), 0.0


def main(_):
  logging.set_verbosity(logging.WARNING)
  cs = [float(c) for c in _COOCCUR.value]
  per_c = {c: run_one(c, os.path.join(_WORKDIR.value, f'cooccur_{c:g}')) for c in cs}
  first = per_c[cs[0]]
  methods = list(first['mean'] if 'mean' in first else first)
  rows = [{'method': m, 'cooccur': c, **{f'{k}_{s}': v for k, _ in METRICS
                                         for s, v in zip(('mean', 'std'), _mean_std(r, m, k))}}
          for c, r in per_c.items() for m in methods]
  head = '| method | ' + ' | '.join(f'{label} (c = {c:g})' for _, label in METRICS for c in cs)
  lines = [head + ' |', '|---|' + '---|' * (len(METRICS) * len(cs))]
  for m in methods:
    cells = []
    for k, _ in METRICS:
      for c in cs:
        mu, sd = _mean_std(per_c[c], m, k)
        cells.append('—' if mu is None else f'{mu:.3f} ± {sd:.3f}')
    lines.append(f'| {m} | ' + ' | '.join(cells) + ' |')
  print('\n'.join(lines))
  os.makedirs(_WORKDIR.value, exist_ok=True)
  ckpt_lib.write_json_atomic(os.path.join(_WORKDIR.value, 'scene_sweep.json'), rows)
  ckpt_lib.write_lines_atomic(os.path.join(_WORKDIR.value, 'scene_sweep.md'), lines)

  fig, axes = plt.subplots(1, len(METRICS), figsize=(5.5 * len(METRICS), 4))
  for ax, (k, label) in zip(axes, METRICS):
    for m in methods:
      ms = np.array([_mean_std(per_c[c], m, k) for c in cs], dtype=float)
      ax.errorbar(cs, ms[:, 0], yerr=ms[:, 1], marker='o', capsize=3, label=m,
                  linestyle='--' if m == 'oracle' else '-')
    ax.set_xlabel('scene co-occurrence c (P(paired parent copies its partner))')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle('Grouping vs co-occurring parents (synthetic, mean ± std over seeds)')
  fig.tight_layout()
  fig.savefig(os.path.join(_WORKDIR.value, 'scene_sweep.png'), dpi=120)


if __name__ == '__main__':
  app.run(main)
