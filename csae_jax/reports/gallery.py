"""Static pictures of a report's image panels, for notebooks and papers (the page itself needs a
browser; a Colab cell cannot load the report's thumbnails into an inline iframe).

Reads what `html.write` wrote for an image run: the tree data embedded in `report/index.html`
(patch grid, image labels, thumbnail paths) and the panel parts `report/data/{f,c}<part>.js`;
draws each feature's or concept's top images with the patches it fires on as a heat map over
the thumbnail, as the page's panel does.
"""

from __future__ import annotations

import json
import os

import numpy as np

from csae_jax.reports import plots

_DATA_TAG = '<script type="application/json" id="report-data">'


def report_data(report_dir: str) -> dict:
  """The JSON the report's page is built from (html.tree_data)."""
  path = os.path.join(report_dir, 'index.html')
  if not os.path.exists(path):
    raise ValueError(f'{path} is missing: render the report first (python -m experiments.run '
                     f'--config=experiments/configs/report.py --config.workdir_in=WD)')
  with open(path, encoding='utf-8') as f:
    page = f.read()
  start = page.find(_DATA_TAG)
  if start < 0:
    raise ValueError(f'{path} has no report-data script: not a csae_jax report')
  start += len(_DATA_TAG)
  return json.loads(page[start:page.index('</script>', start)])


def panels(report_dir: str, kind: str, ids: list[int]) -> dict[int, list]:
  """id -> [[image, score, patch cells, quantised codes], ...] from the report's panel parts
  (kind 'f': level-1 features, 'c': concepts); ids without top images are left out."""
  data = report_data(report_dir)
  if 'panels' not in data:
    raise ValueError(f'{report_dir} has no image panels: the run did not train on a harvest '
                     f'folder (data.path with index.npz, images.json, manifest.json)')
  part = int(data['panels']['part'])
  out = {}
  for p in sorted({int(i) // part for i in ids} & set(data['panels'][kind])):
    with open(os.path.join(report_dir, 'data', f'{kind}{p}.js'), encoding='utf-8') as f:
      text = f.read()
    blob = json.loads(text[text.index('{'):text.rindex('}') + 1])  # csaeReportPart(k, p, {...})
    out.update({int(i): v[0] for i, v in blob.items() if int(i) in ids})
  return out


def _heat_rc(cells, q, grid) -> np.ndarray:
  heat = np.zeros(grid[0] * grid[1], np.float32)
  heat[np.asarray(cells, np.int64)] = np.asarray(q, np.float32) / 255.0
  return heat.reshape(grid)


def figure(report_dir: str, path: str, *, kind: str = 'concept', ids: list[int] | None = None,
           n_ids: int = 4, n_images: int = 6) -> str:
  """A PNG at `path`: one row per feature / concept (kind 'feature' | 'concept'; ids None = the
  first n_ids that have top images, concepts largest first), its top n_images images with the
  patches it fires on in red. Returns path."""
  if kind not in ('feature', 'concept'):
    raise ValueError(f"kind must be 'feature' or 'concept', not {kind!r}")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  data = report_data(report_dir)
  k = kind[0]
  if ids is None:
    order = ([c[0] for c in data['concepts']] if k == 'c' else
             sorted({m for c in data['concepts'] for m in c[1]}))
    tops = panels(report_dir, k, order)
    ids = [i for i in order if i in tops][:n_ids]
  else:
    tops = panels(report_dir, k, list(ids))
  if not ids or not any(i in tops for i in ids):
    raise ValueError(f'no {kind} of {ids or "the report"} has top images in {report_dir}')
  grid = tuple(data['grid'])
  images = {int(i): v for i, v in data['images'].items()}
  labels = {c[0]: c[4] for c in data['concepts']} if k == 'c' else data.get('flabel', {})
  fig, axes = plt.subplots(len(ids), n_images, figsize=(1.6 * n_images, 1.8 * len(ids)),
                           squeeze=False)
  for row, i in zip(axes, ids):
    for n, ax in enumerate(row):
      ax.set_axis_off()
      if n >= len(tops.get(i, [])):
        continue
      image, score, cells, q = tops[i][n]
      thumb, label = images.get(int(image), [None, None])
      if thumb:  # the page draws the heat map on grey when the pictures are gone, so does this
        ax.imshow(np.asarray(Image.open(os.path.join(report_dir, thumb))), extent=(0, 1, 1, 0))
      else:
        ax.imshow(np.full((2, 2), 0.6), cmap='gray', vmin=0, vmax=1, extent=(0, 1, 1, 0))
      heat = _heat_rc(cells, q, grid)
      rgba = np.zeros((*grid, 4), np.float32)
      rgba[..., 0] = 1.0
      rgba[..., 3] = 0.65 * heat
      ax.imshow(rgba, extent=(0, 1, 1, 0), interpolation='nearest')
      ax.set_title(f'{label or image} ({score:.2g})', fontsize=7)
    row[0].text(-0.08, 0.5, f'{kind} {i}' + (f'\n{labels.get(i) or labels.get(str(i))}'
                                             if labels.get(i) or labels.get(str(i)) else ''),
                transform=row[0].transAxes, ha='right', va='center', fontsize=8)
  fig.tight_layout()
  return plots.save(fig, path)
