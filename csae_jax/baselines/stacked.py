"""The stacked SAE baseline: a level-2 SAE trained on level-1 *sparse codes*, not on decoder rows.

`CodeSource` wraps an activation source and yields the level-1 inference codes of its batches,
with the same interface as the other sources (`batch(step)`, `global_batch(step)`, `d`, `scale`,
`fingerprint`, `manifest()`, `eval_batches`), so `loop.fit` and `cascade.level1.train` train on
it unchanged. Codes are scaled to unit mean squared norm like every other source, so the level-2
recipe (learning rate, thresholds) sees inputs of the size it was tuned for.

The hierarchy reads the level-2 decoder [m, n1]: row r is a concept as a pattern over level-1
features, so level-1 feature j belongs to the concept with the largest (positive) entry in
column j.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from csae_jax.evals import recon
from csae_jax.saes import common

# The code scale is estimated from the first training batches: up to this many rows (the
# synthetic source's sample size) and at most this many batches (bounds the start-up cost).
_SCALE_ROWS = 16384
_SCALE_BATCHES = 16


def _global_batch(source, step: int) -> np.ndarray:
  """The whole (all-process) normalised batch at `step` of an activation source."""
  if hasattr(source, 'global_batch'):
    return source.global_batch(step)
  return source.read_rows(source.global_indices(step)) * np.float32(source.scale)


def params_hash(params: common.Params) -> str:
  """sha256 of an SAE's parameters (names, shapes, dtypes and bytes), host-order independent."""
  h = hashlib.sha256()
  for name in sorted(params):
    a = np.asarray(jax.device_get(params[name]))
    h.update(f'{name}|{a.shape}|{a.dtype}\n'.encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


class CodeSource:
  """Level-1 inference codes of an activation source's batches, times one scalar `scale`.

  Every method is a pure function of its arguments (the parent source's batches are, and
  encoding is deterministic), so training on it resumes exactly like training on activations.
  """

  kind = 'codes'

  def __init__(self, source, params1: common.Params, threshold1: float, arch1: str, k1: int, *,
               scale: float | None = None):
    w_enc = params1.get('w_enc') if isinstance(params1, dict) else None
    if w_enc is None or w_enc.ndim != 2 or w_enc.shape[0] != source.d:
      raise ValueError(f'CodeSource needs level-1 params with w_enc [{source.d}, n1] for a source '
                       f'of d = {source.d}, got '
                       f'{None if w_enc is None else tuple(w_enc.shape)}; pass the level-1 '
                       f'SAE trained on this source')
    self.source = source
    self.params1, self.threshold1 = params1, float(threshold1)
    self.arch1, self.k1 = arch1, int(k1)
    self.d = int(w_enc.shape[1])  # level 2's input dimension: n1
    self.batch_size = getattr(source, 'batch_size', None)
    self.params1_hash = params_hash(params1)
    h = hashlib.sha256(source.fingerprint.encode())
    h.update(f'|{self.params1_hash}|{self.threshold1!r}|{arch1}|{self.k1}'.encode())
    self.fingerprint = h.hexdigest()
    self.scale = float(scale) if scale is not None else self._compute_scale()

  def _codes(self, x_bd: np.ndarray) -> np.ndarray:
    return np.asarray(jax.device_get(recon.encode(
        self.params1, jnp.asarray(x_bd), self.threshold1, arch=self.arch1, k=self.k1)),
        np.float32)

  def _compute_scale(self) -> float:
    # From the first training batches as every host sees them whole, so all hosts agree.
    sq, n, step = 0.0, 0, 0
    while n < _SCALE_ROWS and step < _SCALE_BATCHES:
      c_bn = self._codes(_global_batch(self.source, step))
      sq += float(np.sum(c_bn.astype(np.float64) ** 2))
      n += len(c_bn)
      step += 1
    if sq == 0.0:
      raise ValueError(f'CodeSource: the level-1 SAE ({self.arch1}, k = {self.k1}, threshold '
                       f'{self.threshold1:g}) gives all-zero codes on the first {n} training '
                       f'rows, so its codes cannot be normalised; train level 1 longer or check '
                       f'its threshold')
    return float(1.0 / np.sqrt(sq / n))

  def encode(self, x_bd: np.ndarray) -> np.ndarray:
    """[b, n1] scaled codes of normalised activations (what level 2 is trained on)."""
    return self._codes(x_bd) * np.float32(self.scale)

  def batch(self, step: int) -> np.ndarray:
    """This process's slice of the batch at `step`, as codes."""
    return self.encode(self.source.batch(step))

  def global_batch(self, step: int) -> np.ndarray:
    return self.encode(_global_batch(self.source, step))

  def eval_batches(self, max_rows: int, batch_size: int) -> Iterator[np.ndarray]:
    for x_bd in self.source.eval_batches(max_rows, batch_size):
      yield self.encode(x_bd)

  def manifest(self) -> dict:
    return {'kind': self.kind, 'parent': self.source.manifest(),
            'level1': {'params_hash': self.params1_hash, 'threshold': self.threshold1,
                       'arch': self.arch1, 'k': self.k1},
            'd': self.d, 'scale': self.scale, 'fingerprint': self.fingerprint}


def parents_from_decoder_columns(w_dec2_mn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(parent_n, strength_n) over the n1 level-1 features: parent of j = argmax_r w_dec2[r, j].

  strength = that entry. Only positive entries count (a negative one says concept r *removes*
  feature j); a column with no positive entry gives -1 (strength 0). Ties go to the lowest r.
  """
  w_mn = np.asarray(w_dec2_mn)
  if w_mn.ndim != 2 or w_mn.shape[0] == 0:
    raise ValueError(f'parents_from_decoder_columns needs the level-2 decoder [m, n1] with '
                     f'm >= 1, got shape {w_mn.shape}')
  parent_n = np.argmax(w_mn, axis=0).astype(np.int64)  # first maximum: lowest index
  best_n = w_mn[parent_n, np.arange(w_mn.shape[1])].astype(np.float64)
  ok_n = best_n > 0
  return np.where(ok_n, parent_n, -1), np.where(ok_n, best_n, 0.0)
