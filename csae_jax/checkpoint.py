"""Stage checkpoints: an orbax CheckpointManager per stage plus the stage's manifest.json.

    <workdir>/<stage>/ckpt/<step>/   orbax, atomic (written to a temporary name, then renamed),
                                     keep-N
    <workdir>/<stage>/manifest.json  schema version, resolved config, config hash, parent stage,
                                     data fingerprint; written before the first save

A stage whose manifest disagrees with the current config is refused (unless overwrite=True,
which deletes it): resuming someone else's checkpoint silently is how results get lost.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

SCHEMA_VERSION = 1


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
    os.makedirs(self.dir, exist_ok=True)
    if jax.process_index() == 0 and not os.path.exists(self.manifest_path):
      write_json_atomic(self.manifest_path, manifest)
    self.manifest = manifest
    self.manager = ocp.CheckpointManager(
        os.path.join(self.dir, 'ckpt'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, *, extra: dict | None = None) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self.manager.wait_until_finished()
    if extra is not None and jax.process_index() == 0:
      write_json_atomic(os.path.join(self.dir, 'progress.json'), {'step': step, **extra})

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def mark_done(self, result: dict) -> None:
    if jax.process_index() == 0:
      write_json_atomic(os.path.join(self.dir, 'done.json'), result)

  def done(self) -> dict | None:
    path = os.path.join(self.dir, 'done.json')
    return read_json(path) if os.path.exists(path) else None

  def close(self) -> None:
    self.manager.close()


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
