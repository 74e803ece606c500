"""experiments/sweep.py: one workdir per setting named by its config hash, finished runs skipped,
a failed run reported without stopping the others, the results table gathered, shards disjoint."""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config=experiments/configs/csae.py:small', '--config.train.steps=10',
        '--config.train.batch_size=64', '--config.level2.steps=5', '--config.data.eval_rows=256',
        '--config.train.checkpoint_every=10', '--config.train.log_every=5',
        '--config.data.synthetic.d=16', '--config.data.synthetic.n_parents=3',
        '--config.data.synthetic.n_children=2']


def sweep(*args):
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  return subprocess.run([sys.executable, '-m', 'experiments.sweep', *TINY, *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)


def test_sweep_skips_finished_runs_reports_failures_and_gathers(tmp_path):
  root = tmp_path / 'sw'
  # k = 40 is larger than the auto dictionary (12 latents): that run fails inside experiments.run
  args = ['--grid=level1.k=2,40', f'--root={root}']
  first = sweep(*args)
  assert first.returncode == 1, first.stdout + first.stderr  # one run failed
  assert re.search(r'k2-\w{10}: done', first.stdout), first.stdout
  assert re.search(r'k40-\w{10}: FAILED \(exit 2\).*larger than the dictionary', first.stdout)
  ok = next(p for p in root.iterdir() if p.name.startswith('k2-'))
  marker = (ok / 'sweep_run.json').read_text()
  rows = json.loads((root / 'results.json').read_text())
  assert [r['status'] for r in rows] == ['done', 'failed (exit 2)']
  metrics = json.loads((ok / 'export' / 'metrics.json').read_text())
  assert rows[0]['metrics']['level1/variance_explained'] == metrics['level1/variance_explained']
  assert rows[0]['config_hash'].startswith(ok.name.rsplit('-', 1)[1])
  md = (root / 'results.md').read_text()
  assert ok.name in md and 'level1/variance_explained' in md and 'failed (exit 2)' in md

  # A later invocation (here of the run that finished alone): the hash names the same folder,
  # the run is skipped, not re-run, and the table is gathered again.
  second = sweep('--grid=level1.k=2', f'--root={root}')
  assert second.returncode == 0, second.stdout + second.stderr
  assert f'{ok.name}: finished earlier, skipped' in second.stdout, second.stdout
  assert (ok / 'sweep_run.json').read_text() == marker  # not rewritten: nothing ran again
  again = json.loads((root / 'results.json').read_text())
  assert len(again) == 1 and again[0]['metrics'] == rows[0]['metrics']


def test_shards_split_the_runs_and_a_clash_is_an_error(tmp_path):
  names = []
  for i in range(2):
    r = sweep('--grid=level1.k=2,3,4', '--grid=train.seed=0,1', f'--root={tmp_path}',
              f'--shard={i}/2', '--dry_run')
    assert r.returncode == 0, r.stderr
    names.append(re.findall(r'^  (\S+):', r.stdout, flags=re.M))
  assert len(names[0]) == len(names[1]) == 3 and not set(names[0]) & set(names[1])
  assert len({n.rsplit('-', 1)[1] for n in names[0] + names[1]}) == 6  # 6 distinct hashes
  clash = sweep('--grid=train.steps=5,6', f'--root={tmp_path}')
  assert clash.returncode == 2 and 'both swept and set' in clash.stderr
  bad = sweep('--grid=level1.nope=1,2', f'--root={tmp_path}')
  assert bad.returncode == 2 and "unknown config key" in bad.stderr, bad.stderr
