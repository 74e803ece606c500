"""benchmarks/robustness.py resumes: a finished comparison gains only the methods it lacks, and
`--rescore` re-runs only the CSAE concept step on the finished SAE stages."""

import json
import os

from benchmarks import robustness

TINY = ['--families=base', '--seeds=0', '--n2=2K', '--steps=60', '--batch_size=256',
        '--eval_rows=1024', '--n_perm=2', '--set', 'level2.steps=80', '--set',
        'level2.restarts=2', '--set', 'train.log_every=20']


def _steps(stage_dir: str) -> dict:
  """{checkpoint step: its modification time}: a retrained stage would write them anew."""
  ckpt = os.path.join(stage_dir, 'ckpt')
  return {s: os.stat(os.path.join(ckpt, s)).st_mtime_ns for s in sorted(os.listdir(ckpt))}


def test_resume_adds_missing_methods_and_rescore_reruns_only_the_concept_step(tmp_path):
  out = str(tmp_path)
  wd = os.path.join(out, 'runs', 'base', 'seed_0', 'n2_2K')
  read = lambda: json.load(open(os.path.join(wd, 'compare.json')))
  robustness.main(TINY + ['--methods=csae', f'--out={out}'])
  first = read()
  assert list(first) == ['csae']
  assert first['csae']['level2/isolated_rows'] >= 0  # the default concept step isolates
  l1, l2 = _steps(os.path.join(wd, 'csae', 'level1')), _steps(os.path.join(wd, 'csae', 'level2'))

  robustness.main(TINY + ['--methods=csae,clustering', f'--out={out}'])
  second = read()
  assert set(second) == {'csae', 'agglomerative', 'kmeans', 'spectral'}
  assert second['csae'] == first['csae']  # read, not re-run
  table = json.load(open(os.path.join(out, 'robustness.json')))['results']['base']
  assert 'kmeans' in table['per_seed']['0']['2K']

  # a changed concept-step key: only CSAE re-runs, on the same level-1 and level-2 stages
  robustness.main(TINY + ['--methods=csae,clustering', '--rescore', '--set',
                          'level2.isolate_q=0', f'--out={out}'])
  third = read()
  assert 'level2/isolated_rows' not in third['csae']  # the concept step ran with isolation off
  assert {m: third[m] for m in ('agglomerative', 'kmeans', 'spectral')} == {
      m: second[m] for m in ('agglomerative', 'kmeans', 'spectral')}
  assert _steps(os.path.join(wd, 'csae', 'level1')) == l1
  assert _steps(os.path.join(wd, 'csae', 'level2')) == l2
  assert 'Re-scored' in open(os.path.join(out, 'robustness.md')).read()
