"""One scorer for every method: it reads only `<method>/export/` (+ the method's parent
activations, when it has them) and the held-out evaluation set, so any hierarchy in the export
format (CSAE, a baseline, or one a user made) is scored the same way.

Reference embeddings for HMS: on the synthetic data each held-out sample is a one-token "image"
and its reference embedding is the true active-parent indicator (two features are coherent
siblings when they fire on samples with the same parents), which validates the HMS code end to
end; on harvested activations, one embedding per image id of the harvest's index.npz comes from
an `embeddings.EmbedFn`: a provided array (`compare.embeddings`, e.g. DINO CLS vectors), a
vision port run over the harvest's images (`compare.embedding_model`), or any callable.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import jax
import numpy as np

from csae_jax import checkpoint as ckpt_lib
from csae_jax import export
from csae_jax.cascade import hierarchy as hierarchy_lib
from csae_jax.evals import embeddings as embeddings_lib
from csae_jax.evals import hierarchy as hier_eval
from csae_jax.evals import recon, structure
from csae_jax.evals import synthetic as synthetic_eval
from csae_jax.sources import synthetic as synthetic_source

BATCH = 4096


@dataclasses.dataclass
class EvalSet:
  """Held-out raw activations and what is known about them."""
  x_nd: np.ndarray                          # raw (unnormalised) activations
  image_id_n: np.ndarray                    # image of each row (synthetic: the row itself)
  n_images: int
  emb_ie: np.ndarray | None                 # reference embedding per image (None: no HMS)
  parent_active_nk: np.ndarray | None = None  # synthetic ground truth per row
  truth: object | None = None               # synthetic GroundTruth
  fine_label_i: np.ndarray | None = None    # taxonomy: fine label id per image (-1: none)
  coarse_of_fine: np.ndarray | None = None  # taxonomy: coarse label id per fine label id


def synthetic_eval_set(source, eval_rows: int) -> EvalSet:
  xs, actives = [], []
  for x_bd, _, active_bk in source.eval_samples(eval_rows, BATCH):
    xs.append(x_bd / np.float32(source.scale))
    actives.append(active_bk)
  x_nd, active_nk = np.concatenate(xs), np.concatenate(actives)
  n = len(x_nd)
  return EvalSet(x_nd=x_nd, image_id_n=np.arange(n), n_images=n,
                 emb_ie=active_nk.astype(np.float32), parent_active_nk=active_nk,
                 truth=source.truth)


def harvested_eval_set(source, eval_rows: int, embeddings: str = '', taxonomy: str = '',
                       embed_fn: embeddings_lib.EmbedFn | None = None) -> EvalSet:
  """Held-out rows of an activations folder; image ids from its index.npz (a harvest's
  export), embeddings from `embeddings` ([n_images, e] .npy, row = image id) or `embed_fn`
  (image ids -> [len(ids), e])."""
  if embeddings and embed_fn is not None:
    raise ValueError('reference embeddings given twice: compare.embeddings and an embedding '
                     'function (compare.embedding_model or embed_fn); keep one')
  ids_n = source.eval_row_ids(eval_rows)
  x_nd = source.read_rows(ids_n)
  folder = source.path if os.path.isdir(source.path) else os.path.dirname(source.path)
  index_path = os.path.join(folder, 'index.npz')
  emb_ie = image_id_n = fine_i = coarse_f = None
  if os.path.exists(index_path):
    with np.load(index_path) as z:
      image_id_all = z['image_id']
    if len(image_id_all) != source.n_rows:
      raise ValueError(f'{index_path} has {len(image_id_all)} rows but the activations have '
                       f'{source.n_rows}; re-harvest so the index matches the shards')
    image_id_n = image_id_all[ids_n]
  elif embeddings or taxonomy or embed_fn is not None:
    raise ValueError(f'compare.embeddings / embedding_model / taxonomy need the image of every '
                     f'row: {index_path} is missing (harvest with experiments/configs/harvest.py '
                     f'writes it)')
  n_images = int(image_id_n.max()) + 1 if image_id_n is not None else len(ids_n)
  if image_id_n is None:
    image_id_n = np.arange(len(ids_n))
  if embeddings:
    emb_ie = embeddings_lib.from_array(embeddings, n_images)
  elif embed_fn is not None:
    emb_ie = embeddings_lib.call(embed_fn, n_images)
  if taxonomy:
    fine_i, coarse_f = _taxonomy_labels(folder, taxonomy, n_images)
  return EvalSet(x_nd=x_nd, image_id_n=image_id_n, n_images=n_images, emb_ie=emb_ie,
                 fine_label_i=fine_i, coarse_of_fine=coarse_f,
                 truth=synthetic_source.read_ground_truth(folder, source.d))


def _taxonomy_labels(folder: str, taxonomy: str, n_images: int):
  """Fine label id per image (from images.json) and the coarse id of every fine label."""
  images_path = os.path.join(folder, 'images.json')
  if not os.path.exists(images_path):
    raise ValueError(f'compare.taxonomy needs image labels: {images_path} is missing')
  with open(images_path) as f:
    images = json.load(f)
  with open(taxonomy) as f:
    coarse_of = json.load(f)
  fine_names = sorted({str(v['label']) for v in images.values() if v.get('label') is not None})
  missing = [n for n in fine_names if n not in coarse_of]
  if missing:
    raise ValueError(f'compare.taxonomy {taxonomy!r} has no coarse label for {missing[:5]}; map '
                     f'every fine label of {images_path}')
  fine_id = {n: i for i, n in enumerate(fine_names)}
  coarse_names = sorted({str(coarse_of[n]) for n in fine_names})
  coarse_f = np.array([coarse_names.index(str(coarse_of[n])) for n in fine_names])
  fine_i = np.full(n_images, -1)
  for key, v in images.items():
    if v.get('label') is not None and int(key) < n_images:
      fine_i[int(key)] = fine_id[str(v['label'])]
  return fine_i, coarse_f


def _json_number(v):
  """NaN (nothing to score, e.g. no concept with 2 fired children) -> None: strict JSON."""
  if isinstance(v, (float, np.floating)):
    return None if not np.isfinite(v) else float(v)
  if isinstance(v, np.integer):
    return int(v)
  return v


def load_export(export_dir: str) -> dict:
  p1, thr1, arch1, k1 = export.load_sae(os.path.join(export_dir, 'level1_sae.npz'))
  l2_path = os.path.join(export_dir, 'level2_decoder.npy')
  return {'params1': p1, 'threshold1': thr1, 'arch1': arch1, 'k1': k1,
          'w_dec1_nd': np.load(os.path.join(export_dir, 'level1_decoder.npy')),
          'w_dec2_md': np.load(l2_path) if os.path.exists(l2_path) else None,
          'hierarchy': ckpt_lib.read_json(os.path.join(export_dir, 'hierarchy.json')),
          'metrics': ckpt_lib.read_json(os.path.join(export_dir, 'metrics.json'))}


def score(export_dir: str, es: EvalSet, *, parent_codes=None, n_perm: int = 200,
          seed: int = 0) -> tuple[dict, np.ndarray]:
  """Scores one exported hierarchy; returns (flat metrics, per-concept HMS values)."""
  e = load_export(export_dir)
  hier, w_dec1_nd = e['hierarchy'], e['w_dec1_nd']
  n1 = len(w_dec1_nd)
  params1 = {k: jnp.asarray(v) for k, v in e['params1'].items()}
  # one pass over the held-out rows: the codes serve reconstruction, HMS and parent statistics
  stats, acc = recon.RunningStats(), hier_eval.PerImageAccumulator(es.n_images, n1)
  parent_parts, parent_child = [], None
  for i in range(0, len(es.x_nd), BATCH):
    x_np = es.x_nd[i:i + BATCH]
    x_bd = jnp.asarray(x_np)
    c_bn = recon.encode(params1, x_bd, e['threshold1'], arch=e['arch1'], k=e['k1'])
    stats.add(recon.stats_from_codes(params1, x_bd, c_bn), len(x_bd))
    c_bn = np.asarray(c_bn)
    acc.add(c_bn, es.image_id_n[i:i + BATCH])
    if parent_codes is not None:  # stream the child codes; keep only the (narrow) parent codes
      p_bm = np.asarray(parent_codes(x_np))
      if parent_child is None:
        parent_child = hier_eval.ParentChildAccumulator(hier, n1, p_bm.shape[1])
      parent_child.add(c_bn, p_bm)
      parent_parts.append(p_bm)
  ev = stats.result()
  out = {'level1/variance_explained': 1 - ev['fvu'], 'level1/l0': ev['l0'],
         'level1/dead_frac': ev['dead_frac'], 'level1/alive': len(hier['alive'])}
  n2 = len(e['w_dec2_md']) if e['w_dec2_md'] is not None else len(hier['concepts'])
  out.update(structure.stats(hier, w_dec1_nd, n2))
  per_concept = np.zeros(0)
  acts_in = acc.mean()
  if es.emb_ie is not None:
    flat, per_concept = hier_eval.hms_report(hier, acts_in, es.emb_ie, n_perm=n_perm, seed=seed)
    out.update(flat)
  if es.fine_label_i is not None:
    out.update(hier_eval.taxonomy(hier, acts_in, es.fine_label_i, es.coarse_of_fine,
                                  n_perm=n_perm, seed=seed))
  if parent_child is not None:
    out.update(parent_child.result('parent_child'))
    if es.parent_active_nk is not None:
      out['synthetic/parent_detection_f1'] = hier_eval.parent_detection_f1(
          np.concatenate(parent_parts), es.parent_active_nk)
  if es.truth is not None:
    t = es.truth
    alive_n = np.zeros(n1, bool)
    alive_n[hier['alive']] = True
    out.update(synthetic_eval.scores(t.children_cd, t.parent_of_child_c, w_dec1_nd, alive_n,
                                     hierarchy_lib.labels(hier, n1)))
    feat_c, _, _ = synthetic_eval.match_children(t.children_cd, w_dec1_nd, alive_n)
    p, r, f1 = hier_eval.sibling_prf(hier, feat_c, t.parent_of_child_c)
    out.update({'synthetic/sibling_precision': p, 'synthetic/sibling_recall': r,
                'synthetic/sibling_f1': f1})
    if e['w_dec2_md'] is not None:
      out['synthetic/parent_mcc'] = hier_eval.parent_mcc(e['w_dec2_md'], t.parents_kd)
    # The same matching for the mean direction of each concept's members: defined alike for
    # every method, whatever its level 2 is parametrised as (CSAE's level-2 rows are offsets
    # from b_dec2; a stacked SAE's live in code space).
    if hier['concepts']:
      unit = w_dec1_nd / np.maximum(np.linalg.norm(w_dec1_nd, axis=1, keepdims=True), 1e-12)
      centroids = np.stack([unit[c['members']].mean(0) for c in hier['concepts']])
      out['synthetic/concept_centroid_mcc'] = hier_eval.parent_mcc(centroids, t.parents_kd)
  out = {k: _json_number(v) for k, v in out.items()}
  merged = {**e['metrics'], **out}
  if jax.process_index() == 0:  # one writer of exports
    ckpt_lib.write_json_atomic(os.path.join(export_dir, 'metrics.json'), merged)
  return out, np.asarray(per_concept)
