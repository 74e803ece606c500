"""Level-1 decoder rows as level-2 training data: one example per alive level-1 feature."""

from __future__ import annotations

import numpy as np


class RowSource:
  """Batches of unit decoder rows, reshuffled every epoch; a pure function of (seed, step).

  Full batch (batch_size >= rows) is the default for dictionaries up to a few thousand rows:
  BatchTopK then selects over all rows at once, exactly as a meta-SAE epoch would.
  """

  kind = 'rows'

  def __init__(self, rows_rd: np.ndarray, *, batch_size: int, seed: int):
    if rows_rd.ndim != 2 or len(rows_rd) == 0:
      raise ValueError(f'level 2 needs at least one alive level-1 feature, got rows of shape '
                       f'{rows_rd.shape}; train level 1 longer or lower level1.n_latents')
    self.rows_rd = np.asarray(rows_rd, np.float32)
    self.batch_size = min(batch_size, len(rows_rd)) if batch_size else len(rows_rd)
    self.seed = seed
    self.d = rows_rd.shape[1]

  def batch(self, step: int) -> np.ndarray:
    r = len(self.rows_rd)
    if self.batch_size == r:
      return self.rows_rd
    per_epoch = r // self.batch_size
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([self.seed, epoch]).permutation(r)
    return self.rows_rd[perm[i * self.batch_size:(i + 1) * self.batch_size]]
