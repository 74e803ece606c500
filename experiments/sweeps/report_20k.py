"""Size and open time of the run report for a 20k-feature, 10k-concept run (issue 11).

    python -m experiments.sweeps.report_20k [--out=/tmp/report_20k] [--images]

Builds the export of such a run directly (no training: a random unit decoder [20000, 64] and a
hierarchy of 10,000 concepts over 18,000 features, sizes 1..4), renders its report, and times
headless Chromium opening it: `chromium --headless --dump-dom` wall time (median of 5; the same
for a blank page is the browser's start) and the page's own time to a built tree
(performance.now() at data-ready-ms). --images adds top-image panels as a harvest run has them
(8 images per feature and concept, 12 lit patches each, 2,000 thumbnails referenced): those go
to report/data/ parts, loaded only when opened.
"""

import json
import os
import re
import shutil
import subprocess
import tempfile
import time

import numpy as np
from absl import app, flags

from csae_jax.reports import html as report_html

_OUT = flags.DEFINE_string('out', '/tmp/report_20k', 'workdir to build')
_IMAGES = flags.DEFINE_bool('images', False, 'add image-run panel data')
N1, N2, D = 20_000, 10_000, 64


def build(wd: str) -> dict:
  rng = np.random.default_rng(0)
  w = rng.standard_normal((N1, D)).astype(np.float32)
  w /= np.linalg.norm(w, axis=1, keepdims=True)
  sizes = rng.integers(1, 5, N2)
  sizes = np.maximum(1, (sizes * (0.9 * N1) / sizes.sum()).astype(int))
  perm = rng.permutation(N1)
  concepts, lo = [], 0
  for c, s in enumerate(sizes):
    members = perm[lo:lo + s].tolist()
    lo += s
    concepts.append({'id': c, 'members': members,
                     'weights': sorted(rng.uniform(0.2, 1, len(members)).round(4).tolist(),
                                       reverse=True)})
  hier = {'schema_version': 1, 'concepts': concepts, 'unassigned': perm[lo:].tolist(),
          'alive': list(range(N1))}
  export = os.path.join(wd, 'export')
  os.makedirs(export, exist_ok=True)
  np.save(os.path.join(export, 'level1_decoder.npy'), w)
  with open(os.path.join(export, 'hierarchy.json'), 'w') as f:
    json.dump(hier, f)
  with open(os.path.join(export, 'metrics.json'), 'w') as f:
    json.dump({'mode': 'staged', 'level1/n_latents': N1, 'level2/concepts': N2}, f)
  return hier


def fake_tops(hier: dict):
  """Panel data of a harvest run's size (no pass over activations: random ids and patches)."""
  from csae_jax.reports import patches  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)

  def top():
    return [[int(rng.integers(2000)), round(float(rng.uniform(1, 9)), 4),
             sorted(rng.choice(256, 12, replace=False).tolist()),
             rng.integers(1, 256, 12).tolist()] for _ in range(8)]

  ids = [c['id'] for c in hier['concepts']]
  labels = [[f'label_{rng.integers(100)}', 5], [f'label_{rng.integers(100)}', 3]]
  return patches.TopImages({f: top() for f in range(N1)}, {c: top() for c in ids},
                           {f: labels for f in range(N1)}, {c: labels for c in ids},
                           {i: [f'thumbs/{i}.jpg', f'label_{i % 100}'] for i in range(2000)},
                           (16, 16))


def chromium_wall(url: str) -> tuple[float, str]:
  exe = shutil.which('chromium') or shutil.which('google-chrome')
  with tempfile.TemporaryDirectory() as prof:
    t = time.perf_counter()
    r = subprocess.run([exe, '--headless', '--no-sandbox', '--disable-gpu',
                        f'--user-data-dir={prof}', '--dump-dom', url],
                       capture_output=True, text=True, check=True)
    return time.perf_counter() - t, r.stdout


def main(argv):
  del argv
  wd = _OUT.value
  hier = build(wd)
  tops = fake_tops(hier) if _IMAGES.value else None
  t = time.perf_counter()
  path = report_html.write(wd, images=False, tops=tops)
  write_s = time.perf_counter() - t
  blank = os.path.join(wd, 'blank.html')
  with open(blank, 'w') as f:
    f.write('<!DOCTYPE html><html><body>blank</body></html>')
  base = float(np.median([chromium_wall('file://' + blank)[0] for _ in range(5)]))
  runs = [chromium_wall('file://' + path) for _ in range(5)]
  dom = runs[-1][1]
  ready = re.search(r'data-ready-ms="(\d+)"', dom)
  out = {'features': N1, 'concepts': N2, 'images': _IMAGES.value,
         'html_mb': round(os.path.getsize(path) / 1e6, 2), 'write_s': round(write_s, 2),
         'panel_files_mb': round(sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in
                                     os.walk(os.path.join(wd, 'report', 'data')) for f in fs)
                                 / 1e6, 2),
         'dump_dom_s': round(float(np.median([r[0] for r in runs])), 2),
         'blank_page_s': round(base, 2),
         'ready_ms_in_page': int(ready.group(1)) if ready else None,
         'concepts_in_dom': len(re.findall(r'data-concept-id=', dom))}
  print(json.dumps(out))


if __name__ == '__main__':
  app.run(main)
