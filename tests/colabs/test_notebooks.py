"""The Colab notebooks execute top to bottom (nbclient, a fresh kernel), on a short run."""

import json
import os

import pytest

nbclient = pytest.importorskip('nbclient', reason='pip install -e ".[test]" (nbclient, ipykernel)')
import nbformat  # noqa: E402  (only after the skip)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _execute(name: str, tmp_path, **env) -> nbformat.NotebookNode:
  nb = nbformat.read(os.path.join(ROOT, 'colabs', name), as_version=4)
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel inherits this process's environment
  try:
    # cwd = the repository, as after a clone: `experiments` and this checkout's csae_jax import
    nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                            resources={'metadata': {'path': ROOT}}).execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k)
      else:
        os.environ[k] = v
  return nb


def _text(nb) -> str:
  out = []
  for cell in nb.cells:
    for o in cell.get('outputs', []):
      out.append(o.get('text', ''))
      out.append(json.dumps(o.get('data', {})))
  return '\n'.join(out)


def test_quickstart_runs_and_shows_curves_and_report(tmp_path):
  wd = str(tmp_path / 'wd')
  # one CPU device in the kernel (as in a CPU Colab), not the suite's 8 fake ones
  nb = _execute('01_quickstart.ipynb', tmp_path, CSAE_QUICKSTART_STEPS='60',
                CSAE_QUICKSTART_WORKDIR=wd, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  text = _text(nb)
  assert 'synthetic/parent_ari' in text and 'concepts over' in text
  assert text.count('image/png') >= 2  # curves and density, displayed
  assert 'srcdoc=' in text and 'data-concept-id' in text  # the report, inline
  assert os.path.exists(os.path.join(wd, 'report', 'index.html'))


def test_hierarchy_and_compare_runs_and_shows_table_and_reports(tmp_path):
  wd = str(tmp_path / 'wd')
  nb = _execute('03_hierarchy_and_compare.ipynb', tmp_path, CSAE_COMPARE_STEPS='60',
                CSAE_COMPARE_WORKDIR=wd, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  text = _text(nb)
  for method in ('csae', 'kmeans', 'oracle'):
    assert f'| {method} |' in text, method  # the comparison table, displayed
  assert 'coherence' in text and 'members' in text
  assert text.count('srcdoc=') >= 2  # the comparison's report and CSAE's, inline
  assert os.path.exists(os.path.join(wd, 'csae', 'report', 'index.html'))
