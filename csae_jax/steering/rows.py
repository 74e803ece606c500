"""Activation rows grouped by image: a harvest folder on disk, or arrays in memory.

Both give what the clamp value and the concept's top images need: every row with its image id
(streamed in row order), the rows of chosen images, and each image's file and label. A synthetic
benchmark uses `InMemoryRows` with one row per "image".
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Optional, Sequence

import numpy as np

from csae_jax.sources import arrays


class Rows:
  """Rows [n_rows, d] with `image_id_r` [n_rows]; subclasses provide `_read(row_ids)`."""

  image_id_r: np.ndarray
  d: int
  images: dict  # str(image id) -> {"file": ..., "label": ...}
  manifest: dict

  @property
  def n_images(self) -> int:
    return int(self.image_id_r.max()) + 1 if self.image_id_r.size else 0

  def _read(self, row_ids: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  def batches(self, batch_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(x_bd float32, image_id_b) over every row, in row order."""
    for lo in range(0, len(self.image_id_r), batch_rows):
      ids = np.arange(lo, min(lo + batch_rows, len(self.image_id_r)))
      yield self._read(ids), self.image_id_r[ids]

  def of_images(self, image_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(x_rd, image_id_r) of every row of the given images."""
    rows = np.flatnonzero(np.isin(self.image_id_r, np.asarray(list(image_ids), np.int64)))
    return self._read(rows), self.image_id_r[rows]

  def label(self, image_id: int) -> Optional[str]:
    return self.images.get(str(int(image_id)), {}).get('label')

  def file(self, image_id: int) -> Optional[str]:
    return self.images.get(str(int(image_id)), {}).get('file')


class InMemoryRows(Rows):
  def __init__(self, x_nd: np.ndarray, image_id_n: Optional[np.ndarray] = None,
               images: Optional[dict] = None):
    self.x_nd = np.asarray(x_nd, np.float32)
    self.image_id_r = (np.arange(len(self.x_nd)) if image_id_n is None
                       else np.asarray(image_id_n, np.int64))
    self.d = self.x_nd.shape[1]
    self.images, self.manifest = images or {}, {}

  def _read(self, row_ids):
    return self.x_nd[row_ids]


class HarvestRows(Rows):
  """A harvest site folder (`csae_jax.sources.harvest_store`): shards, index.npz, images.json,
  manifest.json."""

  def __init__(self, folder: str):
    for name in ('index.npz', 'images.json', 'manifest.json'):
      if not os.path.exists(os.path.join(folder, name)):
        raise ValueError(f'{folder!r} is not a finished harvest site folder (no {name}); point '
                         f'--config.harvest at WD/activations/<site> of a completed harvest')
    # scale=1: raw activations (the exported SAE is in input space); holdout 0: every row.
    self.source = arrays.ArraySource(folder, batch_size=1, seed=0, holdout_rows=0, scale=1.0)
    with np.load(os.path.join(folder, 'index.npz')) as z:
      self.image_id_r = z['image_id'].astype(np.int64)
    if len(self.image_id_r) != self.source.n_rows:
      raise ValueError(f'{folder!r}: index.npz has {len(self.image_id_r)} rows but the shards '
                       f'hold {self.source.n_rows}; re-run the harvest')
    with open(os.path.join(folder, 'images.json')) as f:
      self.images = json.load(f)
    with open(os.path.join(folder, 'manifest.json')) as f:
      self.manifest = json.load(f)
    self.folder, self.d = folder, self.source.d

  def _read(self, row_ids):
    return self.source.read_rows(row_ids)
