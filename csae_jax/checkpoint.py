"""Stage checkpoints: an orbax CheckpointManager per stage plus the stage's manifest.json.

    <workdir>/<stage>/ckpt/<step>/   orbax, atomic (written to a temporary name, then renamed),
                                     keep-N; csae_checksums.json: sha256 of every file in it
    <workdir>/<stage>/unreadable/    checkpoints found corrupt on resume, set aside (not deleted)
    <workdir>/<stage>/manifest.json  schema version, resolved config, config hash, parent stage,
                                     data fingerprint; written before the first save

A stage whose manifest disagrees with the current config is refused (unless overwrite=True,
which deletes it): resuming someone else's checkpoint silently is how results get lost.

Faults: orbax leaves a killed save as `<step>.orbax-checkpoint-tmp-*`, which it never lists as a
step (and removes when the next run starts). A committed checkpoint can still be damaged later (a
bad disk, a copy cut short): orbax restores flipped bytes in its compressed files without error
(measured), so each save records a checksum of every file and a resume verifies the newest one,
falling back to the newest readable checkpoint with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

SCHEMA_VERSION = 1
CHECKSUMS = 'csae_checksums.json'


def write_json_atomic(path: str, obj: Any) -> None:
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


class Stage:
  """One stage's checkpoint directory."""

  def __init__(self, workdir: str, name: str, *, manifest: dict, keep: int, overwrite: bool):
    self.name = name
    self.dir = os.path.abspath(os.path.join(workdir, name))
    self.manifest_path = os.path.join(self.dir, 'manifest.json')
    manifest = {'schema_version': SCHEMA_VERSION, 'stage': name, **manifest}
    if os.path.exists(self.manifest_path):
      old = read_json(self.manifest_path)
      if old.get('config_hash') != manifest['config_hash'] or old.get(
          'data_fingerprint') != manifest['data_fingerprint'] or old.get(
              'parent') != manifest.get('parent'):
        if not overwrite:
          raise ValueError(_mismatch_message(self.dir, old, manifest))
        if jax.process_index() == 0:
          shutil.rmtree(self.dir)
    barrier(f'{self.dir}:reset')  # nobody writes into a directory process 0 is deleting
    os.makedirs(self.dir, exist_ok=True)
    if jax.process_index() == 0 and not os.path.exists(self.manifest_path):
      write_json_atomic(self.manifest_path, manifest)
    self.manifest = manifest
    self.manager = ocp.CheckpointManager(
        os.path.join(self.dir, 'ckpt'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False,
                                             cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.dir, 'ckpt', str(step))

  def save(self, step: int, state: Any, *, extra: dict | None = None) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self.manager.wait_until_finished()
    if jax.process_index() == 0:
      write_checksums(self.step_dir(step))
      if extra is not None:
        write_json_atomic(os.path.join(self.dir, 'progress.json'), {'step': step, **extra})

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def restore_latest(self, abstract_state: Any) -> tuple[int | None, Any]:
    """(step, state) of the newest readable checkpoint, or (None, None) when there is none.

    A checkpoint whose files fail their checksums, or that orbax cannot restore, is skipped with
    a warning and moved to <stage>/unreadable/ (so the step can be saved again) once an older
    one restored. When none restores, the newest one's problem is raised and nothing is moved:
    a failure of every checkpoint is more likely a mistake than a disk fault.
    """
    bad: list[tuple[int, str]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      problem = _agree(verify_checksums(self.step_dir(step)) if jax.process_index() == 0 else '')
      state = None
      if not problem:
        try:
          state = self.restore(abstract_state, step)
        except Exception as e:  # pylint: disable=broad-except  (any unreadable file)
          problem = f'orbax cannot restore it ({type(e).__name__}: {_first_line(e)})'
      if _agree('' if problem else 'ok', all_processes=True) != 'ok':
        bad.append((step, problem or 'it failed to restore on another process'))
        continue
      for bad_step, why in bad:
        moved = self._set_aside(bad_step)
        logging.warning('%s: the checkpoint of step %d is unreadable: %s. Skipped it (moved to '
                        '%s) and resumed from step %d; steps %d..%d will be trained again.',
                        self.dir, bad_step, why, moved, step, step + 1, bad_step)
      if bad:
        self.manager.reload()
      return step, state
    if bad:
      step, why = bad[0]
      raise ValueError(f'no checkpoint in {self.dir}/ckpt can be restored (newest: step {step}, '
                       f'{why}). Use another --workdir, or pass --config.overwrite=True to '
                       f'start this stage over.')
    return None, None

  def _set_aside(self, step: int) -> str:
    dest = os.path.join(self.dir, 'unreadable', f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      os.replace(self.step_dir(step), dest)
    barrier(f'{self.dir}:set_aside:{step}')
    return dest

  def mark_done(self, result: dict) -> None:
    if jax.process_index() == 0:
      write_json_atomic(os.path.join(self.dir, 'done.json'), result)

  def done(self) -> dict | None:
    path = os.path.join(self.dir, 'done.json')
    return read_json(path) if os.path.exists(path) else None

  def close(self) -> None:
    self.manager.close()


def barrier(name: str) -> None:
  """All processes wait here (a no-op in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _agree(value: str, all_processes: bool = False) -> str:
  """Process 0's string on every process; with all_processes, '' unless every process has a
  non-empty one (so every process takes the same branch of a collective restore)."""
  if jax.process_count() == 1:
    return value
  if all_processes:
    oks = multihost_utils.process_allgather(np.int32(bool(value)))
    return value if np.all(oks) else ''
  buf = np.zeros(1024, np.uint8)
  raw = value.encode()[:1024]
  buf[:len(raw)] = np.frombuffer(raw, np.uint8)
  buf = multihost_utils.broadcast_one_to_all(buf)
  return bytes(np.asarray(buf)).rstrip(b'\0').decode(errors='replace')


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return text[0][:300] if text else ''


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    for n in names:
      rel = os.path.relpath(os.path.join(root, n), step_dir)
      if rel != CHECKSUMS:
        out.append(rel)
  return sorted(out)


def _sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def write_checksums(step_dir: str) -> None:
  """sha256 and size of every file of a committed checkpoint, in <step_dir>/csae_checksums.json
  (orbax's keep-N deletes it with the step)."""
  sums = {rel: {'bytes': os.path.getsize(os.path.join(step_dir, rel)),
                'sha256': _sha256(os.path.join(step_dir, rel))} for rel in _files(step_dir)}
  write_json_atomic(os.path.join(step_dir, CHECKSUMS), sums)


def verify_checksums(step_dir: str) -> str:
  """'' when every recorded file is present and intact, else what is wrong. A checkpoint without
  checksums (killed between orbax's commit and their write) is complete: orbax committed it."""
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.exists(path):
    return ''
  try:
    sums = read_json(path)
  except (OSError, ValueError) as e:
    return f'its {CHECKSUMS} is unreadable ({e})'
  for rel, want in sums.items():
    f = os.path.join(step_dir, rel)
    if not os.path.exists(f):
      return f'file {rel} is missing'
    if os.path.getsize(f) != want['bytes']:
      return f'file {rel} has {os.path.getsize(f)} bytes, {want["bytes"]} were written'
    if _sha256(f) != want['sha256']:
      return f'file {rel} does not match the sha256 recorded when it was saved'
  return ''


def _mismatch_message(stage_dir: str, old: dict, new: dict) -> str:
  diffs = []
  old_cfg, new_cfg = _flatten(old.get('config', {})), _flatten(new.get('config', {}))
  for key in sorted(set(old_cfg) | set(new_cfg)):
    if old_cfg.get(key) != new_cfg.get(key):
      diffs.append(f'{key}: {old_cfg.get(key)!r} -> {new_cfg.get(key)!r}')
  if old.get('data_fingerprint') != new.get('data_fingerprint'):
    diffs.append('the data changed (fingerprint differs)')
  if old.get('parent') != new.get('parent'):
    diffs.append('its parent stage changed')
  shown = '; '.join(diffs[:8]) + (' ...' if len(diffs) > 8 else '')
  return (f'{stage_dir} holds a checkpoint made with a different config ({shown}). '
          f'Use another --workdir, or pass --config.overwrite=True to delete it and start over.')


def _flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = v
  return out


def write_lines_atomic(path: str, lines: list[str]) -> None:
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    f.writelines(line + '\n' for line in lines)
  os.replace(tmp, path)
