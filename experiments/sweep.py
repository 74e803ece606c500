"""A sweep of pipeline runs: one workdir per setting, finished runs skipped, one results table.

    python -m experiments.sweep --config=experiments/configs/csae.py:small \
        --sweep=experiments/sweeps/level1_grid.py --root=runs/grid
    python -m experiments.sweep --config=experiments/configs/csae.py \
        --grid=level1.k=2,4,8 --grid=train.seed=0,1 --root=runs/k_seeds --config.train.steps=2000

The runs are the settings of `--sweep=FILE.py[:ARG]` (its `get_sweep(arg)` returns a list of
override dicts, `{'level1.k': 4, 'train.seed': 1}`) times the product of the `--grid` axes; the
base is `--config` with its `--config.KEY=VALUE` flags, as for experiments/run.py. Each run gets
`<root>/<short name>-<hash>`, the hash of its whole config (file + flags + overrides: the same
setting lands in the same folder on every invocation; any change of the config gives a new one),
and is run as `python -m experiments.run --workdir=<that folder> ...` in a subprocess:
  * a crash of one run (an XLA abort, an out-of-memory kill, a hung collective killed by hand)
    cannot take the others down, and every run starts with a fresh JAX runtime, which a
    multi-host run needs (jax.distributed initialises once per process);
  * a run that finished (`<wd>/sweep_run.json`, written when it exits 0) is skipped; one that
    was interrupted runs the same command again and so resumes from its stages' checkpoints.
A failed run is reported (its log is `<wd>/sweep_run-<host>.log`) and the others continue; the
sweep then exits 1. At the end `<root>/results.json` and `results.md` hold one row per run: its
overrides, its status and the key metrics of its `export/metrics.json`.

Pod slices and multi-GPU hosts (README, "Sweeps"): either every host runs the same sweep and
each run is one multi-host run (JAX's cluster detection, or the forwarded --coordinator_address
/ --num_processes / --process_id), or `--shard=I/N --single_process` gives host I every N-th run
as its own one-process run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from experiments import overrides as overrides_lib

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT_DIR, 'experiments', 'configs', 'csae.py')
MARKER = 'sweep_run.json'
# The table's metric columns by default (those a run's metrics.json has).
METRICS = ('level1/variance_explained', 'level1/l0', 'level1/alive', 'level2/variance_explained',
           'level2/concepts_used', 'synthetic/child_mcc', 'synthetic/parent_ari', 'wall_s')

_ROOT = flags.DEFINE_string('root', None, 'Folder of the runs and the results table.')
_SWEEP = flags.DEFINE_string('sweep', None, 'FILE.py[:ARG] whose get_sweep(arg) returns a list '
                             'of override dicts {"level1.k": 4, ...}.')
_GRID = flags.DEFINE_multi_string('grid', [], 'KEY=V1,V2,...: an axis of the product grid.')
_SHARD = flags.DEFINE_string('shard', '0/1', 'I/N: this invocation runs runs I, I+N, I+2N, ...')
_SINGLE = flags.DEFINE_bool('single_process', False, 'Run each run as one process '
                            '(--num_processes=1), even on a detected cluster: with --shard, '
                            'each host of a pod slice runs its own runs.')
_METRICS = flags.DEFINE_list('metrics', list(METRICS), 'metrics.json keys in the table.')
_GATHER = flags.DEFINE_bool('gather_only', False, 'Only rebuild results.json / .md.')
_DRY = flags.DEFINE_bool('dry_run', False, 'List the runs and their folders; run nothing.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'Forwarded to every run.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Forwarded to every run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Forwarded to every run.')
_CONFIG = config_flags.DEFINE_config_file('config', DEFAULT_CONFIG, 'Base config, as for '
                                          'experiments/run.py.', lock_config=True)


def load_sweep(spec: str) -> list[dict]:
  """The override dicts of `FILE.py[:ARG]` (its get_sweep(arg))."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'--sweep={spec}: no file {path!r}; give a .py with get_sweep(arg)')
  module_spec = importlib.util.spec_from_file_location('_sweep', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'--sweep={spec}: {path} defines no get_sweep(arg)')
  runs = module.get_sweep(arg or None)
  if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
    raise ValueError(f'--sweep={spec}: get_sweep must return a list of override dicts')
  return runs


