"""The training loop shared by every stage: resume, prefetch, jitted step, progress, checkpoints.

`fit` is the only place that iterates steps. It restores the stage's latest checkpoint if there is
one (so killing a run and starting it again continues where it stopped and, since batches and
schedules are pure functions of the step, reaches the same result), blocks on the metrics every
`log_every` steps (bounds XLA's async dispatch; see DESIGN.md's CPU-collective deadlock), stops on
a non-finite loss naming the step with the last good checkpoint intact, and saves every
`checkpoint_every` steps and at the end. Logged rows go to `<stage>/history.jsonl` and to
TensorBoard event files (`summaries.py`).
"""

from __future__ import annotations

import concurrent.futures
import math
import sys
import time
import json
import os
from typing import Callable, Iterable, Iterator, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from csae_jax import checkpoint as ckpt_lib
from csae_jax import sharding
from csae_jax.train import state as state_lib
from csae_jax.train import step as step_lib
from csae_jax.train import summaries


class BatchSource(Protocol):
  def batch(self, step: int) -> np.ndarray: ...


def prefetch(fn: Callable[[int], np.ndarray], steps: Iterable[int], depth: int = 2
             ) -> Iterator[tuple[int, np.ndarray]]:
  """Produces fn(step) in a background thread, `depth` batches ahead (reading and shuffling
  overlap with the device step; numpy releases the GIL for the heavy parts)."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    steps = iter(steps)
    queue = []
    for s in steps:
      queue.append((s, pool.submit(fn, s)))
      if len(queue) > depth:
        s0, fut = queue.pop(0)
        yield s0, fut.result()
    for s0, fut in queue:
      yield s0, fut.result()


class NonFiniteLoss(FloatingPointError):
  pass


class FitResult(NamedTuple):
  state: state_lib.TrainState
  history: list[dict]   # logged metrics of the whole stage (earlier runs included on resume)
  n_traces: int         # how many times the step was traced (1: it compiled once)


def _load_history(path: str, upto: int) -> list[dict]:
  """The stage's logged metrics up to the resumed step (later lines were lost work)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if r['step'] <= upto]


def fit(*, stage: ckpt_lib.Stage, mesh: Mesh, levels: dict[str, step_lib.LevelSpec],
        init_params: Callable[[], dict], optimizer: optax.GradientTransformation,
        source: BatchSource, steps: int, log_every: int, checkpoint_every: int,
        joint: step_lib.JointSpec | None = None,
        before_step: Callable[[int, state_lib.TrainState], state_lib.TrainState] | None = None,
        hooks: Iterable[Callable[[int, state_lib.TrainState], None]] = (),
        desc: str = '', batch_axes: tuple = ('batch', 'embed'), stacked: bool = False,
        stack_hparams: dict[str, np.ndarray] | None = None,
        jittable_init: bool = False) -> FitResult:
  """Trains to `steps`, resuming from the stage's checkpoint. Returns (state, logged history).

  before_step(step, state) -> state runs on the host before the step (joint mode starts level 2
  with it); hooks(step_done, state) after each step (tests interrupt runs with them).
  batch_axes: the logical axes of a batch; level 2's small row batches are replicated with
  (None, 'embed'). stacked: init_params returns params with a leading axis R; R independent
  SAEs are trained by a vmapped step on the same batches (metrics are then [R] arrays).
  stack_hparams: with stacked, per-SAE hyperparameters ([R] arrays, see `step.make_step`).
  jittable_init: init_params can be traced (`stages.sae_init_fn`). Where the latents are
  sharded (mesh 'model' > 1) the state is then built shard by shard on the devices
  (`state.create_sharded`): a 1M-latent dictionary never exists whole on one device. An
  unsharded dictionary is whole on every device anyway, and keeps the eager init (the jitted
  one differs from it in the last bit of a few weights).
  """
  if stacked:
    state = state_lib.create_stacked(mesh, init_params(), optimizer)
  elif jittable_init and mesh.shape['model'] > 1:
    state = state_lib.create_sharded(mesh, init_params, optimizer)
  else:
    state = state_lib.create(mesh, init_params(), optimizer)
  start = 0
  _, restored = stage.restore_latest(state_lib.abstract(state))  # skips unreadable ones
  if restored is not None:
    state = restored
    start = int(np.max(state.step))
  step_fn, trace_count = step_lib.make_step(levels, optimizer, joint)
  hp, hp_sharding = None, None
  if stacked:
    in_axes = (0, None) if stack_hparams is None else (0, None, 0)
    step_fn = jax.vmap(step_fn, in_axes=in_axes)
  if stack_hparams is not None:
    hp_sharding = sharding.named(mesh)
    hp = jax.device_put({k: jnp.asarray(v) for k, v in stack_hparams.items()}, hp_sharding)
  shardings = state_lib.shardings_of(state)
  batch_sharding = sharding.named(mesh, *batch_axes)
  jstep = step_lib.jit_step(step_fn, shardings, batch_sharding, hp_sharding)
  step_args = () if hp is None else (hp,)
  history_path = os.path.join(stage.dir, 'history.jsonl')
  history = _load_history(history_path, start)
  if jax.process_index() == 0:
    ckpt_lib.write_lines_atomic(history_path, [json.dumps(r) for r in history])
  bar = tqdm(total=steps, initial=start, desc=desc, file=sys.stderr, dynamic_ncols=True,
             disable=jax.process_index() != 0, mininterval=1.0)
  writer = summaries.Writer(stage.dir, start)  # WD/tensorboard/<stage>, truncated like history
  try:
    t0 = time.perf_counter()
    for s, local_bd in prefetch(source.batch, range(start, steps)):
      if before_step is not None:
        state = before_step(s, state)
      state, metrics = jstep(state, sharding.put_batch(batch_sharding, local_bd), *step_args)
      done = s + 1
      for hook in hooks:
        hook(done, state)
      last = done == steps
      if done % log_every == 0 or last or done % checkpoint_every == 0:
        m = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(m['loss']):
          raise NonFiniteLoss(
              f'{desc}: loss is {m["loss"]} at step {done}; the last good checkpoint '
              f'(step {stage.latest_step()}) in {stage.dir} is intact. Lower train.lr or '
              f'check the data for extreme values.')
        m['step'] = done
        m['elapsed_s'] = time.perf_counter() - t0
        history.append(m)
        if jax.process_index() == 0:
          with open(history_path, 'a') as f:
            f.write(json.dumps(m) + '\n')
        writer.scalars(done, m)
        bar.set_postfix({k.split('/')[-1]: f'{v:.3g}' for k, v in m.items()
                         if k.endswith(('/fvu', '/l0', '/dead_frac'))}, refresh=False)
        bar.update(done - bar.n)
        if done % checkpoint_every == 0 or last:
          writer.flush()
          stage.save(done, state, extra={'metrics': m})
  finally:
    bar.close()
    writer.close()
  return FitResult(state, history, trace_count[0])
