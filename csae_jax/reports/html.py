"""The run report: `<workdir>/report/index.html`, one self-contained page per run.

It opens from the file system with no server and no network: the CSS and JS are inlined
(report.css, report.js beside this module), the pictures are embedded as base64 PNG, and the
thumbnails of an image run lie beside the page in report/thumbs/. The concept tree's data is
embedded once as JSON; the page builds the DOM of one page of concepts at a time (report.js).

    write(workdir)          a staged / joint pipeline run (export/, histories.json)
    write_compare(workdir)  a comparison (compare.json and its plots; links to method reports)
    render(workdir)         whichever of the two the workdir holds (the report mode)

Every concept's element carries data-concept-id="<id>", every member's data-feature-id="<id>".
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
import time

import numpy as np

from csae_jax import checkpoint as ckpt_lib
from csae_jax.reports import patches, plots

_HERE = os.path.dirname(os.path.abspath(__file__))
PAGE_SIZE = 100      # concepts built as DOM at a time
TOP_IMAGES = 8       # top-activating images per feature / concept
# Images a pipeline run scans for its report's top images (one more pass over the activations);
# the report mode scans as many as its max_images says (0: all).
PIPELINE_MAX_IMAGES = 5000
PANEL_PART = 500     # feature / concept ids per panel file (report/data/)


def _asset(name: str) -> str:
  with open(os.path.join(_HERE, name)) as f:
    return f.read()


def _need(path: str, what: str) -> str:
  if not os.path.exists(path):
    raise ValueError(f'{path} is missing: the report reads {what} from it. Point '
                     f'--config.workdir_in at the --workdir of a finished pipeline or compare '
                     f'run (it holds export/ or compare.json)')
  return path


def _png(path: str) -> str:
  with open(path, 'rb') as f:
    return 'data:image/png;base64,' + base64.b64encode(f.read()).decode('ascii')


def _figure(path: str, title: str, cls: str = '') -> str:
  if not os.path.exists(path):
    return ''
  return (f'<div class="figure {cls}"><div class="sub">{html.escape(title)}</div>'
          f'<img alt="{html.escape(title)}" src="{_png(path)}"></div>')


def _value(v) -> str:
  if isinstance(v, float):
    return '—' if not math.isfinite(v) else f'{v:.4g}'
  return html.escape(str(v))


def metrics_table(metrics: dict) -> str:
  """Every scalar metric, one table per prefix (level1/, level2/, synthetic/, ...); lists and
  tables of the run stay in metrics.json."""
  groups: dict[str, list[str]] = {}
  for k, v in sorted(metrics.items()):
    if isinstance(v, (int, float, str, bool)) or v is None:
      group, _, name = k.rpartition('/')
      groups.setdefault(group or 'run', []).append(
          f'<tr><td>{html.escape(name)}</td><td>{_value(v)}</td></tr>')
  return '<div class="mgroups">' + ''.join(
      f'<table class="metrics"><caption>{html.escape(g)}</caption>{"".join(rows)}</table>'
      for g, rows in groups.items()) + '</div>'


def coherence(w1_nd: np.ndarray, members: list[int]) -> float | None:
  """Mean pairwise cosine of the members' level-1 decoder rows (None below two members):
  for unit rows, (|sum|^2 - m) / (m (m - 1)), linear in the members."""
  m = len(members)
  if m < 2:
    return None
  rows = w1_nd[np.asarray(members, np.int64)].astype(np.float64)
  rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
  s = rows.sum(0)
  return round(float((s @ s - m) / (m * (m - 1))), 4)


def tree_data(export_dir: str, *, tops: patches.TopImages | None = None,
              page_size: int = PAGE_SIZE) -> dict:
  """The JSON the tree is built from: [id, members, weights, coherence, label] per concept."""
  hier = ckpt_lib.read_json(_need(os.path.join(export_dir, 'hierarchy.json'),
                                  'the concept tree'))
  w1 = np.load(_need(os.path.join(export_dir, 'level1_decoder.npy'),
                     'the level-1 decoder rows (coherence)'), mmap_mode='r')
  concepts = []
  for c in hier['concepts']:
    label = ''
    if tops is not None and tops.concept_labels.get(c['id']):
      label = tops.concept_labels[c['id']][0][0]
    concepts.append([int(c['id']), [int(m) for m in c['members']],
                     [round(float(w), 3) for w in c.get('weights', [])],
                     coherence(w1, c['members']), label])
  data = {'concepts': concepts, 'n_features': int(w1.shape[0]),
          'unassigned': [int(u) for u in hier.get('unassigned', [])],
          'alive': len(hier.get('alive', [])), 'page_size': int(page_size)}
  if tops is not None:  # the panels themselves go to report/data/ (write_panels)
    data.update(flabel={f: lab[0][0] for f, lab in tops.feature_labels.items() if lab},
                images=tops.images, grid=list(tops.grid),
                panels={'part': PANEL_PART, 'f': _parts(tops.features),
                        'c': _parts(tops.concepts)})
  return data


def _parts(top: dict[int, list]) -> list[int]:
  return sorted({int(i) // PANEL_PART for i in top})


def write_panels(report_dir: str, tops: patches.TopImages) -> None:
  """report/data/{f,c}<part>.js: the top images and labels of PANEL_PART consecutive feature
  (concept) ids per file, loaded by the page only when one of them is opened. Script files, not
  JSON: a page opened from file:// may not fetch() beside itself, but it may load a script."""
  out = os.path.join(report_dir, 'data')
  if os.path.isdir(out):
    shutil.rmtree(out)  # parts of an earlier render must not outlive it
  os.makedirs(out)
  for kind, top, labels in (('f', tops.features, tops.feature_labels),
                            ('c', tops.concepts, tops.concept_labels)):
    for part in _parts(top):
      obj = {i: [top[i], labels.get(i, [])] for i in sorted(top)
             if int(i) // PANEL_PART == part}
      blob = json.dumps(obj, separators=(',', ':')).replace('</', '<\\/')
      with open(os.path.join(out, f'{kind}{part}.js'), 'w') as f:
        f.write(f'csaeReportPart("{kind}",{part},{blob});\n')


def _tree_section(data: dict) -> str:
  n_members = sum(len(c[1]) for c in data['concepts'])
  images = ' Click a feature for its top-activating images (patch heat map over each); ' \
           'open a concept for its own.' if data.get('grid') else ''
  return f'''<h2 id="concepts">Concept tree</h2>
<p class="sub">{len(data["concepts"])} level-2 concepts over {n_members} level-1 features
({data["alive"]} alive of {data["n_features"]}; {len(data["unassigned"])} alive features in no
concept). Coherence: mean pairwise cosine of the members' decoder rows. Search by id (12, c12,
f12) or label; the view is kept in the URL (#q=12&amp;open=3&amp;feature=17).{images}</p>
<div class="controls">
  <input type="search" id="q" placeholder="concept / feature id or label" aria-label="search">
  <select id="sort" aria-label="sort">
    <option value="size:desc">size (largest first)</option>
    <option value="size:asc">size (smallest first)</option>
    <option value="coherence:desc">coherence (highest first)</option>
    <option value="coherence:asc">coherence (lowest first)</option>
    <option value="id:asc">id</option>
    <option value="id:desc">id (descending)</option>
  </select>
  <button id="expand">expand page</button><button id="collapse">collapse all</button>
  <span class="pager"><button id="prev">&larr;</button><button id="next">&rarr;</button></span>
  <span class="count" id="count"></span>
</div>
<div id="tree"></div>'''


def _page(title: str, subtitle: str, body: str, data: dict) -> str:
  # "</" inside the JSON would close the script element early
  blob = json.dumps(data, separators=(',', ':')).replace('</', '<\\/')
  return f'''<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_asset("report.css")}</style></head>
<body><h1>{html.escape(title)}</h1><p class="sub">{subtitle}</p>
{body}
<script type="application/json" id="report-data">{blob}</script>
<script>{_asset("report.js")}</script>
</body></html>
'''


def _write_page(report_dir: str, text: str) -> str:
  os.makedirs(report_dir, exist_ok=True)
  path = os.path.join(report_dir, 'index.html')
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(tmp, path)  # a reader never sees half a page
  return path


def data_path(workdir: str) -> str:
  """The data.path the run trained on ('' for the built-in synthetic data), from the manifest
  of its first stage."""
  for stage in ('level1', 'joint'):
    p = os.path.join(workdir, stage, 'manifest.json')
    if os.path.exists(p):
      return ckpt_lib.read_json(p).get('data', {}).get('path', '') or ''
  return ''


def _captions(workdir: str, limit: int = 200) -> str:
  """Steering captions of <workdir>/steer/ (experiments/configs/steer.py), when present."""
  path = os.path.join(workdir, 'steer', 'captions.jsonl')
  if not os.path.exists(path):
    return ''
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  cols = [k for k in ('image', 'arm', 'concept', 'sign', 'value', 'mode', 'text')
          if any(k in r for r in rows)]
  body = ''.join('<tr>' + ''.join(f'<td>{_value(r.get(k, ""))}</td>' for k in cols) + '</tr>'
                 for r in rows[:limit])
  return (f'<h2 id="steering">Steering captions</h2><p class="sub">{len(rows)} captions '
          f'(first {min(limit, len(rows))}; all in steer/captions.jsonl)</p>'
          f'<table class="captions"><tr>' + ''.join(f'<th>{c}</th>' for c in cols) + '</tr>'
          + body + '</table>')


def write(workdir: str, *, n_top: int = TOP_IMAGES, max_images: int = 0,
          page_size: int = PAGE_SIZE, images: bool = True, title: str = '',
          tops: patches.TopImages | None = None, harvest: str = '') -> str:
  """report/index.html of a pipeline run (or of any folder holding an export/); returns its
  path. images: top-activating images when the run trained on a harvest (one more pass over
  its activations; max_images > 0 caps the images scanned); tops: ones computed already;
  harvest: the harvest folder of a run with no stage manifest (a comparison's baseline)."""
  workdir = os.path.abspath(workdir)
  export_dir = os.path.join(workdir, 'export')
  report_dir = os.path.join(workdir, 'report')
  metrics = ckpt_lib.read_json(_need(os.path.join(export_dir, 'metrics.json'), 'the metrics'))
  hier = ckpt_lib.read_json(_need(os.path.join(export_dir, 'hierarchy.json'),
                                  'the concept tree'))
  harvest = harvest or data_path(workdir)
  if tops is None and images and patches.is_harvest(harvest):
    tops = patches.top_images(export_dir, harvest, hier['concepts'], report_dir, n_top=n_top,
                              max_images=max_images)
  data = tree_data(export_dir, tops=tops, page_size=page_size)
  if tops is not None:
    write_panels(report_dir, tops)
  curves = os.path.join(export_dir, 'curves.png')
  hist = os.path.join(workdir, 'histories.json')
  if not os.path.exists(curves) and os.path.exists(hist):  # a run from before the curves
    curves = plots.training_curves(ckpt_lib.read_json(hist),
                                   os.path.join(report_dir, 'curves.png'))
  body = (f'<h2 id="metrics">Metrics</h2>{metrics_table(metrics)}'
          f'<h2 id="training">Training</h2>'
          + (_figure(curves, 'training curves (histories.json)') or
             '<p class="muted">no training curves (no histories.json)</p>')
          + _figure(os.path.join(export_dir, 'level1_density.png'),
                    'level-1 feature density on held-out inputs', 'small')
          + _tree_section(data) + _captions(workdir))
  data_line = f'data: {html.escape(harvest)}' if harvest else 'data: built-in synthetic hierarchy'
  subtitle = (f'{html.escape(workdir)} · mode {html.escape(str(metrics.get("mode", "?")))} · '
              f'{data_line} · config {html.escape(str(metrics.get("config_hash", ""))[:12])}')
  return _write_page(report_dir, _page(title or f'CSAE run report: {os.path.basename(workdir)}',
                                       subtitle, body, data))


def _compare_table(results: dict, std: dict | None) -> str:
  from csae_jax.compare import report as compare_report  # pylint: disable=g-import-not-at-top
  cols = [c for c in compare_report.COLUMNS if any(c[0] in r for r in results.values())]
  head = '<tr><th>method</th>' + ''.join(f'<th>{html.escape(c[1])}</th>' for c in cols) + '</tr>'
  rows = []
  for name, r in results.items():
    cells = []
    for key, _, fmt in cols:
      cell = compare_report.format_value(r.get(key), fmt)  # as compare.md
      sd = (std or {}).get(name, {}).get(key)
      if sd is not None and fmt not in ('', 'd'):
        cell += f' ± {format(sd, fmt)}'
      cells.append(f'<td>{html.escape(cell)}</td>')
    rows.append(f'<tr data-method="{html.escape(name)}"><td>{html.escape(name)}</td>'
                + ''.join(cells) + '</tr>')
  return '<table class="compare">' + head + ''.join(rows) + '</table>'


def write_compare(workdir: str, *, rerender: bool = False, **kw) -> str:
  """report/index.html of a comparison: its table, its plots, and a link to each method's own
  report. A baseline's report is written here, with the top images of its features and
  concepts on a harvest (its export's level-1 SAE over the harvest the CSAE methods name; the
  first PIPELINE_MAX_IMAGES images unless kw sets max_images); a CSAE method's own pipeline
  run wrote its report already, rewritten only with rerender=True (the report mode); kw:
  `write`'s options for those."""
  workdir = os.path.abspath(workdir)
  obj = ckpt_lib.read_json(_need(os.path.join(workdir, 'compare.json'), 'the comparison'))
  seeds = obj.get('seeds')
  results, std = (obj['mean'], obj['std']) if seeds else (obj, None)
  # the data every method trained on: baselines keep no stage manifest, the CSAE runs do
  harvest = next((p for p in (data_path(os.path.join(workdir, n)) for n in results) if p), '')
  links = []
  if seeds:
    for s in seeds:
      sub = os.path.join(workdir, f'seed_{s}')
      if os.path.exists(os.path.join(sub, 'compare.json')):
        write_compare(sub, rerender=rerender, **kw)
        links.append((f'seed {s}', f'seed_{s}/report/index.html'))
  else:
    for name in results:
      sub = os.path.join(workdir, name)
      if not os.path.exists(os.path.join(sub, 'export', 'hierarchy.json')):
        continue
      pipeline_run = os.path.exists(os.path.join(sub, 'histories.json'))
      if rerender or not pipeline_run:
        opts = kw if pipeline_run else {'max_images': PIPELINE_MAX_IMAGES, **kw,
                                        'harvest': harvest}
        write(sub, **opts, title=f'{name} (comparison {os.path.basename(workdir)})')
      links.append((name, f'{name}/report/index.html'))
  link_html = ''.join(f'<li><a href="{html.escape(href)}">{html.escape(text)}</a></li>'
                      for text, href in links)
  body = (f'<h2 id="comparison">Comparison</h2>{_compare_table(results, std)}'
          + _figure(os.path.join(workdir, 'compare_hms.png'), 'HMS per concept vs the null')
          + _figure(os.path.join(workdir, 'compare_recon.png'),
                    'level-1 reconstruction vs sparsity')
          + (f'<h2 id="methods">Reports</h2><ul>{link_html}</ul>' if links else ''))
  seeds_line = f'mean ± std over seeds {seeds}' if seeds else 'one seed'
  return _write_page(os.path.join(workdir, 'report'),
                     _page(f'CSAE comparison: {os.path.basename(workdir)}',
                           f'{html.escape(workdir)} · {len(results)} methods · {seeds_line}',
                           body, {}))


def render(workdir: str, **kw) -> str:
  """Re-renders the report of an existing run (pipeline or comparison) without training."""
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise ValueError(f'workdir_in {workdir!r} does not exist; pass the --workdir of a finished '
                     f'run as --config.workdir_in=WD')
  if os.path.exists(os.path.join(workdir, 'compare.json')):
    return write_compare(workdir, rerender=True, **kw)
  return write(workdir, **kw)


def run(cd) -> dict:
  """stage='report' (experiments/configs/report.py): re-renders <workdir_in>/report/."""
  from csae_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = cd if isinstance(cd, config_lib.ReportConfig) else config_lib.report_from_config_dict(cd)
  t0 = time.perf_counter()
  path = render(cfg.workdir_in, n_top=cfg.top_images, max_images=cfg.max_images,
                page_size=cfg.page_size, images=cfg.images)
  return {'mode': 'report', 'report': path, 'bytes': os.path.getsize(path),
          'wall_s': round(time.perf_counter() - t0, 2)}
