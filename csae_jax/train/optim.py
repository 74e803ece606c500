"""Adam with a learning-rate schedule and a global grad-norm clip.

Schedules (all start with a linear warmup from 0):
  'linear_decay' (the reference): constant, then linear decay to 0 from `decay_start` of training;
  'cosine': cosine decay to 0 over the remaining steps;
  'constant': constant after the warmup.
"""

from __future__ import annotations

import optax

SCHEDULES = ('linear_decay', 'cosine', 'constant')


def lr_schedule(lr: float, steps: int, warmup_steps: int, decay_start: float,
                kind: str = 'linear_decay') -> optax.Schedule:
  warmup = min(warmup_steps, max(steps - 1, 0))
  ramp = optax.linear_schedule(0.0 if warmup else lr, lr, max(warmup, 1))
  if kind == 'linear_decay':
    decay_at = max(int(decay_start * steps), warmup)
    return optax.join_schedules(
        [ramp, optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, max(steps - decay_at, 1))],
        boundaries=[warmup, decay_at])
  if kind == 'cosine':
    return optax.join_schedules([ramp, optax.cosine_decay_schedule(lr, max(steps - warmup, 1))],
                                boundaries=[warmup])
  if kind == 'constant':
    return optax.join_schedules([ramp, optax.constant_schedule(lr)], boundaries=[warmup])
  raise ValueError(f'train.lr_schedule = {kind!r}; choose one of {list(SCHEDULES)}')


def make_optimizer(lr: float, steps: int, warmup_steps: int, decay_start: float,
                   grad_clip: float, schedule: str = 'linear_decay'
                   ) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(grad_clip),
      optax.adam(lr_schedule(lr, steps, warmup_steps, decay_start, schedule), b1=0.9, b2=0.999))
