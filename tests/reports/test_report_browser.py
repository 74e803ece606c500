"""The report in a real browser (headless Chromium): a tiny pipeline run's report renders every
concept with every member (`--dump-dom`, as a user's browser would show it), and, driven through
the DevTools protocol like a user, search filters the tree, a concept expands, the sort and the
pager work, a view restores from its URL, and an image run's feature opens its patch panel.
Screenshots go into the test's tmp dir."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from csae_jax import modes
from csae_jax.reports import html as report_html
from tests.reports import browser, cdp, fake
from tests.test_pipeline import small

NO_CHROMIUM = ('no Chromium on PATH (install Debian\'s: apt-get install -y chromium, as .ci/run '
               'does; or set CSAE_CHROMIUM=/path/to/chrome)')
pytestmark = pytest.mark.skipif(browser.executable() is None and not os.environ.get(
    'CSAE_REQUIRE_BROWSER'), reason=NO_CHROMIUM)


def test_chromium_is_there():
  """CI sets CSAE_REQUIRE_BROWSER=1: a missing Chromium fails there instead of skipping."""
  assert browser.executable() is not None, NO_CHROMIUM


# the rendered tree as data: [[concept id, open, [member ids]], ...] in page order
TREE = '''[...document.querySelectorAll('#tree [data-concept-id]')].map(d => [
    +d.dataset.conceptId, d.open, [...d.querySelectorAll('[data-feature-id]')].map(
    f => +f.dataset.featureId)])'''


@pytest.fixture(scope='module')
def default_run(tmp_path_factory):
  """The small variant of the default config, few steps: the pipeline writes the report."""
  wd = str(tmp_path_factory.mktemp('run'))
  modes.run(small(**{'train.steps': 60, 'level2.steps': 60, 'level2.restarts': 1,
                     'data.eval_rows': 1024}), wd)
  with open(os.path.join(wd, 'export', 'hierarchy.json')) as f:
    hier = json.load(f)
  return wd, hier, os.path.join(wd, 'report', 'index.html')


@pytest.fixture(scope='module')
def page():
  p = cdp.Page()
  yield p
  p.close()


def _search(page, text):
  """Types `text` into the search box; the tree once the page re-rendered (it debounces)."""
  before = page.js('+document.body.dataset.renders')
  page.js(f'''(() => {{ const q = document.getElementById('q'); q.focus();
      q.value = {json.dumps(text)};
      q.dispatchEvent(new Event('input', {{bubbles: true}})); }})()''')
  page.wait_for(f'+document.body.dataset.renders > {before}')
  return page.js(TREE)


def test_default_run_report_renders_every_concept_and_member(default_run, tmp_path):
  _, hier, path = default_run
  assert len(hier['concepts']) <= report_html.PAGE_SIZE  # one page holds the whole tree
  dom = browser.dump_dom(browser.url(path))
  assert 'data-ready="1"' in dom  # the script ran to its end
  shown = browser.concepts_in(dom)
  assert set(shown) == {c['id'] for c in hier['concepts']}
  for c in hier['concepts']:
    assert shown[c['id']]['features'] == c['members'], c['id']
    assert not shown[c['id']]['open']  # collapsed until asked
  n = len(hier['concepts'])
  assert f'>{n} of {n} concepts<' in dom
  png = browser.screenshot(browser.url(path, f'open={hier["concepts"][0]["id"]}'),
                           str(tmp_path / 'report.png'))
  with Image.open(png) as im:
    px = np.asarray(im.convert('L'), np.float32)
  assert px.std() > 10 and (px < 128).mean() > 0.01  # not a blank page: text and figures


def test_search_expand_sort_as_a_user(default_run, page, tmp_path):
  _, hier, path = default_run
  page.open(browser.url(path))
  everything = page.js(TREE)
  assert {c[0] for c in everything} == {c['id'] for c in hier['concepts']}
  big = max(hier['concepts'], key=lambda c: len(c['members']))
  f = big['members'][-1]
  # "f<id>": only the concept holding that feature, that member marked
  assert _search(page, f'f{f}') == [[big['id'], False, big['members']]]
  assert page.js(f'document.querySelector(\'[data-feature-id="{f}"]\').classList.contains("hit")')
  # a bare number: the concept with that id and any concept holding that feature
  want = {c['id'] for c in hier['concepts'] if c['id'] == f or f in c['members']}
  assert {c[0] for c in _search(page, str(f))} == want
  assert _search(page, 'no-such-label') == [] and 'no concept matches' in page.js(
      'document.getElementById("tree").textContent')
  assert len(_search(page, '')) == len(everything)  # clearing the box brings all back
  # expand: a click on the concept's summary opens it, the others stay closed
  page.js(f'document.querySelector(\'[data-concept-id="{big["id"]}"] > summary\').click()')
  page.wait_for(f'location.hash.includes("open={big["id"]}")')
  opened = [c for c in page.js(TREE) if c[1]]
  assert [c[0] for c in opened] == [big['id']]
  page.screenshot(str(tmp_path / 'expanded.png'))
  # sort: smallest first, then by coherence
  page.js('''(() => { const s = document.getElementById('sort'); s.value = 'size:asc';
      s.dispatchEvent(new Event('change')); })()''')
  sizes = [len(c[2]) for c in page.js(TREE)]
  assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
  # the view is in the URL: reopening it restores search and expansion
  page.open(browser.url(path, f'q=f{f}&open={big["id"]}'))
  assert page.js(TREE) == [[big['id'], True, big['members']]]
  assert page.js('document.getElementById("q").value') == f'f{f}'


def test_pages_of_a_large_tree(tmp_path, page):
  wd = str(tmp_path / 'wd')
  hier = fake.pipeline_workdir(wd, n1=200, n_concepts=20)
  path = report_html.write(wd, page_size=7)
  ids = [c['id'] for c in sorted(hier['concepts'], key=lambda c: (-len(c['members']), c['id']))]
  page.open(browser.url(path))
  assert [c[0] for c in page.js(TREE)] == ids[:7]  # only one page is built as DOM
  for _ in range(2):
    page.js('document.getElementById("next").click()')
  assert [c[0] for c in page.js(TREE)] == ids[14:]
  assert page.js('document.getElementById("next").disabled')
  # search reaches concepts of every page
  assert [c[0] for c in _search(page, f'c{ids[-1]}')] == [ids[-1]]


def test_image_run_opens_a_patch_panel(tmp_path, page):
  wd, _ = fake.image_workdir(str(tmp_path))
  path = report_html.write(wd)
  page.open(browser.url(path))
  assert page.js(TREE) == [[0, False, [0, 1]], [1, False, [2, 3]]]
  page.js('document.querySelector(\'[data-concept-id="0"] > summary\').click()')
  page.wait_for('document.querySelector(\'[data-concept-id="0"] .tile\')')  # its own panel
  assert page.js('''[...document.querySelectorAll('[data-concept-id="0"] .tile')].map(
      t => t.dataset.imageId)''') == ['5', '4', '1', '0']  # lighting feature 0 or 1
  page.js('document.querySelector(\'[data-feature-id="0"]\').click()')
  panel = '[data-panel-feature="0"]'
  page.wait_for(f'document.querySelector(\'{panel} .tile\')')
  tiles = page.js(f'''[...document.querySelectorAll('{panel} .tile')].map(t => [
      t.dataset.imageId, t.querySelector('img').getAttribute('src'),
      t.querySelector('img').complete && t.querySelector('img').naturalWidth,
      t.querySelector('canvas').width, t.querySelector('canvas').height])''')
  # the planted images of feature 0, strongest first; thumbnails loaded; canvas = patch grid
  assert [t[:2] for t in tiles] == [['4', 'thumbs/4.jpg'], ['0', 'thumbs/0.jpg']]
  page.wait_for(f'[...document.querySelectorAll(\'{panel} img\')].every(i => i.naturalWidth)')
  assert all(t[3:] == [fake.GRID[1], fake.GRID[0]] for t in tiles)
  # the heat map lights the planted patch and only it
  lit = page.js(f'''(() => {{ const c = document.querySelector('{panel} canvas');
      const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      return [...Array(c.width * c.height).keys()].filter(i => px[4 * i + 3] > 0); }})()''')
  assert lit == [fake.planted(4)[1]]
  assert 'dominant labels: dog (1), cat (1)' in page.js(f'document.querySelector(\'{panel}\')'
                                                        '.textContent')
  page.screenshot(str(tmp_path / 'image_run.png'))
  assert [c[0] for c in _search(page, 'dog')] == [0, 1]  # search by label
