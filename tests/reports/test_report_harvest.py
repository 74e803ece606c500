"""An image run end to end: a tiny random Qwen3-VL harvests photos (crops of scikit-learn's two
sample photos), the CSAE pipeline trains on that harvest, and its report opens in headless
Chromium with a feature's patch panel: thumbnails loaded, the heat map on the harvest's grid."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from csae_jax import config as config_lib
from csae_jax import modes
from tests.reports import browser, cdp
from tests.test_pipeline import small

pytestmark = pytest.mark.skipif(browser.executable() is None and not os.environ.get(
    'CSAE_REQUIRE_BROWSER'), reason='no Chromium on PATH (apt-get install -y chromium)')


def _photos(image_dir: str) -> None:
  """6 crops of the two photos that ship with scikit-learn, labelled by their photo."""
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  sample = load_sample_images()
  for photo, name in zip(sample.images, ('china', 'flower')):
    os.makedirs(os.path.join(image_dir, name))
    for i, (y, x) in enumerate(((0, 0), (100, 200), (200, 400))):
      Image.fromarray(photo[y:y + 220, x:x + 220]).save(os.path.join(image_dir, name, f'{i}.png'))


def test_harvest_run_report_opens_a_patch_panel(tmp_path):
  from tests.sources.test_harvest import save_tiny_tokenizer  # torch: imported only here
  from tests.vlms import conftest as vlm
  from csae_jax.sources import harvest
  folder, image_dir = str(tmp_path / 'model'), str(tmp_path / 'images')
  vlm.make_tiny_qwen3_vl(folder)
  save_tiny_tokenizer(folder)
  _photos(image_dir)
  harvest.run(config_lib.harvest_from_config_dict(dict(
      model='qwen3-vl', model_path=folder, images=image_dir, image_size=32, batch_size=2,
      chunk_images=6, sites='vision/block_0')), str(tmp_path / 'h'))
  site = str(tmp_path / 'h' / 'activations' / 'vision_block_0')
  wd = str(tmp_path / 'wd')
  modes.run(small(**{'data.path': site, 'train.steps': 40, 'level2.steps': 40,
                     'level2.restarts': 1, 'train.batch_size': 32, 'data.eval_rows': 32,
                     'level1.n_latents': 32, 'level1.k': 4}), wd)
  report = os.path.join(wd, 'report')
  with np.load(os.path.join(site, 'index.npz')) as z:
    grid = [int(z['row'].max()) + 1, int(z['col'].max()) + 1]
  with open(os.path.join(wd, 'export', 'hierarchy.json')) as f:
    hier = json.load(f)
  feature = hier['concepts'][0]['members'][0]
  page = cdp.Page()
  try:
    page.open(browser.url(os.path.join(report, 'index.html')))
    assert page.js('JSON.parse(document.getElementById("report-data").textContent).grid') == grid
    # as a user: open the concept, then click its first member
    page.js(f'document.querySelector(\'[data-concept-id="{hier["concepts"][0]["id"]}"] > '
            f'summary\').click()')
    page.js(f'document.querySelector(\'[data-feature-id="{feature}"]\').click()')
    panel = f'[data-panel-feature="{feature}"]'
    page.wait_for(f'document.querySelector(\'{panel} .tile\')')
    page.js(f'document.querySelector(\'{panel}\').scrollIntoView()')  # thumbnails load lazily
    page.wait_for(f'[...document.querySelectorAll(\'{panel} img\')].every(i => i.naturalWidth)')
    tiles = page.js(f'''[...document.querySelectorAll('{panel} .tile')].map(t => [
        t.dataset.imageId, t.querySelector('img').getAttribute('src'),
        t.querySelector('canvas').width, t.querySelector('canvas').height])''')
    assert tiles and all(t[1] == f'thumbs/{t[0]}.jpg' and t[2:] == grid[::-1] for t in tiles)
    assert all(os.path.exists(os.path.join(report, t[1])) for t in tiles)
    lit = page.js(f'''(() => {{ const c = document.querySelector('{panel} canvas');
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        return [...Array(c.width * c.height).keys()].filter(i => px[4 * i + 3] > 0).length;
        }})()''')
    assert lit >= 1  # the feature fires on some patch of its top image
    labels = page.js(f'document.querySelector(\'{panel} .labels\').textContent')
    assert 'china' in labels or 'flower' in labels
    page.screenshot(str(tmp_path / 'harvest_run.png'))
  finally:
    page.close()
