"""Top-activating images of every level-1 feature and every concept, from a harvest.

A harvest site folder (`csae_jax.sources.harvest_store`) locates every activation row in its
image (index.npz: image_id, row, col). One pass encodes every row with the exported level-1 SAE
and keeps, per feature, the top-N images by the feature's largest code over the image's patches
(a concept's code on a patch is the sum of its members' codes). A second pass re-encodes only
the images that made some top list, for their heat maps: the feature's (or concept's) code on
each patch, kept sparse (the patches where it fires) and quantised to 0..255 of its maximum.
Thumbnails are written once per image, squashed square as the harvest squashed it (so the patch
grid lies over the picture), into `<report>/thumbs/`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from csae_jax import checkpoint as ckpt_lib
from csae_jax import export
from csae_jax.evals import recon
from csae_jax.steering import rows as rows_lib

THUMB_PX = 120  # the report's tile size


@dataclasses.dataclass
class TopImages:
  """Per feature / concept id: [[image, score, patch ids, quantised codes], ...] best first."""
  features: dict[int, list]
  concepts: dict[int, list]
  feature_labels: dict[int, list]   # id -> [[label, count], ...] over its top images
  concept_labels: dict[int, list]
  images: dict[int, list]           # image id -> [thumbnail path relative to report/ or None,
  #                                   label or None]
  grid: tuple[int, int]             # the patch grid (rows, cols)


def is_harvest(path: str) -> bool:
  return bool(path) and all(os.path.exists(os.path.join(path, n))
                            for n in ('index.npz', 'images.json', 'manifest.json'))


def _encoder(export_dir: str):
  path = os.path.join(export_dir, 'level1_sae.npz')
  if not os.path.exists(path):
    raise ValueError(f'{path} is missing: the report needs the exported level-1 SAE to find '
                     f'each feature\'s top images; re-run the pipeline (or its export)')
  params, thr, arch, k = export.load_sae(path)
  params = {n: jnp.asarray(v, jnp.float32) for n, v in params.items()}
  return (lambda x: recon.encode(params, x, jnp.float32(thr), arch=arch, k=k)), int(
      params['w_dec'].shape[0])


def image_ranges(image_id_r: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray,
                                                              np.ndarray]:
  """(image ids, first row, end row): a harvest writes each image's rows together, in order."""
  if len(image_id_r) and np.any(np.diff(image_id_r) < 0):
    raise ValueError(f'{where}: image_id is not in ascending row order, so an image\'s rows are '
                     f'not contiguous (not a harvest_store index?); re-run the harvest')
  starts = np.flatnonzero(np.r_[True, image_id_r[1:] != image_id_r[:-1]]) if len(
      image_id_r) else np.zeros(0, np.int64)
  ends = np.r_[starts[1:], len(image_id_r)].astype(np.int64)
  return image_id_r[starts], starts, ends


def _batches(starts, ends, max_rows: int):
  """Index ranges [i, j) of consecutive images holding at most max_rows rows (at least one)."""
  i = 0
  while i < len(starts):
    j = i + 1
    while j < len(starts) and ends[j] - starts[i] <= max_rows:
      j += 1
    yield i, j
    i = j


def _merge_top(best_s, best_i, scores_bn, ids_b, n):
  """Keeps the n best (score, image) per column of the running top lists and a new batch."""
  s = np.concatenate([best_s, scores_bn.T], axis=1)
  i = np.concatenate([best_i, np.broadcast_to(ids_b, scores_bn.T.shape)], axis=1)
  keep = np.argsort(-s, axis=1, kind='stable')[:, :n]
  return np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)


def _image_max_fn(encode, member_m, concept_m, n2: int, n_seg: int):
  """jit: rows [R, d] with their image slot [R] -> (per-slot max code of every feature
  [n_seg, n1], of every concept [n_seg, n2]); a concept's code on a row is the sum of its
  members' codes. Reduced on the device: only [n_seg, n1 + n2] comes back. Padding rows carry
  slot n_seg, which the segment ops drop."""
  member_m, concept_m = jnp.asarray(member_m), jnp.asarray(concept_m)

  @jax.jit
  def fn(x_rd, slot_r):
    codes = encode(x_rd)
    fmax = jax.ops.segment_max(codes, slot_r, num_segments=n_seg)
    if not n2:
      return fmax, jnp.zeros((n_seg, 0), codes.dtype)
    cc = jax.ops.segment_sum(codes[:, member_m].T, concept_m, num_segments=n2).T
    return fmax, jax.ops.segment_max(cc, slot_r, num_segments=n_seg)
  return fn


