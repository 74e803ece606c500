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


def analytic_state_bytes(n: int, d: int, model: int) -> int:
  """Per-device bytes of a level-1 train state (float32 params w_enc, w_dec [n, d], b_enc [n],
  b_dec [d]; Adam's two moments of each; two per-latent counters) with the latent axis split
  `model` ways (ceil: a split that does not divide pads the last shard). Scalars (step counts,
  the threshold) are left out: 16 bytes."""
  per = -(-n // model)
  params = 4 * (2 * per * d + per + d)
  return 3 * params + 8 * per


def global_bytes(tree: Any) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def compiled_bytes(compiled) -> dict[str, int]:
  """XLA's per-device memory accounting of a compiled step: arguments, outputs, temporaries,
  and the aliased bytes (donated state reused for the output)."""
  ma = compiled.memory_analysis()
  return {'argument': int(ma.argument_size_in_bytes), 'output': int(ma.output_size_in_bytes),
          'temp': int(ma.temp_size_in_bytes), 'alias': int(ma.alias_size_in_bytes),
          'generated_code': int(ma.generated_code_size_in_bytes)}


class CompiledStep(NamedTuple):
  compiled: Any           # jax.stages.Compiled
  state: Any              # the abstract TrainState (ShapeDtypeStructs with shardings)
  lower_s: float          # tracing + lowering seconds
  compile_s: float        # XLA compile seconds


def compile_step(mesh, levels: dict, init_params, optimizer, batch_shape: tuple[int, int],
                 batch_axes: tuple = ('batch', 'embed')) -> CompiledStep:
  """Compiles the sharded train step of `levels` against abstract inputs only: params come from
  `jax.eval_shape(init_params)`, so a 1M-latent dictionary is never built on any device or host.
  """
  import time  # pylint: disable=g-import-not-at-top
  from csae_jax import sharding  # pylint: disable=g-import-not-at-top
  from csae_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from csae_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  state = state_lib.abstract_state(mesh, jax.eval_shape(init_params), optimizer)
  fn, _ = step_lib.make_step(levels, optimizer)
  batch_sharding = sharding.named(mesh, *batch_axes)
  jstep = step_lib.jit_step(fn, jax.tree.map(lambda x: x.sharding, state), batch_sharding)
  t0 = time.perf_counter()
  lowered = jstep.lower(state, jax.ShapeDtypeStruct(batch_shape, np.float32,
                                                    sharding=batch_sharding))
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return CompiledStep(compiled, state, t1 - t0, time.perf_counter() - t1)
