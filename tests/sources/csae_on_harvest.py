"""The second half of the harvest CLI tests (Gemma-3, LLaVA): a harvested site folder trains a
CSAE run through `--config.data.path`.

In process, through `modes.run`, the function `python -m experiments.run` calls once it has
parsed the flags (tests/test_cli.py covers the parsing): the ports' tests share one pytest
process, so the second run reuses the first one's compiled steps (both tiny towers are 32 wide)
instead of paying a fresh interpreter, imports and compilation.
"""

import os

import numpy as np

from csae_jax import modes
from experiments.configs import csae


def train_csae_on(data_dir: str, workdir: str, d: int) -> dict:
  """Trains csae.py:small on data_dir for a few steps; checks the export lives in its space."""
  c = csae.get_config('small')
  c.update_from_flattened_dict({
      'data.path': data_dir, 'train.steps': 20, 'level2.steps': 20, 'train.batch_size': 16,
      'level2.restarts': 1, 'data.holdout_rows': 16})
  metrics = modes.run(c, workdir)
  assert os.path.exists(os.path.join(workdir, 'export', 'hierarchy.json'))
  # decoder rows in the harvested space (d), not the synthetic default's (128)
  assert np.load(os.path.join(workdir, 'export', 'level1_decoder.npy')).shape[1] == d
  assert metrics['d'] == d
  return metrics
