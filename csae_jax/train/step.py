"""The jitted, sharded train step: one function for level 1, staged level 2 and joint CSAE.

`make_step` closes over static settings only, so the step compiles once for a run (k annealing,
the level-2 start and the inference-threshold start are traced scalars, not Python branches).
The state is donated; inputs are sharded over 'data', latents over 'model'.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from csae_jax.saes import codes as codes_lib, common, get_arch, objective
from csae_jax.train import state as state_lib


# EMA of each latent's firing rate (dense-latent counter): a window of ~1000 steps.
FIRE_RATE_DECAY = 0.999
# A latent firing on more than this fraction of inputs counts as dense.
DENSE_RATE = 0.1


class LevelSpec(NamedTuple):
  hyper: objective.SAEHyper
  threshold_decay: float
  threshold_start: int


class JointSpec(NamedTuple):
  alpha: float
  level2_start: int
  stop_gradient: str  # 'none' | 'partial' | 'bilateral'


def _update_level(spec: LevelSpec, st: state_lib.TrainState, name: str, codes, step,
                  n_inputs, valid_b=None):
  """codes: dense [B, n] or the sparse step's pairs (`codes.Codes`): same statistics."""
  arch = get_arch(spec.hyper.arch)
  codes = codes_lib.mask_rows(codes, valid_b)
  thr = arch.update_threshold(st.threshold[name], codes, spec.threshold_decay,
                              step >= spec.threshold_start)
  counts_n = codes_lib.fire_counts(codes, st.since_fired[name].shape[-1])
  since = jnp.where(counts_n > 0, 0, jnp.minimum(st.since_fired[name] + n_inputs,
                                                 state_lib.SINCE_FIRED_MAX))
  rate_n = counts_n / jnp.maximum(n_inputs, 1)
  rate_n = FIRE_RATE_DECAY * st.fire_rate[name] + (1 - FIRE_RATE_DECAY) * rate_n
  return thr, since.astype(jnp.int32), rate_n


