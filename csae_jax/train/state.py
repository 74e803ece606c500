"""The train state: a plain pytree (orbax and shardings see ordinary arrays).

Several SAEs can live in one state (`params['level1']`, `params['level2']` in joint mode); each has
its inference threshold and a per-latent count of inputs since it last fired (dead-latent rule).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from csae_jax import sharding
from csae_jax.saes import common

# Saturating counter ceiling: "inputs since fired" never overflows int32 on 1B-token runs.
SINCE_FIRED_MAX = 1 << 30


@flax.struct.dataclass
class TrainState:
  step: jax.Array                      # int32 scalar: optimiser steps taken
  params: dict[str, common.Params]     # level name -> SAE params
  opt_state: Any
  threshold: dict[str, jax.Array]      # level name -> scalar inference threshold (-1: unset)
  since_fired: dict[str, jax.Array]    # level name -> [n] int32 inputs since last firing
  fire_rate: dict[str, jax.Array]      # level name -> [n] f32 EMA of the per-input firing rate


def param_shardings(mesh: Mesh, params: dict[str, common.Params]) -> dict[str, dict]:
  return {name: sharding.tree_shardings(mesh, {k: common.LOGICAL_AXES[k] for k in p})
          for name, p in params.items()}


def create(mesh: Mesh, params: dict[str, common.Params], optimizer: optax.GradientTransformation
           ) -> TrainState:
  """Places params with their logical shardings, then builds the rest around them.

  The optimiser state is created eagerly from already-sharded params under the mesh, so the
  Adam moments inherit the latent sharding (a jitted `opt.init` would return them replicated).
  """
  shardings = param_shardings(mesh, params)
  params = jax.device_put(params, shardings)
  with jax.set_mesh(mesh):
    opt_state = optimizer.init(params)
  rep = sharding.named(mesh)
  lat = sharding.named(mesh, 'latent')
  return TrainState(
      step=jax.device_put(jnp.zeros((), jnp.int32), rep),
      params=params,
      opt_state=opt_state,
      threshold={k: jax.device_put(jnp.full((), -1.0, jnp.float32), rep) for k in params},
      since_fired={k: jax.device_put(jnp.zeros((p['w_dec'].shape[0],), jnp.int32), lat)
                   for k, p in params.items()},
      fire_rate={k: jax.device_put(jnp.zeros((p['w_dec'].shape[0],), jnp.float32), lat)
                 for k, p in params.items()})


def create_stacked(mesh: Mesh, params: dict[str, common.Params],
                   optimizer: optax.GradientTransformation) -> TrainState:
  """A stack of independent states (leading axis R on every leaf), for a vmapped step: several
  SAEs trained on the same batches (restarts, seeds, sweeps). Replicated: used for level 2,
  whose dictionary is small."""
  n_stack = jax.tree.leaves(params)[0].shape[0]
  with jax.set_mesh(mesh):
    opt_state = jax.vmap(optimizer.init)(params)
  st = TrainState(
      step=jnp.zeros((n_stack,), jnp.int32), params=params, opt_state=opt_state,
      threshold={k: jnp.full((n_stack,), -1.0, jnp.float32) for k in params},
      since_fired={k: jnp.zeros((n_stack, p['w_dec'].shape[1]), jnp.int32)
                   for k, p in params.items()},
      fire_rate={k: jnp.zeros((n_stack, p['w_dec'].shape[1]), jnp.float32)
                 for k, p in params.items()})
  return jax.device_put(st, sharding.named(mesh))


def opt_state_shardings(mesh: Mesh, params: dict[str, common.Params], opt_state_shapes: Any
                        ) -> Any:
  """Each optimiser-state leaf found under [level][param] (Adam's mu, nu) takes that param's
  sharding; everything else (step counts) is replicated."""
  p_shard = param_shardings(mesh, params)
  rep = sharding.named(mesh)

  def pick(path, _):
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    for level, name in zip(keys, keys[1:]):
      if level in p_shard and name in p_shard[level]:
        return p_shard[level][name]
    return rep

  return jax.tree_util.tree_map_with_path(pick, opt_state_shapes)


def abstract_state(mesh: Mesh, params: dict[str, common.Params],
                   optimizer: optax.GradientTransformation) -> TrainState:
  """The train state as ShapeDtypeStructs with the shardings `create` gives it, from param
  shapes alone (`jax.eval_shape` of an init): what a 1M-latent step compiles against, and the
  per-device footprint, without building any array."""
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  opt_shapes = jax.eval_shape(optimizer.init, shapes)
  sds = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
  rep, lat = sharding.named(mesh), sharding.named(mesh, 'latent')
  scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=rep)
  per_latent = lambda p, dt: jax.ShapeDtypeStruct((p['w_dec'].shape[0],), dt, sharding=lat)
  return TrainState(
      step=scalar(jnp.int32),
      params=jax.tree.map(sds, shapes, param_shardings(mesh, shapes)),
      opt_state=jax.tree.map(sds, opt_shapes, opt_state_shardings(mesh, shapes, opt_shapes)),
      threshold={k: scalar(jnp.float32) for k in shapes},
      since_fired={k: per_latent(p, jnp.int32) for k, p in shapes.items()},
      fire_rate={k: per_latent(p, jnp.float32) for k, p in shapes.items()})


def shardings_of(state: TrainState) -> TrainState:
  return jax.tree.map(lambda x: x.sharding, state)


def abstract(state: TrainState) -> TrainState:
  """ShapeDtypeStructs with shardings: the restore target for orbax."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
