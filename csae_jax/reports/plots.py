"""Training curves of every stage as one PNG (matplotlib, headless)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after the headless backend is chosen)

PANELS = (('fvu', 'FVU (1 - variance explained)', True), ('l0', 'L0 (active latents)', False),
          ('dead_frac', 'dead fraction', False), ('aux', 'AuxK loss', True))


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
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
  return path
