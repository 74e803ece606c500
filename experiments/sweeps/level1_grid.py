"""An example sweep file for experiments/sweep.py: level-1 k x seeds, each a full staged run.

    python -m experiments.sweep --config=experiments/configs/csae.py:small \
        --sweep=experiments/sweeps/level1_grid.py --root=runs/level1_grid
    python -m experiments.sweep ... --sweep=experiments/sweeps/level1_grid.py:wide   # more k

`get_sweep(arg)` returns the runs: a list of override dicts (flattened config keys -> values).
"""

from experiments import overrides


def get_sweep(arg: str | None = None) -> list[dict]:
  ks = [2, 3, 4, 6] if arg == 'wide' else [2, 4]
  if arg not in (None, 'wide'):
    raise ValueError(f'unknown sweep variant {arg!r}; known: "wide"')
  return overrides.grid({'level1.k': ks, 'train.seed': [0, 1]})
