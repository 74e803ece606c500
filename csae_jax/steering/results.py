"""Appeared % / removed % per arm and the side-effect score, from judged captions.

- appeared %: of the insertion captions (+v, every image of the concept) those that show the
  concept; for `none`, the unsteered captions of the same images (the base rate).
- removed %: of the suppression captions (-v) on the images whose unsteered caption shows the
  concept, those that no longer show it (suppress_on=all also steers the other images: their
  captions count in the similarity only); `none` is 0 on the same images by definition.
- similarity (side effect): word-sequence similarity (difflib ratio, 1 = identical) of each
  steered caption to the same image's unsteered caption, averaged over the arm's captions:
  how much else in the caption changed.

Rates are pooled over the concepts' captions (each concept has the same number of images) and
also given per concept.
"""

from __future__ import annotations

import collections
import difflib
import json
import os
from typing import Optional

import numpy as np


def similarity(a: str, b: str) -> float:
  return difflib.SequenceMatcher(None, a.lower().split(), b.lower().split()).ratio()


def _pct(values: list[bool]) -> Optional[float]:
  return round(100.0 * float(np.mean(values)), 2) if values else None


def summarise(records: list[dict], verdicts: dict[tuple, bool], arms: list[str]) -> dict:
  """records: captions.jsonl rows; verdicts: (image_id, arm, concept, sign) -> shows it.
  The unsteered captions are the `none` records (concept None); their verdict per concept is
  stored under (image, 'none', concept, '+')."""
  base = {r['image_id']: r['text'] for r in records if r['arm'] == 'none'}
  per = collections.defaultdict(lambda: {'+': [], '-': [], 'sim': []})
  per_concept = collections.defaultdict(lambda: collections.defaultdict(
      lambda: {'+': [], '-': []}))
  for key, shown in verdicts.items():
    image, arm, concept, sign = key
    if arm == 'none':
      per['none']['+'].append(shown)
      per_concept[concept]['none']['+'].append(shown)
  for r in records:
    if r['arm'] == 'none':
      continue
    key = (r['image_id'], r['arm'], r['concept'], r['sign'])
    if key not in verdicts:
      continue
    shown = verdicts[key]
    per[r['arm']]['sim'].append(similarity(r['text'], base.get(r['image_id'], '')))
    if r['sign'] == '-' and not verdicts.get((r['image_id'], 'none', r['concept'], '+')):
      continue  # nothing to remove (suppress_on=all also steers such images)
    hit = shown if r['sign'] == '+' else not shown
    per[r['arm']][r['sign']].append(hit)
    per_concept[r['concept']][r['arm']][r['sign']].append(hit)
  n_supp = sum(len(per[a]['-']) for a in arms if a != 'none')
  out = {}
  for arm in arms:
    p = per[arm]
    row = {'appeared_pct': _pct(p['+']), 'removed_pct': _pct(p['-']),
           'similarity': round(float(np.mean(p['sim'])), 4) if p['sim'] else None,
           'n_insert': len(p['+']), 'n_suppress': len(p['-'])}
    if arm == 'none':
      row.update(removed_pct=0.0 if n_supp else None, similarity=1.0)
    out[arm] = row
  concepts = {str(c): {a: {'appeared_pct': _pct(v['+']), 'removed_pct': _pct(v['-'])}
                       for a, v in arms_.items()} for c, arms_ in per_concept.items()}
  return {'arms': out, 'per_concept': concepts}


def table(arms: dict, std: Optional[dict] = None, keys=None) -> str:
  """Markdown table of per-arm numbers (mean +- std when std is given)."""
  keys = keys or [('appeared_pct', 'appeared %'), ('removed_pct', 'removed %'),
                  ('similarity', 'similarity to unsteered'), ('n_insert', 'insert captions'),
                  ('n_suppress', 'suppress captions')]
  lines = ['| arm | ' + ' | '.join(h for _, h in keys) + ' |',
           '|---|' + '---|' * len(keys)]
  for arm, row in arms.items():
    cells = []
    for k, _ in keys:
      v = row.get(k)
      if v is None:
        cells.append('—')
      elif std is not None and std.get(arm, {}).get(k) is not None and not isinstance(v, int):
        cells.append(f'{v:.3f} ± {std[arm][k]:.3f}')
      else:
        cells.append(f'{v:.3f}' if isinstance(v, float) else str(v))
    lines.append(f'| {arm} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def read_captions(steer_dir: str) -> list[dict]:
  """The caption records of a steering run (`<workdir>/steer/captions.jsonl`)."""
  path = os.path.join(steer_dir, 'captions.jsonl')
  if not os.path.exists(path):
    raise ValueError(f'{path} is missing: run the steering stage first '
                     f'(experiments/configs/steer.py)')
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def caption_table(records: list[dict], concept: int, n_images: int = 4) -> str:
  """Markdown: per image of `concept` (at most n_images), its unsteered caption and the caption
  of every arm inserting (+) and suppressing (-) the concept."""
  base = {r['image_id']: r['text'] for r in records if r['arm'] == 'none'}
  mine = [r for r in records if r['concept'] == concept]
  cols = sorted({(r['arm'], r['sign']) for r in mine}, key=lambda a: (a[1], a[0]))
  by = {(r['image_id'], r['arm'], r['sign']): r['text'] for r in mine}
  images = sorted({r['image_id'] for r in mine})[:n_images]
  cell = lambda t: '—' if t is None else t.replace('|', '\\|').replace('\n', ' ')
  lines = ['| image | unsteered | ' + ' | '.join(f'{a} {s}' for a, s in cols) + ' |',
           '|---|---|' + '---|' * len(cols)]
  name = {r['image_id']: r.get('image', r['image_id']) for r in mine}
  for i in images:
    lines.append(f'| {name[i]} | {cell(base.get(i))} | '
                 + ' | '.join(cell(by.get((i, a, s))) for a, s in cols) + ' |')
  return '\n'.join(lines)
