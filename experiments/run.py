"""Command line: `python -m experiments.run [--config=experiments/configs/csae.py] [--workdir=WD]`.

Only parses flags; the library's `csae_jax.modes.run(config, workdir)` does the work (the
same function a Colab or a test calls).
"""

import datetime
import json
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Where checkpoints and export/ go (default: ./runs/<timestamp>).')
# Multi-process runs (jax.distributed.initialize). Left unset, JAX detects Cloud TPU VMs, GKE,
# SLURM and Open MPI (and JAX_COORDINATOR_ADDRESS), so the same plain command runs on every host.
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, "HOST:PORT of process 0's coordinator (same on every process).")
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, "This process's id in [0, num_processes).")
_RETAIN_HOST_MEMORY = flags.DEFINE_boolean(
    'retain_host_memory', True,
    'glibc keeps freed host memory (csae_jax/hostmem.py): no fresh pages for every step\'s '
    'buffers on CPU (the level-1 step 12-42% faster in benchmarks/train_throughput.py); '
    'resident memory stays at its peak.')

SUMMARY_KEYS = (
    'level1/variance_explained', 'level1/l0', 'level1/dead_frac', 'level1/alive',
    'level2/variance_explained', 'level2/latents_trained', 'level2/merges',
    'level2/concepts_used', 'level2/concepts_ge2', 'level2/largest_concept_share',
    'level2/near_duplicate_sibling_frac', 'level2/collapsed',
    # signals for data without ground truth (README: "Can I trust these concepts?")
    'level1/near_duplicate_frac', 'level2/near_duplicate_concepts', 'level2/effective_concepts',
    'level2/concept_share_p90', 'stability/feature_match', 'stability/concept_ari',
    'synthetic/child_mcc', 'synthetic/children_recovered', 'synthetic/parent_ari',
    'synthetic/parent_ari_recovered', 'synthetic/parent_nmi', 'wall_s')


def summary(metrics: dict, workdir: str) -> str:
  if metrics['mode'] == 'sweep':
    from csae_jax import sweep  # pylint: disable=g-import-not-at-top
    if metrics.get('sweep/level') == 2:
      head = (f'sweep of {metrics["sweep/n"]} level-2 SAEs done: {metrics["sweep/dir"]} '
              f'(results.json, results.md)')
    else:
      head = (f'sweep of {metrics["sweep/n"]} level-1 SAEs done: {workdir}/sweep '
              f'(results.json, results.md, pareto.png)')
    return head + '\n\n' + sweep.table(metrics['sweep/results'])
  if metrics['mode'] == 'report':
    return (f'report written: {metrics["report"]} ({metrics["bytes"] / 1e6:.2f} MB, '
            f'{metrics["wall_s"]} s); open it in a browser (file://{metrics["report"]})')
  if metrics['mode'] == 'compare':
    return (f'comparison of {len(metrics["compare/methods"])} methods done: {workdir} '
            f'(compare.json, compare.md, compare_hms.png, compare_recon.png, <method>/export/)'
            f'\n\n' + metrics['compare/table'])
  lines = [f'CSAE ({metrics["mode"]}) done: {workdir}/export', '']
  for key in SUMMARY_KEYS:
    if key in metrics:
      v = metrics[key]
      lines.append(f'  {key:<40} {v:.4f}' if isinstance(v, float) else f'  {key:<40} {v}')
  hier = os.path.join(workdir, 'export', 'hierarchy.json')
  if os.path.exists(hier):
    with open(hier) as f:
      concepts = json.load(f)['concepts']
    lines.append('')
    lines.append('  largest concepts (level-1 members, strongest first):')
    for c in concepts[:5]:
      lines.append(f'    concept {c["id"]:>4}: {c["members"][:10]}'
                   f'{" ..." if len(c["members"]) > 10 else ""}')
  return '\n'.join(lines)


