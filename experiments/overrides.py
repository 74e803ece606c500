"""Config overrides as data: `KEY=VALUE` strings, grids of them, and their command-line form.

Shared by `experiments/sweep.py` (a sweep's runs) and `benchmarks/robustness.py` (`--set`).
Keys are the flattened ConfigDict paths (`level1.k`), as `--config.level1.k=` names them.
"""

from __future__ import annotations

import itertools
from typing import Any


def parse_value(value: str) -> Any:
  """'3' -> 3, '1e-3' -> 0.001, 'True' -> True, anything else stays a string."""
  for cast in (int, float):
    try:
      return cast(value)
    except ValueError:
      pass
  return {'True': True, 'False': False}.get(value, value)


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
  """['level1.k=4', 'train.seed=1'] -> {'level1.k': 4, 'train.seed': 1}."""
  out = {}
  for kv in assignments:
    key, sep, value = kv.partition('=')
    if not sep or not key:
      raise ValueError(f'override {kv!r} must be KEY=VALUE, e.g. level1.k=4')
    out[key.strip()] = parse_value(value.strip())
  return out


def grid(axes: dict[str, list]) -> list[dict[str, Any]]:
  """Every combination of the axes' values, the last axis varying fastest:
  grid({'level1.k': [2, 4], 'train.seed': [0, 1]}) -> 4 override dicts."""
  keys = list(axes)
  for k, values in axes.items():
    if not isinstance(values, (list, tuple)) or not values:
      raise ValueError(f'sweep axis {k!r} needs a non-empty list of values, got {values!r}')
  return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def parse_grid(specs: list[str]) -> dict[str, list]:
  """['level1.k=2,4', 'train.seed=0,1'] -> {'level1.k': [2, 4], 'train.seed': [0, 1]}."""
  axes = {}
  for spec in specs:
    key, sep, values = spec.partition('=')
    if not sep or not key or not values.strip():
      raise ValueError(f'--grid={spec!r} must be KEY=V1,V2,..., e.g. --grid=level1.k=2,4,8')
    axes[key.strip()] = [parse_value(v.strip()) for v in values.split(',')]
  return axes


def flag_value(value: Any) -> str:
  """The --config.KEY=VALUE text config_flags parses back to `value`."""
  if isinstance(value, bool):
    return 'True' if value else 'False'
  return str(value)
