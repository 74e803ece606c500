"""What a sharded train step costs each device, read from shapes and compiled HLO (no arrays).

`state_bytes` is the analytic figure (params + optimiser state + counters, from the abstract
state's shapes and shardings); `compiled_bytes` is XLA's own per-device accounting of the compiled
step (`memory_analysis`); `collectives` lists the cross-device ops of the compiled HLO with their
result shapes, so a test can prove that no [batch, n_latents] array is ever gathered.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import jax
import numpy as np

_COLLECTIVE = re.compile(
    r'=\s*(?P<type>\(.*?\)|\S+)\s+(?P<op>all-gather|all-reduce|all-to-all|reduce-scatter|'
    r'collective-permute|collective-broadcast)(?:-start)?\(')
_SHAPE = re.compile(r'\b[a-z]+\d*\[([\d,]*)\]')


class Collective(NamedTuple):
  op: str                          # 'all-gather', 'all-reduce', ...
  shapes: tuple[tuple[int, ...], ...]  # result shapes (a combined collective has several)

  @property
  def max_elements(self) -> int:
    return max((math.prod(s) for s in self.shapes), default=0)


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective of a compiled module's text (`compiled.as_text()`), with its per-device
  result shapes. `-start` halves of async pairs count once; their `-done` halves are skipped."""
  out = []
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if m is None:
      continue
    shapes = tuple(tuple(int(v) for v in g.split(',') if v) for g in _SHAPE.findall(m['type']))
    out.append(Collective(m['op'], shapes))
  return out


def shard_bytes(x: Any) -> int:
  """Bytes one device holds of a ShapeDtypeStruct / jax.Array with a sharding (the largest
  shard: shards of a sharded axis are equal when it divides, which the mesh checks enforce)."""
  shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
  return math.prod(shape) * np.dtype(x.dtype).itemsize


def state_bytes(tree: Any) -> int:
  """Per-device bytes of a tree of sharded ShapeDtypeStructs or arrays."""
  return sum(shard_bytes(x) for x in jax.tree.leaves(tree))


def global_bytes(tree: Any) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def compiled_bytes(compiled) -> dict[str, int]:
  """XLA's per-device memory accounting of a compiled step: arguments, outputs, temporaries,
  and the aliased bytes (donated state reused for the output)."""
  ma = compiled.memory_analysis()
  return {'argument': int(ma.argument_size_in_bytes), 'output': int(ma.output_size_in_bytes),
          'temp': int(ma.temp_size_in_bytes), 'alias': int(ma.alias_size_in_bytes),
          'generated_code': int(ma.generated_code_size_in_bytes)}
