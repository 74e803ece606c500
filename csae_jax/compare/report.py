"""The comparison's outputs: compare.json (every method's scores), compare.md (the table) and
two pictures (per-concept HMS distributions; level-1 reconstruction vs sparsity)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (backend first)
import numpy as np  # noqa: E402

from csae_jax import checkpoint as ckpt_lib  # noqa: E402

# (metric key, column title, format); a column is shown when some method has the key.
COLUMNS = (
    ('level1/variance_explained', 'L1 var. expl.', '.3f'),
    ('level1/l0', 'L1 L0', '.2f'),
    ('level2/concepts_ge2', 'concepts >= 2', 'd'),
    ('level2/coverage', 'coverage', '.2f'),
    ('hms/mean', 'HMS', '.3f'),
    ('hms/minus_null', 'HMS - null', '.3f'),
    ('hms/p_value', 'p', '.3f'),
    ('taxonomy/minus_null', 'taxonomy - null', '.3f'),
    ('synthetic/parent_ari', 'ARI', '.3f'),
    ('synthetic/parent_nmi', 'NMI', '.3f'),
    ('synthetic/child_mcc', 'child MCC', '.3f'),
    ('synthetic/parent_mcc', 'parent MCC', '.3f'),
    ('synthetic/concept_centroid_mcc', 'centroid MCC', '.3f'),
    ('synthetic/sibling_f1', 'sibling F1', '.3f'),
    ('synthetic/parent_detection_f1', 'parent-det. F1', '.3f'),
    ('parent_child/p_parent_given_child_mean', 'P(parent|child)', '.3f'),
    ('parent_child/hamming_mean', 'Hamming', '.3f'),
    ('level2/intra_concept_cos', 'intra cos', '.3f'),
    ('level2/collapsed', 'collapsed', ''),
)


def format_value(v, fmt: str) -> str:
  if v is None:
    return '—'
  if isinstance(v, bool) or not fmt:
    return str(v)
  if fmt == 'd':
    return str(int(v))
  return format(float(v), fmt)


def table(results: dict[str, dict], std: dict[str, dict] | None = None) -> str:
  """Markdown table; with `std`, cells read mean +- std (over seeds)."""
  cols = [c for c in COLUMNS if any(c[0] in r for r in results.values())]
  lines = ['| method | ' + ' | '.join(c[1] for c in cols) + ' |',
           '|---|' + '---|' * len(cols)]
  for name, r in results.items():
    cells = []
    for k, _, f in cols:
      cell = format_value(r.get(k), f)
      sd = (std or {}).get(name, {}).get(k)
      if sd is not None and f not in ('', 'd'):
        cell += f' ± {format(sd, f)}'
      elif sd is not None and f == 'd':
        cell = f'{r[k]:.1f}'
      cells.append(cell)
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def aggregate(per_seed: dict[int, dict[str, dict]]) -> tuple[dict, dict]:
  """Mean and std over seeds of every numeric metric of every method (None where a seed lacks
  it, e.g. HMS with no scorable concept)."""
  methods = list(next(iter(per_seed.values())))
  mean, std = {}, {}
  for m in methods:
    keys = sorted({k for r in per_seed.values() for k, v in r[m].items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
    mean[m], std[m] = {'family': per_seed[next(iter(per_seed))][m].get('family')}, {}
    for k in keys:
      vals = [r[m].get(k) for r in per_seed.values()]
      vals = np.array([v for v in vals if isinstance(v, (int, float))], np.float64)
      mean[m][k] = float(vals.mean()) if len(vals) else None
      std[m][k] = float(vals.std(ddof=1)) if len(vals) > 1 else None
    flags = [r[m].get('level2/collapsed') for r in per_seed.values()]
    mean[m]['level2/collapsed'] = f'{sum(bool(f) for f in flags)}/{len(flags)}'
  return mean, std


def write_seeds(workdir: str, per_seed: dict, mean: dict, std: dict, header: str) -> None:
  write_json_md(workdir, {'seeds': list(per_seed), 'mean': mean, 'std': std,
                           'per_seed': {str(s): r for s, r in per_seed.items()}},
                 header, table(mean, std))


def write_json_md(workdir: str, obj: dict, header: str, md_table: str) -> None:
  ckpt_lib.write_json_atomic(os.path.join(workdir, 'compare.json'), obj)
  md = (header + '\n\n' if header else '') + md_table + '\n'
  ckpt_lib.write_lines_atomic(os.path.join(workdir, 'compare.md'), md.splitlines())


def write(workdir: str, results: dict[str, dict], per_concept: dict[str, np.ndarray],
          header: str = '') -> None:
  write_json_md(workdir, results, header, table(results))
  hms_distributions(per_concept, os.path.join(workdir, 'compare_hms.png'),
                    {m: r.get('hms/null_mean') for m, r in results.items()})
  recon_vs_sparsity(results, os.path.join(workdir, 'compare_recon.png'))


def hms_distributions(per_concept: dict[str, np.ndarray], path: str,
                      null_mean: dict[str, float | None] | None = None) -> None:
  """Box per method (triangle: mean) with the mean of its size-matched null (red x)."""
  names = [n for n, v in per_concept.items() if len(v)]
  fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4.5))
  if names:
    ax.boxplot([per_concept[n] for n in names], showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=35, ha='right')
    nulls = [(i + 1, (null_mean or {}).get(n)) for i, n in enumerate(names)]
    nulls = [(x, y) for x, y in nulls if y is not None]
    if nulls:
      ax.scatter(*zip(*nulls), marker='x', color='red', zorder=3, label='null mean')
      ax.legend(loc='lower left', fontsize=8)
  ax.set_ylabel('HMS per concept')
  ax.set_title('Hierarchy coherence per concept (>= 2 fired children) vs the random-partition null')
  ax.grid(axis='y', alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def recon_vs_sparsity(results: dict[str, dict], path: str) -> None:
  fig, ax = plt.subplots(figsize=(6, 4.5))
  seen = set()
  for name, r in results.items():
    if 'level1/l0' not in r:
      continue
    key = (round(r['level1/l0'], 4), round(r['level1/variance_explained'], 4))
    # methods sharing one level-1 SAE sit on one point: label it once
    label = name if key not in seen else None
    seen.add(key)
    ax.scatter(r['level1/l0'], r['level1/variance_explained'], s=40)
    if label:
      ax.annotate(label, key, textcoords='offset points', xytext=(4, 4), fontsize=8)
  ax.set_xlabel('level-1 L0 (held-out)')
  ax.set_ylabel('level-1 variance explained (held-out)')
  ax.set_title('Reconstruction vs sparsity of each method\'s level 1')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
