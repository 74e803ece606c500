"""The report in a real browser (headless Chromium): a tiny pipeline run's report renders every
concept with every member, search filters the tree, a concept expands, pages page, and an image
run's feature opens its patch panel. The view state is the URL hash (report.js), so each check
is one `chromium --dump-dom URL#...`; a screenshot is saved into the test's tmp dir."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from csae_jax import modes
from csae_jax.reports import html as report_html
from tests.reports import browser, fake
from tests.test_pipeline import small

pytestmark = pytest.mark.skipif(
    browser.executable() is None,
    reason='no Chromium on PATH (install Debian\'s: apt-get install -y chromium, as .ci/run '
           'does; or set CSAE_CHROMIUM=/path/to/chrome)')


@pytest.fixture(scope='module')
def default_run(tmp_path_factory):
  """The small variant of the default config, few steps: the pipeline writes the report."""
  wd = str(tmp_path_factory.mktemp('run'))
  modes.run(small(**{'train.steps': 60, 'level2.steps': 60, 'level2.restarts': 1,
                     'data.eval_rows': 1024}), wd)
  with open(os.path.join(wd, 'export', 'hierarchy.json')) as f:
    hier = json.load(f)
  return wd, hier, os.path.join(wd, 'report', 'index.html')


def test_default_run_report_renders_every_concept_and_member(default_run, tmp_path):
  _, hier, page = default_run
  assert len(hier['concepts']) <= report_html.PAGE_SIZE  # one page holds the whole tree
  dom = browser.dump_dom(browser.url(page))
  assert 'data-ready="1"' in dom  # the script ran to its end
  shown = browser.concepts_in(dom)
  assert set(shown) == {c['id'] for c in hier['concepts']}
  for c in hier['concepts']:
    assert shown[c['id']]['features'] == c['members'], c['id']
    assert not shown[c['id']]['open']  # collapsed until asked
  n = len(hier['concepts'])
  assert f'>{n} of {n} concepts<' in dom
  png = browser.screenshot(browser.url(page, f'open={hier["concepts"][0]["id"]}'),
                           str(tmp_path / 'report.png'))
  with Image.open(png) as im:
    px = np.asarray(im.convert('L'), np.float32)
  assert px.std() > 10 and (px < 128).mean() > 0.01  # not a blank page: text and figures


def test_search_filters_the_tree_and_a_concept_expands(default_run):
  _, hier, page = default_run
  big = max(hier['concepts'], key=lambda c: len(c['members']))
  f = big['members'][-1]
  # "f<id>": only the concept holding feature <id>, that member marked
  shown = browser.concepts_in(browser.dump_dom(browser.url(page, f'q=f{f}')))
  assert list(shown) == [big['id']]
  assert re.search(rf'<li class="feature hit[^"]*" data-feature-id="{f}"', shown[big['id']]['html'])
  # a bare number: the concept with that id and any concept holding that feature
  want = {c['id'] for c in hier['concepts'] if c['id'] == f or f in c['members']}
  assert set(browser.concepts_in(browser.dump_dom(browser.url(page, f'q={f}')))) == want
  dom = browser.dump_dom(browser.url(page, 'q=no-such-label'))
  assert not browser.concepts_in(dom) and 'no concept matches' in dom
  # expand: the concept opens with its members, the others stay closed
  shown = browser.concepts_in(browser.dump_dom(browser.url(page, f'open={big["id"]}')))
  assert shown[big['id']]['open'] and sum(s['open'] for s in shown.values()) == 1
  # sort by size, smallest first
  shown = browser.concepts_in(browser.dump_dom(browser.url(page, 'sort=size&dir=asc')))
  sizes = [len(s['features']) for s in shown.values()]
  assert sizes == sorted(sizes)


def test_pages_of_a_large_tree(tmp_path):
  wd = str(tmp_path / 'wd')
  hier = fake.pipeline_workdir(wd, n1=200, n_concepts=20)
  page = report_html.write(wd, page_size=7)
  ids = [c['id'] for c in sorted(hier['concepts'], key=lambda c: (-len(c['members']), c['id']))]
  first = browser.concepts_in(browser.dump_dom(browser.url(page)))
  last = browser.concepts_in(browser.dump_dom(browser.url(page, 'page=3')))
  assert list(first) == ids[:7] and list(last) == ids[14:]
  # search reaches concepts of every page
  assert list(browser.concepts_in(browser.dump_dom(browser.url(page, f'q=c{ids[-1]}')))) == [
      ids[-1]]


def test_image_run_opens_a_patch_panel(tmp_path):
  wd, _ = fake.image_workdir(str(tmp_path))
  page = report_html.write(wd)
  dom = browser.dump_dom(browser.url(page, 'feature=0'))
  shown = browser.concepts_in(dom)
  assert shown[0]['open'] and not shown[1]['open']  # the concept holding feature 0
  panel = re.search(r'<div class="feature-panel" data-panel-feature="0">(.*?)</div></div></div>',
                    shown[0]['html'], re.S)
  assert panel, 'no patch panel for feature 0'
  tiles = re.findall(r'data-image-id="(\d+)"', panel.group(1))
  assert tiles == ['4', '0']  # the planted images of feature 0, strongest first
  assert 'src="thumbs/4.jpg"' in panel.group(1) and 'dominant labels: dog (1), cat (1)' in dom
  assert '<canvas' in panel.group(1) and 'data-heat' not in panel.group(1)  # painted
  # a concept's own panel, and search by label
  shown = browser.concepts_in(browser.dump_dom(browser.url(page, 'open=1')))
  assert re.findall(r'data-image-id="(\d+)"', shown[1]['html']) == ['3', '2']
  assert list(browser.concepts_in(browser.dump_dom(browser.url(page, 'q=dog')))) == [0, 1]
  browser.screenshot(browser.url(page, 'feature=0'), str(tmp_path / 'image_run.png'))