def _padded(rows, lo: int, hi: int, slot_r: np.ndarray, n_rows: int, n_seg: int):
  x = rows.source.read_rows(np.arange(lo, hi))
  pad = n_rows - len(x)  # one shape for every batch: one compilation
  return (jnp.asarray(np.pad(x, ((0, pad), (0, 0)))),
          jnp.asarray(np.pad(slot_r, (0, pad), constant_values=n_seg), jnp.int32))


def _bar(total: int, desc: str):
  return tqdm(total=total, desc=desc, unit='img', file=sys.stderr, dynamic_ncols=True,
              mininterval=1.0, disable=total < 1000)  # a bar only where it is worth one


def _heat(codes_r, cells_r):
  on = np.flatnonzero(codes_r > 0)
  top = float(codes_r[on].max()) if on.size else 1.0
  return ([int(c) for c in cells_r[on]],
          [int(q) for q in np.clip(np.round(255 * codes_r[on] / top), 1, 255)])


def _dominant(ids, labels: dict, top: int = 3) -> list:
  counts = collections.Counter(labels[i] for i in ids if labels.get(i))
  return [[lab, n] for lab, n in counts.most_common(top)]


def top_images(export_dir: str, harvest_dir: str, concepts: list[dict], report_dir: str, *,
               n_top: int = 8, max_images: int = 0, batch_rows: int = 4096) -> TopImages:
  """The top-`n_top` images of every level-1 feature and concept (module docstring); thumbnails
  into `report_dir`/thumbs/. max_images > 0: only the harvest's first max_images images."""
  rows = rows_lib.HarvestRows(harvest_dir)
  with np.load(os.path.join(harvest_dir, 'index.npz')) as z:
    row_r, col_r = z['row'].astype(np.int64), z['col'].astype(np.int64)
  grid = (int(row_r.max()) + 1, int(col_r.max()) + 1)
  cell_r = row_r * grid[1] + col_r
  encode, n1 = _encoder(export_dir)
  if rows.d != encode_d(export_dir):
    raise ValueError(f'{harvest_dir} holds d={rows.d} activations but {export_dir} was trained '
                     f'on d={encode_d(export_dir)}; point the report at the harvest of that run')
  img_i, start_i, end_i = image_ranges(rows.image_id_r, os.path.join(harvest_dir, 'index.npz'))
  if max_images:
    img_i, start_i, end_i = img_i[:max_images], start_i[:max_images], end_i[:max_images]
  batch_rows = max(batch_rows, int((end_i - start_i).max(initial=1)))
  members = [np.asarray(c['members'], np.int64) for c in concepts]
  member_m = np.concatenate(members) if members else np.zeros(0, np.int64)
  concept_m = np.repeat(np.arange(len(concepts)), [len(m) for m in members])
  n2 = len(concepts)
  n_seg = min(batch_rows, len(img_i)) or 1  # images per batch at most (one row each)
  image_max = _image_max_fn(encode, member_m, concept_m, n2, n_seg)
  fs, fi = np.full((n1, 0), -np.inf, np.float32), np.zeros((n1, 0), np.int64)
  cs, ci = np.full((n2, 0), -np.inf, np.float32), np.zeros((n2, 0), np.int64)
  # pass 1: the top images of every feature and concept
  bar = _bar(len(img_i), 'report: top images')
  for i, j in _batches(start_i, end_i, batch_rows):
    bar.update(j - i)
    lo, hi = start_i[i], end_i[j - 1]
    slot_r = np.repeat(np.arange(j - i), end_i[i:j] - start_i[i:j])
    fmax, cmax = map(np.asarray, image_max(*_padded(rows, lo, hi, slot_r, batch_rows, n_seg)))
    fs, fi = _merge_top(fs, fi, fmax[:j - i], img_i[i:j], n_top)
    if n2:
      cs, ci = _merge_top(cs, ci, cmax[:j - i], img_i[i:j], n_top)
  # pass 2: heat maps of the images that made a top list (only where the code is positive);
  # per batch of those images, only the code columns their lists need come back to the host
  want = collections.defaultdict(list)  # image -> [(kind, feature or concept index)]
  for kind, s_, i_ in (('f', fs, fi), ('c', cs, ci)):
    for j, k in zip(*np.nonzero(s_ > 0)):
      want[int(i_[j, k])].append((kind, int(j)))
  where = {int(im): n for n, im in enumerate(img_i)}
  todo = sorted(want)
  t_start = np.array([start_i[where[im]] for im in todo], np.int64)
  t_end = np.array([end_i[where[im]] for im in todo], np.int64)
  encode_jit = jax.jit(encode)
  heat = {}
  bar.close()
  bar = _bar(len(todo), 'report: heat maps')
  for i, j in _batches(t_start, t_end, batch_rows):
    bar.update(j - i)
    r = np.concatenate([np.arange(a, b) for a, b in zip(t_start[i:j], t_end[i:j])])
    cols = sorted({f for im in todo[i:j] for kind, f in want[im] if kind == 'f'} |
                  {int(m) for im in todo[i:j] for kind, c in want[im] if kind == 'c'
                   for m in members[c]})
    x = rows.source.read_rows(r)
    codes = encode_jit(jnp.asarray(np.pad(x, ((0, batch_rows - len(x)), (0, 0)))))
    # index lists padded to a power of two: a handful of gather shapes, not one per batch
    pad_cols = cols + [0] * ((1 << max(len(cols) - 1, 0).bit_length()) - len(cols))
    sub = np.asarray(codes[:len(r)][:, np.asarray(pad_cols)])[:, :len(cols)]
    col_of = {f: n for n, f in enumerate(cols)}
    off = 0
    for im, a, b in zip(todo[i:j], t_start[i:j], t_end[i:j]):
      rr = slice(off, off + b - a)
      for kind, k in want[im]:
        if kind == 'f':
          code_r = sub[rr, col_of[k]]
        else:
          code_r = sub[rr][:, [col_of[int(m)] for m in members[k]]].sum(1)
        heat[kind, k, im] = _heat(code_r, cell_r[a:b])
      off += b - a
  bar.close()
  labels = {int(i): v.get('label') for i, v in rows.images.items()}

  def lists(s_, i_, kind):
    out, labs = {}, {}
    for j in range(len(s_)):
      top = [[int(i_[j, k]), round(float(s_[j, k]), 4), *heat[kind, j, int(i_[j, k])]]
             for k in range(s_.shape[1]) if s_[j, k] > 0]
      if top:
        out[j] = top
        labs[j] = _dominant([t[0] for t in top], labels)
    return out, labs

  ftop, flab = lists(fs, fi, 'f')
  ctop, clab = lists(cs, ci, 'c')
  thumbs = write_thumbnails(rows, sorted(want), report_dir)
  images = {i: [thumbs.get(i), labels.get(i)] for i in sorted(want)}
  return TopImages(ftop, {concepts[j]['id']: v for j, v in ctop.items()}, flab,
                   {concepts[j]['id']: v for j, v in clab.items()}, images, grid)