def make_step(levels: dict[str, LevelSpec], optimizer: optax.GradientTransformation,
              joint: JointSpec | None = None):
  """Returns step(state, batch_bd, hp=None) -> (state, metrics). One level: an SAE trained on
  the batch. Two levels with `joint`: CSAE, L = L1(batch) + alpha * L2(live level-1 rows).

  hp (sweeps): a dict of traced per-SAE scalars for the data level, vmapped with the stacked
  state: 'lr_scale' multiplies the Adam update (Adam is linear in its learning rate), the
  other keys ('k', 'l1_coeff', 'l0_coeff', 'target_l0', 'd', 'n_valid') replace SAEHyper
  fields ('n_valid': the SAE's real latents, the rest of the stacked dictionary is padding).
  """
  names = list(levels)
  data_level = names[0]
  trace_count = [0]
  # Archs with unit decoder rows get them renormalised (and the parallel gradient removed).
  unit_decoder = {n: get_arch(s.hyper.arch).unit_decoder for n, s in levels.items()}

  def loss_fn(params, st, batch_bd, hp):
    s1 = levels[data_level]
    hyper1 = s1.hyper._replace(**{k: v for k, v in hp.items() if k != 'lr_scale'})
    out1 = objective.sae_loss(hyper1, params[data_level], st.since_fired[data_level], batch_bd,
                              st.step)
    metrics = {f'{data_level}/{k}': v for k, v in out1._asdict().items() if k != 'codes'}
    aux = {data_level: (out1.codes, None)}
    total = out1.loss
    if joint is not None:
      # unit rows: a no-op for unit-decoder archs, the row direction for relu_l1
      rows_nd = common.normalize_rows(params[data_level]['w_dec'])
      # dynamic masking: atoms used in this batch
      live_n = codes_lib.fired(out1.codes, rows_nd.shape[0])
      x2 = jax.lax.stop_gradient(rows_nd) if joint.stop_gradient != 'none' else rows_nd
      t2 = jax.lax.stop_gradient(rows_nd) if joint.stop_gradient == 'bilateral' else rows_nd
      step2 = st.step - joint.level2_start
      out2 = objective.sae_loss(levels['level2'].hyper, params['level2'], st.since_fired['level2'],
                                x2, step2, target_bd=t2, valid_b=live_n)
      on = (step2 >= 0) & jnp.any(live_n)
      total = total + jnp.where(on, joint.alpha, 0.0) * out2.loss
      metrics.update({f'level2/{k}': v for k, v in out2._asdict().items() if k != 'codes'})
      metrics['level2/live_rows'] = jnp.sum(live_n)
      aux['level2'] = (out2.codes, live_n)
    metrics['loss'] = total
    return total, (metrics, aux)

  def step(st: state_lib.TrainState, batch_bd: jax.Array, hp: dict | None = None):
    trace_count[0] += 1  # Python side effect: runs once per trace (the compile guard reads it)
    hp = hp or {}
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (metrics, aux)), grads = grad_fn(st.params, st, batch_bd, hp)
    grads = {n: ({**g, 'w_dec': common.remove_parallel_grad(g['w_dec'], st.params[n]['w_dec'])}
                 if unit_decoder[n] else g) for n, g in grads.items()}
    metrics['grad_norm'] = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, st.opt_state, st.params)
    if 'lr_scale' in hp:
      updates = jax.tree.map(lambda u: u * hp['lr_scale'], updates)
    params = optax.apply_updates(st.params, updates)
    params = {n: ({**p, 'w_dec': common.normalize_rows(p['w_dec'])} if unit_decoder[n] else p)
              for n, p in params.items()}
    thresholds, since, rates = dict(st.threshold), dict(st.since_fired), dict(st.fire_rate)
    for name, (codes, valid_b) in aux.items():
      spec = levels[name]
      lstep = st.step if name == data_level or joint is None else st.step - joint.level2_start
      n_inputs = batch_bd.shape[0] if valid_b is None else jnp.sum(valid_b).astype(jnp.int32)
      thr, sf, rate = _update_level(spec, st, name, codes, lstep, n_inputs, valid_b)
      if joint is not None and name != data_level:  # level 2 frozen in time until it starts
        started = lstep >= 0
        thr, sf = jnp.where(started, thr, st.threshold[name]), jnp.where(started, sf, 0)
        rate = jnp.where(started, rate, 0.0)
      thresholds[name], since[name], rates[name] = thr, sf, rate
    for name in names:
      n = since[name].shape[-1]
      # padding latents (hp 'n_valid', sweeps over the dictionary size) are neither dead nor dense
      real_n = (objective.latent_mask(levels[name].hyper._replace(n_valid=hp['n_valid']), n)
                if name == data_level and 'n_valid' in hp else jnp.ones((n,), bool))
      frac = lambda m_n: jnp.sum(m_n & real_n) / jnp.maximum(jnp.sum(real_n), 1)
      metrics[f'{name}/dead_frac'] = frac(since[name] >= levels[name].hyper.dead_tokens)
      metrics[f'{name}/threshold'] = thresholds[name]
      metrics[f'{name}/dense_frac'] = frac(rates[name] > DENSE_RATE)
    new = st.replace(step=st.step + 1, params=params, opt_state=opt_state, threshold=thresholds,
                     since_fired=since, fire_rate=rates)
    return new, metrics

  return step, trace_count


def jit_step(step_fn, state_shardings, batch_sharding, hp_sharding=None):
  """jit with explicit shardings and the state donated (no second copy of a big dictionary).
  With hp_sharding, the step takes per-SAE hyperparameters as a third argument (sweeps)."""
  in_shardings = (state_shardings, batch_sharding)
  if hp_sharding is not None:
    in_shardings += (hp_sharding,)
  return jax.jit(step_fn, in_shardings=in_shardings, out_shardings=(state_shardings, None),
                 donate_argnums=(0,))
