"""Pictures of a run (matplotlib, headless): training curves, feature-density histogram."""

from __future__ import annotations

import os

import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after the headless backend is chosen)

PANELS = (('loss', 'training loss (level 1, level 2)', True),
          ('fvu', 'FVU (1 - variance explained)', True), ('l0', 'L0 (active latents)', False),
          ('dead_frac', 'dead fraction', False), ('dense_frac', 'dense fraction', False),
          ('aux', 'AuxK loss', True))


def density_histogram(density_n, path: str, title: str = 'feature density') -> str:
  """Histogram of log10(fraction of inputs each latent fires on); dead latents counted apart."""
  density_n = np.asarray(density_n)
  alive = density_n[density_n > 0]
  fig, ax = plt.subplots(figsize=(6, 3.4))
  if alive.size:
    ax.hist(np.log10(alive), bins=50, color='tab:blue')
  ax.axvline(-1, color='tab:red', ls='--', lw=1, label='dense (> 10%)')
  ax.set_xlabel('log10 firing density')
  ax.set_ylabel('latents')
  ax.set_title(f'{title}: {int((density_n == 0).sum())} dead of {density_n.size}')
  ax.legend(fontsize=8)
  fig.tight_layout()
  return save(fig, path)


def pareto(rows: list[dict], path: str, title: str = 'sweep') -> str:
  """FVU against L0, one point per SAE of a sweep (the sparsity / fidelity trade-off)."""
  fig, ax = plt.subplots(figsize=(5, 3.6))
  ax.scatter([r['l0'] for r in rows], [r['fvu'] for r in rows], c='tab:blue')
  for r in rows:
    label = ', '.join(f'{k}={r[k]:g}' for k in ('k', 'lr', 'seeds') if k in r)
    ax.annotate(label, (r['l0'], r['fvu']), fontsize=6, xytext=(3, 3),
                textcoords='offset points')
  ax.set_xlabel('L0 (held-out)')
  ax.set_ylabel('FVU (held-out)')
  ax.set_yscale('log')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return save(fig, path)


def save(fig, path: str) -> str:
  """Writes the figure atomically (a reader never sees half a PNG) and closes it."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
  return path


def training_curves(histories: dict[str, list[dict]], path: str) -> str:
  """histories: stage name -> logged metric rows (each with 'step'). Writes `path`."""
  fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
  for ax, (metric, title, log_y) in zip(axes, PANELS):
    for stage, rows in histories.items():
      for key in sorted({k for r in rows for k in r if k.endswith('/' + metric)}):
        pts = [(r['step'], r[key]) for r in rows if key in r]
        if pts:
          xs, ys = zip(*pts)
          ax.plot(xs, ys, label=f'{stage}: {key.split("/")[0]}')
    ax.set_title(title)
    ax.set_xlabel('step')
    if log_y:
      ax.set_yscale('symlog', linthresh=1e-3)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  return save(fig, path)
