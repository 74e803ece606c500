"""Training curves as TensorBoard event files: `<workdir>/tensorboard/<stage>/events.out.tfevents.*`
(`tensorboard --logdir WD/tensorboard` shows every stage of a run side by side).

Written with TensorBoard's own framework-free event writer (the one `torch.utils.tensorboard`
wraps), not `clu.metric_writers` (its package `__init__` imports its TensorFlow writer, and its
only other TensorBoard back end is torch's) nor tensorboardX (its `__init__` imports torch
whenever torch is installed, and nothing under csae_jax/ imports torch). Only process 0 writes.

Resuming: the logged steps after a stage's last checkpoint were lost work, and `loop.fit`
truncates `history.jsonl` to the resumed step. The event stream follows the same rule, for any
reader: opening a writer at step S copies the events of steps <= S (each step once, with its
original wall time) into the writer's new file and deletes the older files, so the stage's
folder holds one stream, the resumed run continues it, and no step appears twice. A stage
starting at step 0 keeps nothing (old files belong to a run that no longer exists).
"""

from __future__ import annotations

import glob
import os
import time

import jax

SKIP = ('step',)  # logged with every row, not a curve
PREFIX = 'events.out.tfevents.'


def logdir(stage_dir: str) -> str:
  """WD/tensorboard/<stage> for the stage checkpointed in WD/<stage>."""
  parent, name = os.path.split(os.path.abspath(stage_dir))
  return os.path.join(parent, 'tensorboard', name)


def _events_upto(files: list[str], step: int) -> list:
  """The summary events of `files` with step <= `step`, one per step (the first one read; a
  crash between copying and deleting leaves two copies), in step order."""
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  by_step = {}
  for path in sorted(files):
    # the loader stops at a truncated last record (a killed writer), keeping what precedes it
    for e in event_file_loader.LegacyEventFileLoader(path).Load():
      if e.HasField('summary') and e.step <= step:
        by_step.setdefault(e.step, e)
  return [by_step[s] for s in sorted(by_step)]


class Writer:
  """Scalars of one stage; a no-op on processes other than 0."""

  def __init__(self, stage_dir: str, start_step: int):
    self.dir = logdir(stage_dir)
    self._w = None
    if jax.process_index() != 0:
      return
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.summary.writer import event_file_writer  # pylint: disable=g-import-not-at-top
    self._pb, self._summary_pb = event_pb2, summary_pb2
    old = glob.glob(os.path.join(self.dir, PREFIX + '*'))
    kept = _events_upto(old, start_step)
    self._w = event_file_writer.EventFileWriter(self.dir, flush_secs=30)
    for e in kept:
      self._w.add_event(e)
    self._w.flush()  # the copy is on disk before the originals go
    for path in old:
      os.remove(path)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._w is None:
      return
    summary = self._summary_pb.Summary(value=[
        self._summary_pb.Summary.Value(tag=k, simple_value=float(v))
        for k, v in values.items() if k not in SKIP])
    self._w.add_event(self._pb.Event(wall_time=time.time(), step=int(step), summary=summary))

  def flush(self) -> None:
    """Called before each checkpoint: the steps a resume keeps are then on disk."""
    if self._w is not None:
      self._w.flush()

  def close(self) -> None:
    if self._w is not None:
      self._w.close()
      self._w = None