def expand(file_runs: list[dict] | None, grid_axes: dict[str, list]) -> list[dict]:
  """The sweep file's runs (or one empty setting) times the grid's combinations."""
  out = []
  for base in file_runs if file_runs is not None else [{}]:
    for combo in overrides_lib.grid(grid_axes) if grid_axes else [{}]:
      both = sorted(set(base) & set(combo))
      if both:
        raise ValueError(f'{both} set by both --sweep and --grid; set each key in one place')
      out.append({**base, **combo})
  return out


def resolve(base_cd, run: dict):
  """The base ConfigDict with one run's overrides applied (a copy, still locked: a key the
  config does not have is an error here, before anything runs)."""
  cd = base_cd.copy_and_resolve_references()
  try:
    cd.update_from_flattened_dict(run)
  except (KeyError, AttributeError) as e:
    raise ValueError(f'sweep override {run}: unknown config key {e}; see the config file for '
                     f'the documented keys') from e
  except TypeError as e:
    raise ValueError(f'sweep override {run}: {e}') from e
  return cd


def config_hash(cd) -> str:
  from csae_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.stable_hash(cd.to_dict())


def short_name(run: dict) -> str:
  """'k4-seed1' for {'level1.k': 4, 'train.seed': 1}; 'base' for no overrides."""
  parts = [f'{k.split(".")[-1]}{overrides_lib.flag_value(v)}' for k, v in run.items()]
  name = re.sub(r'[^A-Za-z0-9._=+-]+', '_', '-'.join(parts)) or 'base'
  return name[:60]


def parse_shard(spec: str) -> tuple[int, int]:
  m = re.fullmatch(r'(\d+)/(\d+)', spec.strip())
  if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
    raise ValueError(f'--shard={spec} must be I/N with 0 <= I < N, e.g. --shard=0/4')
  return int(m.group(1)), int(m.group(2))


def plan(base_cd, runs: list[dict], root: str) -> list[dict]:
  """One entry per run: name, workdir, overrides, config hash."""
  out = []
  for run in runs:
    h = config_hash(resolve(base_cd, run))
    name = f'{short_name(run)}-{h[:10]}'
    out.append({'name': name, 'workdir': os.path.join(root, name), 'overrides': run,
                'config_hash': h})
  names = [p['name'] for p in out]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f'the sweep lists the same setting twice: {dup}')
  return out


def base_flags(argv: list[str]) -> tuple[list[str], set[str]]:
  """The --config / --config.KEY=VALUE flags of this command (passed on to every run) and the
  keys they set."""
  out, keys = [], set()
  for a in argv[1:]:
    if a.startswith('--config=') or a.startswith('--config.'):
      out.append(a)
      if a.startswith('--config.'):
        keys.add(a[len('--config.'):].split('=', 1)[0])
  return out, keys


def run_command(entry: dict, config_args: list[str], forward: list[str]) -> list[str]:
  return [sys.executable, '-m', 'experiments.run', f'--workdir={entry["workdir"]}', *config_args,
          *[f'--config.{k}={overrides_lib.flag_value(v)}' for k, v in entry['overrides'].items()],
          *forward]


def finished(entry: dict) -> bool:
  path = os.path.join(entry['workdir'], MARKER)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f).get('config_hash') == entry['config_hash']


def execute(entry: dict, cmd: list[str]) -> tuple[int, float, str]:
  """Runs one run; returns (exit code, seconds, its log's path). Output goes to the log, so the
  sweep's own lines stay readable (follow a run with `tail -f` on its log)."""
  os.makedirs(entry['workdir'], exist_ok=True)
  log = os.path.join(entry['workdir'], f'sweep_run-{socket.gethostname()}.log')
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
      [ROOT_DIR] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else []))}
  t0 = time.perf_counter()
  with open(log, 'w') as f:
    f.write(' '.join(cmd) + '\n\n')
    f.flush()
    rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
  return rc, time.perf_counter() - t0, log


def last_error(log: str) -> str:
  with open(log) as f:
    lines = [ln.strip() for ln in f if ln.strip()]
  errors = [ln for ln in lines if ln.startswith(('error:', 'ValueError', 'Traceback')) or
            'Error' in ln.split(':')[0]]
  return (errors or lines or ['(empty log)'])[-1][:300]


