"""The Colab notebooks execute top to bottom (nbclient, a fresh kernel), on a short run."""

import json
import os

import pytest

nbclient = pytest.importorskip('nbclient', reason='pip install -e ".[test]" (nbclient, ipykernel)')
import nbformat  # noqa: E402  (only after the skip)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _execute(name: str, tmp_path, params: dict | None = None, **env) -> nbformat.NotebookNode:
  """Runs colabs/<name> in a fresh kernel with `env` set; `params` (name -> value) go into a cell
  inserted after the one tagged 'parameters' (papermill's convention), so they win."""
  nb = nbformat.read(os.path.join(ROOT, 'colabs', name), as_version=4)
  if params:
    at = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
    assert len(at) == 1, f'{name} needs exactly one cell tagged "parameters"'
    nb.cells.insert(at[0] + 1, nbformat.v4.new_code_cell(
        '\n'.join(f'{k} = {v!r}' for k, v in params.items())))
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


# 02 and 04 with a tiny random Qwen3-VL in place of the real checkpoint: 02 harvests a few
# skimage.data photos and trains a small CSAE on the harvest; 04 steers that run's concepts.
LABELS = ('cat', 'coffee', 'astronaut', 'rocket')
_PHOTOS = ('chelsea', 'coffee', 'astronaut', 'rocket')


def _tiny_inputs(root) -> tuple[str, str]:
  """A tiny random Qwen3-VL whose tokenizer names every id (the labels among them) and three
  crops of each of four skimage.data photos, one subfolder per label."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from skimage import data  # pylint: disable=g-import-not-at-top
  from tests.sources.test_harvest import save_tiny_tokenizer  # torch: imported only here
  from tests.steering.conftest import WORDS
  from tests.vlms import conftest as vlm
  folder, images = str(root / 'model'), root / 'images'
  # untied embeddings: with tied O(1) random embeddings one token wins every generation step
  vlm.make_tiny_qwen3_vl(folder, seed=2, tie_word_embeddings=False)
  save_tiny_tokenizer(folder, extra_words=[w for w in LABELS if w not in WORDS] + WORDS)
  for label, name in zip(LABELS, _PHOTOS):
    photo = getattr(data, name)()
    (images / label).mkdir(parents=True)
    h, w = photo.shape[:2]
    for i, (y, x) in enumerate(((0, 0), (h // 3, w // 3), (h // 2, w // 2))):
      Image.fromarray(photo[y:y + h // 2, x:x + w // 2]).save(images / label / f'{i}.png')
  return folder, str(images)


TINY = dict(MOUNT_DRIVE=False, MODEL='qwen3-vl', DATA_DIR='', DTYPE='float32')


@pytest.fixture(scope='module')
def harvest_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('colab02')
  folder, images = _tiny_inputs(root)
  wd = str(root / 'wd')
  nb = _execute('02_harvest_and_train.ipynb', root, params=dict(
      TINY, MODEL_PATH=folder, IMAGES=images, SITE='vision/block_2', IMAGE_SIZE=32,
      MAX_IMAGES=0, HARVEST_BATCH=4, WORKDIR=wd, OVERRIDES={
          'level1.n_latents': 64, 'level1.k': 4, 'level2.n_latents': 8, 'level2.restarts': 1,
          'train.batch_size': 64, 'train.steps': 120, 'train.checkpoint_every': 60,
          'level2.steps': 120, 'data.eval_rows': 64, 'data.holdout_rows': 64}),
      XLA_FLAGS='', JAX_PLATFORMS='cpu')
  return dict(nb=nb, folder=folder, images=images, wd=wd)


def test_harvest_and_train_runs_on_a_tiny_model_and_shows_top_images(harvest_run):
  text, wd = _text(harvest_run['nb']), harvest_run['wd']
  assert '12 images' in text  # the harvest read every photo crop
  assert 'level1/variance_explained' in text
  assert text.count('image/png') >= 4  # curves, density, concepts' and features' top images
  run = os.path.join(wd, 'csae')
  with open(os.path.join(run, 'level1', 'manifest.json')) as f:
    assert json.load(f)['data']['path'].startswith(os.path.join(wd, 'harvest', 'activations'))
  for png in ('concepts.png', 'features.png'):
    assert os.path.getsize(os.path.join(run, 'report', png)) > 5000, png
  assert os.path.isdir(os.path.join(run, 'report', 'thumbs'))


def test_steering_runs_on_the_tiny_run_and_shows_rates_and_captions(harvest_run):
  run = os.path.join(harvest_run['wd'], 'csae')
  nb = _execute('04_steering.ipynb', harvest_run['wd'], params=dict(
      TINY, MODEL_PATH=harvest_run['folder'], IMAGES=harvest_run['images'], RUN=run,
      CONCEPTS='', N_CONCEPTS=2, IMAGES_PER_CONCEPT=4, ARMS='none,random,concept',
      MAX_NEW_TOKENS=6, BATCH_SIZE=4), XLA_FLAGS='', JAX_PLATFORMS='cpu')
  text = _text(nb)
  assert '| arm | appeared % |' in text and '| concept |' in text  # the rates table
  assert '| image | unsteered | concept + |' in text  # a concept's captions side by side
  assert text.count('image/png') >= 1  # the steered concepts' top images
  with open(os.path.join(run, 'steer', 'results.json')) as f:
    res = json.load(f)
  assert res['n_concepts'] >= 1 and res['arms']['concept']['n_insert'] >= 1
  with open(os.path.join(run, 'report', 'index.html')) as f:
    assert 'Steering captions' in f.read()  # the re-rendered report carries them
