"""Held-out batches that say how many rows they hold, so a loop over them can show an ETA
(`evals.recon.evaluate`'s progress bar). A plain generator cannot say it."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np


class Batches:
  """The batches `make()` yields, `n_rows` rows in all; each iteration calls `make()` again."""

  def __init__(self, make: Callable[[], Iterator[np.ndarray]], n_rows: int):
    self._make, self.n_rows = make, int(n_rows)

  def __iter__(self) -> Iterator[np.ndarray]:
    return iter(self._make())
