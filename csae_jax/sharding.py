"""The device mesh and shardings, as data: code names logical axes, rules map them to mesh axes.

Logical axes: 'batch' (inputs), 'latent' (dictionary entries), 'embed' (activation dim).
Default rules: batch -> 'data', latent -> 'model', embed -> replicated. A 1M-latent dictionary
shards its encoder/decoder over 'model'; data parallelism goes over 'data'.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from csae_jax.config import MeshConfig

DEFAULT_RULES: dict[str, str | None] = {'batch': 'data', 'latent': 'model', 'embed': None}


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """('data', 'model') mesh with Auto axes (so XLA's partitioner places collectives)."""
  devices = list(devices if devices is not None else jax.devices())
  model = cfg.model
  data = cfg.data if cfg.data != -1 else len(devices) // model
  if data * model != len(devices) or data < 1:
    raise ValueError(
        f'mesh.data x mesh.model = {cfg.data} x {model} does not cover the {len(devices)} '
        f'devices; set --config.mesh.model to a divisor of {len(devices)} and mesh.data=-1')
  grid = np.asarray(devices).reshape(data, model)
  return Mesh(grid, ('data', 'model'), axis_types=(AxisType.Auto, AxisType.Auto))


def spec(*logical: str | None, rules: dict[str, str | None] | None = None) -> P:
  rules = DEFAULT_RULES if rules is None else rules
  return P(*[rules.get(a) if a is not None else None for a in logical])


def named(mesh: Mesh, *logical: str | None) -> NamedSharding:
  return NamedSharding(mesh, spec(*logical))


def tree_shardings(mesh: Mesh, logical_tree: Any) -> Any:
  """Tree of logical-axis tuples -> tree of NamedShardings."""
  return jax.tree.map(lambda axes: named(mesh, *axes), logical_tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def process_rows(batch_sharding: NamedSharding, global_rows: int) -> tuple[int, int]:
  """[start, stop) of the global batch's rows that this process's devices hold (each process
  reads only those: `put_batch`)."""
  index = batch_sharding.addressable_devices_indices_map((global_rows, 1))
  ranges = sorted({(sl[0].start or 0, global_rows if sl[0].stop is None else sl[0].stop)
                   for sl in index.values()})
  start, stop = ranges[0]
  for lo, hi in ranges[1:]:
    if lo > stop:
      raise ValueError(f'this process holds rows {ranges} of the batch, not one contiguous '
                       f'block; set --config.mesh.model to a divisor of the devices per host')
    stop = max(stop, hi)
  return start, stop


def put_batch(batch_sharding: NamedSharding, local_bd: np.ndarray) -> jax.Array:
  """This process's rows of the global batch -> one global array with `batch_sharding`."""
  return jax.make_array_from_process_local_data(batch_sharding, local_bd)


def replicate(mesh: Mesh, x: Any) -> Any:
  return jax.device_put(x, NamedSharding(mesh, P()))
