"""Stage 'joint' of CSAE: one objective L1(batch) + alpha * L2(live level-1 rows) over both
levels (the paper's training; `joint.stop_gradient` gives its partial / bilateral ablations).

Level 2 is a placeholder until `joint.level2_start`, where it is initialised from the decoder
rows of the level-1 atoms alive so far (b_dec2 = their geometric median, as the reference does).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from csae_jax import config as config_lib
from csae_jax import stages
from csae_jax.cascade import level1 as level1_lib
from csae_jax.cascade import staged
from csae_jax.train import loop
from csae_jax.train import step as step_lib


def train(cfg: config_lib.Config, source, mesh, workdir: str, *, hooks=()
          ) -> tuple[level1_lib.Level1, staged.Level2]:
  """Trains (or resumes) stage 'joint'; returns its level 1 and level 2."""
  t = cfg.train
  key1, key2 = jax.random.split(jax.random.key(t.seed))
  x0_bd = stages.first_global_batch(source)
  spec1 = stages.level_spec(cfg.level1, source.d, t.steps, t.compute_dtype,
                            config_lib.use_sparse_step(cfg, jax.default_backend()), mesh=mesh)
  stage = stages.make_stage(cfg, workdir, 'joint',
                            ('data', 'level1', 'level2', 'train', 'joint'), source)
  spec2 = stages.level_spec(cfg.level2, source.d, t.steps - cfg.joint.level2_start,
                            t.compute_dtype)
  jspec = step_lib.JointSpec(cfg.joint.alpha, cfg.joint.level2_start, cfg.joint.stop_gradient)

  def start_level2(s, st):
    """At level2_start: b_dec2 = geometric median of the decoder rows of atoms alive so far."""
    if s != cfg.joint.level2_start:
      return st
    alive_n = np.asarray(jax.device_get(st.since_fired['level1'])) < spec1.hyper.dead_tokens
    rows = stages.unit_rows(st.params['level1'])[alive_n if alive_n.any() else slice(None)]
    fresh = stages.init_sae(key2, cfg.level2, rows)
    params = {**st.params, 'level2': jax.device_put(
        fresh, jax.tree.map(lambda a: a.sharding, st.params['level2']))}
    return st.replace(params=params)

  init1 = stages.sae_init_fn(key1, cfg.level1, x0_bd)
  init2 = stages.sae_init_fn(key2, dataclasses.replace(cfg.level2, decoder_init='random',
                                                       b_dec_init='zeros'), x0_bd)
  res = loop.fit(stage=stage, mesh=mesh, levels={'level1': spec1, 'level2': spec2},
                 # level 2 is a placeholder until level2_start re-initialises it from rows
                 init_params=lambda: {'level1': init1(), 'level2': init2()},
                 jittable_init=True,
                 optimizer=stages.optimizer(t.lr, t.steps, t), source=source, steps=t.steps,
                 log_every=t.log_every, checkpoint_every=t.checkpoint_every, joint=jspec,
                 before_step=start_level2, hooks=hooks, desc='joint CSAE')
  l1 = level1_lib.from_params(cfg, source, res.state.params['level1'],
                              res.state.threshold['level1'])
  p2, thr2 = res.state.params['level2'], float(res.state.threshold['level2'])
  _, rows_rd = l1.alive_rows()
  l2 = staged.Level2(p2, thr2, staged.metrics(cfg, p2, thr2, rows_rd), res.history, stage,
                     cfg.level2.arch, cfg.level2.k)
  return l1, l2