def gather(entries: list[dict], root: str, metric_keys: list[str],
           status: dict[str, str]) -> list[dict]:
  """<root>/results.json (every run's overrides, status and metrics) and results.md."""
  from csae_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from csae_jax import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  rows, table_rows = [], []
  axes = list(dict.fromkeys(k for e in entries for k in e['overrides']))
  for e in entries:
    done = finished(e)
    metrics = {}
    path = os.path.join(e['workdir'], 'export', 'metrics.json')
    if done and os.path.exists(path):
      with open(path) as f:
        metrics = json.load(f)
    st = 'done' if done else status.get(e['name'], 'not run')
    rows.append({**e, 'status': st, 'metrics': metrics})
    table_rows.append({'run': e['name'], 'status': st,
                       **{k: e['overrides'].get(k, '') for k in axes},
                       **{k: metrics.get(k, '') for k in metric_keys}})
  os.makedirs(root, exist_ok=True)
  ckpt_lib.write_json_atomic(os.path.join(root, 'results.json'), rows)
  md = sweep_lib.table(table_rows) + '\n' if table_rows else '(no runs)\n'
  tmp = os.path.join(root, f'results.md.tmp.{os.getpid()}')
  with open(tmp, 'w') as f:
    f.write(md)
  os.replace(tmp, os.path.join(root, 'results.md'))
  return table_rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    if not _ROOT.value:
      raise ValueError('--root is required: the folder of the runs and the results table')
    root = os.path.abspath(_ROOT.value)
    shard_i, shard_n = parse_shard(_SHARD.value)
    config_args, flag_keys = base_flags(sys.argv)
    runs = expand(load_sweep(_SWEEP.value) if _SWEEP.value else None,
                  overrides_lib.parse_grid(_GRID.value))
    clash = sorted({k for r in runs for k in r} & flag_keys)
    if clash:
      raise ValueError(f'{clash} is both swept and set by --config.KEY=; set it in one place')
    entries = plan(_CONFIG.value, runs, root)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  forward = [f'--{name}={fl.value}' for name, fl in (
      ('coordinator_address', _COORDINATOR), ('num_processes', _NUM_PROCESSES),
      ('process_id', _PROCESS_ID)) if fl.value is not None]
  if _SINGLE.value:
    if forward:
      print('error: --single_process runs one process per run; drop --coordinator_address / '
            '--num_processes / --process_id', file=sys.stderr)
      sys.exit(2)
    forward = ['--num_processes=1']
  mine = entries[shard_i::shard_n]
  print(f'sweep: {len(entries)} runs in {root}; this shard ({shard_i}/{shard_n}) runs '
        f'{len(mine)}', flush=True)
  status: dict[str, str] = {}
  if _DRY.value:
    for e in mine:
      print(f'  {e["name"]}: {e["overrides"]} {"(finished)" if finished(e) else ""}')
    return
  if not _GATHER.value:
    for i, e in enumerate(mine, 1):
      head = f'[{i}/{len(mine)}] {e["name"]}'
      if finished(e):
        print(f'{head}: finished earlier, skipped', flush=True)
        continue
      print(f'{head}: running {e["overrides"]}', flush=True)
      cmd = run_command(e, config_args, forward)
      rc, wall, log = execute(e, cmd)
      if rc == 0:
        from csae_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
        ckpt_lib.write_json_atomic(os.path.join(e['workdir'], MARKER), {
            'name': e['name'], 'overrides': e['overrides'], 'config_hash': e['config_hash'],
            'wall_s': round(wall, 1), 'command': cmd[1:]})
        print(f'{head}: done in {wall:.0f} s', flush=True)
      else:
        status[e['name']] = f'failed (exit {rc})'
        print(f'{head}: FAILED (exit {rc}) after {wall:.0f} s: {last_error(log)}\n'
              f'    log: {log}', flush=True)
  rows = gather(entries, root, _METRICS.value, status)
  done = sum(r['status'] == 'done' for r in rows)
  print(f'\n{done} of {len(rows)} runs finished; {root}/results.json, results.md')
  if status:
    print(f'{len(status)} run(s) failed this time: {", ".join(status)}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
