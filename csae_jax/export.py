"""The stable on-disk outputs, `<workdir>/export/` (schema in the README):

    level1_decoder.npy  [n1, d] float32  unit rows, input space
    level2_decoder.npy  [n2, d] float32  unit rows (level 2 lives in the space of unit rows)
    hierarchy.json      concepts (members strongest first), unassigned, alive
    metrics.json        every reported number, flat keys, plus the config hash
    level1_sae.npz, level2_sae.npz   full parameters in input space (w_enc, b_enc, w_dec, b_dec,
                        threshold, arch, k): what steering and reports load

Level 1 trains on inputs scaled by s (unit mean squared norm). The scale is folded back here:
x ~= W_dec f' + b_dec / s with f' = f / s = ReLU(W_enc^T (x - b_dec / s) + b_enc / s), so the
exported SAE applies to raw activations (top-k selection is invariant to the positive factor).
Level 2's inputs are never rescaled, so nothing is folded into it.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from csae_jax import checkpoint as ckpt_lib

SCHEMA_VERSION = 1


def fold_scale(params: dict, threshold: float, scale: float) -> tuple[dict, float]:
  """Input-space parameters with unit decoder rows.

  Rows with norm r (relu_l1 leaves them free) are normalised and r moved into the code:
  f_i d_i = (r_i f_i)(d_i / r_i), i.e. encoder column, bias and threshold scale by r_i.
  """
  p = {k: np.asarray(jax.device_get(v), np.float32) for k, v in params.items()}
  norms_n = np.maximum(np.linalg.norm(p['w_dec'], axis=1), 1e-12)
  p['w_dec'] = p['w_dec'] / norms_n[:, None]
  p['w_enc'] = p['w_enc'] * norms_n[None, :]
  p['b_enc'] = p['b_enc'] * norms_n / scale
  p['b_dec'] = p['b_dec'] / scale
  if 'log_threshold' in p:  # jumprelu: theta' = theta * r / s
    p['log_threshold'] = p['log_threshold'] + np.log(norms_n) - np.log(scale)
  return p, (float(threshold) / scale if threshold >= 0 else float(threshold))


def _save_npy(path: str, arr: np.ndarray) -> None:
  tmp = path + '.tmp.npy'
  np.save(tmp, np.asarray(arr, np.float32))
  os.replace(tmp, path)


def _save_sae(path: str, params: dict, threshold: float, arch: str, k: int) -> None:
  tmp = path + '.tmp.npz'
  np.savez(tmp, **params, threshold=np.float32(threshold), arch=np.array(arch), k=np.int64(k))
  os.replace(tmp, path)


def load_sae(path: str) -> tuple[dict, float, str, int]:
  with np.load(path) as z:
    params = {k: z[k] for k in ('w_enc', 'b_enc', 'w_dec', 'b_dec', 'log_threshold') if k in z}
    return params, float(z['threshold']), str(z['arch']), int(z['k'])


def write(export_dir: str, **kw) -> None:
  """`write_files` on process 0 (one writer); every process returns once the export is whole,
  so what reads it next (the compare mode's scoring) sees all of it on every host."""
  if jax.process_index() == 0:
    write_files(export_dir, **kw)
  ckpt_lib.barrier(f'export:{export_dir}')


def write_files(export_dir: str, *, level1: dict, level1_threshold: float, level1_arch: str,
                level1_k: int, scale: float, level2: dict | None, level2_threshold: float = -1.0,
                level2_arch: str = '', level2_k: int = 0, hierarchy: dict, metrics: dict,
                level2_decoder_md: np.ndarray | None = None, level2_scale: float = 1.0) -> None:
  """level2=None: a method without a level-2 SAE (clustering of decoder rows) gives its concept
  directions as `level2_decoder_md` instead. level2_scale: the scale of level 2's inputs (1 for
  CSAE's unit decoder rows; the input scale for a flat SAE on activations)."""
  os.makedirs(export_dir, exist_ok=True)
  p1, thr1 = fold_scale(level1, level1_threshold, scale)
  _save_npy(os.path.join(export_dir, 'level1_decoder.npy'), p1['w_dec'])
  _save_sae(os.path.join(export_dir, 'level1_sae.npz'), p1, thr1, level1_arch, level1_k)
  if level2 is not None:
    p2, thr2 = fold_scale(level2, level2_threshold, level2_scale)
    _save_npy(os.path.join(export_dir, 'level2_decoder.npy'), p2['w_dec'])
    _save_sae(os.path.join(export_dir, 'level2_sae.npz'), p2, thr2, level2_arch, level2_k)
  elif level2_decoder_md is not None:
    rows_md = np.asarray(level2_decoder_md, np.float32)
    rows_md = rows_md / np.maximum(np.linalg.norm(rows_md, axis=1, keepdims=True), 1e-12)
    _save_npy(os.path.join(export_dir, 'level2_decoder.npy'), rows_md)
  ckpt_lib.write_json_atomic(os.path.join(export_dir, 'hierarchy.json'), hierarchy)
  ckpt_lib.write_json_atomic(os.path.join(export_dir, 'metrics.json'),
                             {'schema_version': SCHEMA_VERSION, **metrics})