def encode_d(export_dir: str) -> int:
  return int(np.load(os.path.join(export_dir, 'level1_decoder.npy'), mmap_mode='r').shape[1])


def write_thumbnails(rows: rows_lib.HarvestRows, image_ids: list[int], report_dir: str
                     ) -> dict[int, str]:
  """thumbs/<id>.jpg per image, from the collection the harvest read; {} (with a warning) when
  those images cannot be opened any more (the panels then show the heat map alone)."""
  from csae_jax.sources import images as images_lib  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  m = rows.manifest
  try:
    data_dir = ''
    summary = os.path.join(os.path.dirname(rows.folder), 'harvest.json')
    if os.path.exists(summary):
      data_dir = ckpt_lib.read_json(summary).get('config', {}).get('data_dir', '')
    imgs = images_lib.open_images(m['images'], data_dir=data_dir, split=m.get('split', 'train'))
  except (ValueError, KeyError, OSError) as e:
    logging.warning('report: no thumbnails (%s)', e)
    return {}
  os.makedirs(os.path.join(report_dir, 'thumbs'), exist_ok=True)
  out = {}
  for i in image_ids:
    if i >= len(imgs) or imgs.key(i) != rows.file(i):
      logging.warning('report: image %d of %s changed since the harvest; no thumbnail', i,
                      m['images'])
      continue
    rel = f'thumbs/{i}.jpg'
    imgs.load(i).resize((THUMB_PX, THUMB_PX), Image.BILINEAR).save(
        os.path.join(report_dir, rel), quality=85)
    out[i] = rel
  return out