def _default_config(argv: list[str]):
  """(the config file's path, its ConfigDict before overrides), as --config= names them."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, variant = os.path.join(os.path.dirname(__file__), 'configs', 'csae.py'), None
  for a in argv:
    if a.startswith('--config='):
      path, _, variant = a.split('=', 1)[1].partition(':')
  spec = importlib.util.spec_from_file_location('_cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return path, module.get_config(variant or None)


def _unknown_key_message(argv: list[str]) -> str | None:
  """Names the first --config.KEY override that the config does not have, with the known keys."""
  path, cfg = _default_config(argv)
  for a in argv:
    if not a.startswith('--config.'):
      continue
    key = a[len('--config.'):].split('=', 1)[0]
    node, walked = cfg, []
    for part in key.split('.'):
      if not hasattr(node, 'keys') or part not in node:
        where = '.'.join(walked) or 'the root'
        known = sorted(node.keys()) if hasattr(node, 'keys') else []
        return (f'unknown config key {key!r} (no {part!r} under {where}); known keys there: '
                f'{known}. See {path} for every documented field.')
      node, walked = node[part], walked + [part]
  return None


def _bad_value_message(e: flags.IllegalFlagValueError) -> str:
  """config_flags reports an ill-typed --config.KEY=VALUE as absl's 'flag ...: invalid literal';
  say it as config.py does for every other wrong type (key, expected type, value)."""
  m = re.match(r'flag --config\.([\w.]+)=(.*?): ', str(e))
  if m is None:
    return f'bad flag value: {e}'
  key, value = m.groups()
  try:
    node = _default_config(sys.argv)[1]
    *groups, field = key.split('.')
    for part in groups:
      node = node[part]
    want = node.get_type(field).__name__  # placeholders (None) keep their declared type
  except Exception:  # pylint: disable=broad-except  (the message stays useful without it)
    want = 'the documented type'
  return (f'config key {key!r} must be of type {want}, got {value!r}; set e.g. '
          f'--config.{key}=<{want}>')


def _fail_on_bad_flag(e: Exception) -> None:
  """config_flags reports an unknown --config.KEY as a bare "'foo'"; say which key and why."""
  if isinstance(e, flags.IllegalFlagValueError):
    message = _bad_value_message(e)
  else:
    message = _unknown_key_message(sys.argv) or f'bad --config override: {e}'
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, flags.IllegalFlagValueError) as e:
    _fail_on_bad_flag(e)


try:  # config_flags applies the default file's overrides here, at definition time
  _CONFIG = config_flags.DEFINE_config_file(
      'config', os.path.join(os.path.dirname(__file__), 'configs', 'csae.py'),
      'Experiment config file (get_config(arg) in a .py), with :variant and --config.key=value.',
      lock_config=True)
except (AttributeError, KeyError, flags.IllegalFlagValueError) as err:
  _fail_on_bad_flag(err)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:  # orbax logs every save at INFO; keep the bar readable
    logging.set_verbosity(logging.WARNING)
  if _RETAIN_HOST_MEMORY.value:  # first: before JAX's backend starts its threads
    from csae_jax import hostmem  # pylint: disable=g-import-not-at-top
    kept = hostmem.retain_freed_memory()
    if not kept['applied'] or kept['late']:
      logging.warning('--retain_host_memory: %s%s', kept['reason'],
                      ' (JAX had started: its threads keep their arenas)' if kept['late'] else '')
  from csae_jax import distributed  # pylint: disable=g-import-not-at-top  (fast --help)
  try:  # before anything touches devices
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  import jax  # pylint: disable=g-import-not-at-top
  from csae_jax import modes  # pylint: disable=g-import-not-at-top
  workdir = _WORKDIR.value or os.path.join(
      'runs', datetime.datetime.now().strftime('%Y%m%d-%H%M%S'))
  if not _WORKDIR.value and jax.process_count() > 1:
    print('error: a multi-process run needs --workdir (the same shared folder on every host; '
          'a timestamp would differ between hosts)', file=sys.stderr)
    sys.exit(2)
  try:
    if _CONFIG.value.get('stage') == 'harvest':
      from csae_jax.sources import harvest  # pylint: disable=g-import-not-at-top
      result = harvest.run(_CONFIG.value, workdir)
      if jax.process_index() != 0:  # process 0 prints the store's summary
        print(f'process {jax.process_index()} of {jax.process_count()} done (harvested chunks '
              f'{result["chunks_run_by_process"][jax.process_index()]})')
        return
      print(harvest_summary(result))
      return
    if _CONFIG.value.get('stage') in ('steer', 'steer_synthetic'):
      from csae_jax.steering import protocol, synthetic  # pylint: disable=g-import-not-at-top
      stage = protocol if _CONFIG.value.stage == 'steer' else synthetic
      result = stage.run(_CONFIG.value, workdir)
      print(f'{result["stage"]} done: {os.path.abspath(workdir)}/{result["stage"]} '
            f'(results.json, results.md)\n\n{result["table"]}')
      return
    metrics = modes.run(_CONFIG.value, workdir)
  except ValueError as e:  # user mistakes: one clear line, no traceback
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if jax.process_index() != 0:  # process 0 writes the exports and prints their summary
    print(f'process {jax.process_index()} of {jax.process_count()} done')
    return
  print(summary(metrics, os.path.abspath(workdir)))
  if metrics['mode'] in ('staged', 'joint', 'compare'):
    print(f'\nreport: file://{os.path.abspath(workdir)}/report/index.html')


def harvest_summary(result: dict) -> str:
  lines = [f'harvested {result["n_images"]} images ({result["chunks_run"]} chunks this run, '
           f'{result["images_per_s"]} images/s on {result["device"]}):']
  for site, d in result['dirs'].items():
    lines.append(f'  {site:<20} {result["rows"][site]:>9} rows  {d}')
  lines.append('use a folder as --config.data.path of experiments/configs/csae.py')
  return '\n'.join(lines)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
