"""The train state: a plain pytree (orbax and shardings see ordinary arrays).

Several SAEs can live in one state (`params['level1']`, `params['level2']` in joint mode); each has
its inference threshold and a per-latent count of inputs since it last fired (dead-latent rule).
"""

from __future__ import annotations

from typing import Any, Callable

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


def param_shardings(mesh: Mesh, params: dict[str, common.Params], stacked: bool = False
                    ) -> dict[str, dict]:
  """Logical shardings of each level's params. stacked: a leading axis R (independent SAEs of a
  vmapped step) stays whole, and the latent axis is split over 'model' only where it divides
  (level 2's latent count follows the alive rows; a small level 2 replicated costs nothing)."""
  out = {}
  for name, p in params.items():
    if not stacked:
      out[name] = sharding.tree_shardings(mesh, {k: common.LOGICAL_AXES[k] for k in p})
      continue
    n = p['w_dec'].shape[1]
    split = n % mesh.shape['model'] == 0
    out[name] = sharding.tree_shardings(mesh, {
        k: (None,) + tuple(a if a != 'latent' or split else None for a in common.LOGICAL_AXES[k])
        for k in p})
  return out


def _initial(params: dict[str, common.Params], optimizer: optax.GradientTransformation
             ) -> TrainState:
  """The state before the first step (traced inside a jit whose out_shardings place it)."""
  n = {k: p['w_dec'].shape[0] for k, p in params.items()}
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
      threshold={k: jnp.full((), -1.0, jnp.float32) for k in params},
      since_fired={k: jnp.zeros((n[k],), jnp.int32) for k in params},
      fire_rate={k: jnp.zeros((n[k],), jnp.float32) for k in params})


def create(mesh: Mesh, params: dict[str, common.Params], optimizer: optax.GradientTransformation
           ) -> TrainState:
  """Places params with their logical shardings, then builds the rest around them, each leaf
  created in place with its sharding (`abstract_state`): the Adam moments inherit the latent
  sharding (a jitted `opt.init` without out_shardings would return them replicated)."""
  target = shardings_of(abstract_state(mesh, params, optimizer))
  params = jax.device_put(params, target.params)
  return jax.jit(lambda p: _initial(p, optimizer), out_shardings=target)(params)


def create_sharded(mesh: Mesh, init_params: Callable[[], dict[str, common.Params]],
                   optimizer: optax.GradientTransformation) -> TrainState:
  """The state of a jittable init, built shard by shard on the devices: no device or host ever
  holds a whole [n, d] matrix (a 1M x 2048 float32 one is 8 GiB)."""
  target = shardings_of(abstract_state(mesh, jax.eval_shape(init_params), optimizer))
  return jax.jit(lambda: _initial(init_params(), optimizer), out_shardings=target)()


def create_stacked(mesh: Mesh, params: dict[str, common.Params],
                   optimizer: optax.GradientTransformation) -> TrainState:
  """A stack of independent states (leading axis R on every leaf), for a vmapped step: several
  SAEs trained on the same batches (restarts, seeds, sweeps). The latent axis is split over
  'model' where it divides (`param_shardings`), so a 512k-latent level 2 shards like level 1."""
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
  return jax.device_put(st, shardings_of(abstract_state(mesh, params, optimizer, stacked=True)))


def opt_state_shardings(mesh: Mesh, params: dict[str, common.Params], opt_state_shapes: Any,
                        stacked: bool = False) -> Any:
  """Each optimiser-state leaf found under [level][param] (Adam's mu, nu) takes that param's
  sharding; everything else (step counts) is replicated."""
  p_shard = param_shardings(mesh, params, stacked)
  rep = sharding.named(mesh)

  def pick(path, _):
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    for level, name in zip(keys, keys[1:]):
      if level in p_shard and name in p_shard[level]:
        return p_shard[level][name]
    return rep

  return jax.tree_util.tree_map_with_path(pick, opt_state_shapes)


def abstract_state(mesh: Mesh, params: dict[str, common.Params],
                   optimizer: optax.GradientTransformation, stacked: bool = False) -> TrainState:
  """The train state as ShapeDtypeStructs with the shardings `create` (or, stacked,
  `create_stacked`) gives it, from param shapes alone (`jax.eval_shape` of an init): what a
  1M-latent step compiles against, and the per-device footprint, without building any array."""
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  init = jax.vmap(optimizer.init) if stacked else optimizer.init
  opt_shapes = jax.eval_shape(init, shapes)
  p_shard = param_shardings(mesh, shapes, stacked)
  sds = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
  lead = tuple(jax.tree.leaves(shapes)[0].shape[:1]) if stacked else ()
  rep = sharding.named(mesh)

  def per_latent(name, dt):  # the counters follow b_enc's sharding ([R,] n)
    return jax.ShapeDtypeStruct(shapes[name]['b_enc'].shape, dt, sharding=p_shard[name]['b_enc'])

  return TrainState(
      step=jax.ShapeDtypeStruct(lead, jnp.int32, sharding=rep),
      params=jax.tree.map(sds, shapes, p_shard),
      opt_state=jax.tree.map(sds, opt_shapes,
                             opt_state_shardings(mesh, shapes, opt_shapes, stacked)),
      threshold={k: jax.ShapeDtypeStruct(lead, jnp.float32, sharding=rep) for k in shapes},
      since_fired={k: per_latent(k, jnp.int32) for k in shapes},
      fire_rate={k: per_latent(k, jnp.float32) for k in shapes})


def shardings_of(state: TrainState) -> TrainState:
  return jax.tree.map(lambda x: x.sharding, state)


def abstract(state: TrainState) -> TrainState:
  """ShapeDtypeStructs with shardings: the restore target for orbax."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
