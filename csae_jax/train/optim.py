"""Adam with warmup, constant, then linear decay to 0 (the reference schedule), grad-norm clip."""

from __future__ import annotations

import optax


def lr_schedule(lr: float, steps: int, warmup_steps: int, decay_start: float) -> optax.Schedule:
  warmup = min(warmup_steps, max(steps - 1, 0))
  decay_at = max(int(decay_start * steps), warmup)
  return optax.join_schedules(
      [optax.linear_schedule(0.0 if warmup else lr, lr, max(warmup, 1)),
       optax.constant_schedule(lr),
       optax.linear_schedule(lr, 0.0, max(steps - decay_at, 1))],
      boundaries=[warmup, decay_at])


def make_optimizer(lr: float, steps: int, warmup_steps: int, decay_start: float,
                   grad_clip: float) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adam(lr_schedule(lr, steps, warmup_steps, decay_start), b1=0.9, b2=0.999))
