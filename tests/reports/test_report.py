"""The run report without a browser: self-contained, the tree's data is the run's hierarchy,
coherence is the members' mean pairwise cosine, top images and heat maps of a harvest are the
planted ones, the report mode re-renders a workdir, and a bad workdir_in names the missing file."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from csae_jax import config as config_lib
from csae_jax import modes
from csae_jax.reports import html as report_html
from csae_jax.reports import patches
from experiments.configs import report as report_config
from tests.reports import fake


def embedded_data(path: str) -> dict:
  with open(path) as f:
    text = f.read()
  m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S)
  return json.loads(m.group(1).replace('<\\/', '</'))


def panels(report_dir: str) -> dict:
  """{'f': {id: [top, labels]}, 'c': {...}} merged from report/data/*.js."""
  out = {'f': {}, 'c': {}}
  for name in sorted(os.listdir(os.path.join(report_dir, 'data'))):
    with open(os.path.join(report_dir, 'data', name)) as f:
      m = re.fullmatch(r'csaeReportPart\("([fc])",(\d+),(.*)\);\n', f.read(), re.S)
    assert name == f'{m.group(1)}{m.group(2)}.js'
    out[m.group(1)].update(json.loads(m.group(3)))
  return out


def assert_self_contained(path: str) -> None:
  with open(path) as f:
    text = f.read()
  # nothing remote: every src / href is a data: URI, a relative path or an in-page anchor
  for attr, value in re.findall(r'\b(src|href)\s*=\s*["\']([^"\']*)', text):
    assert not re.match(r'(https?:)?//', value), (attr, value)
  assert not re.search(r'url\(\s*["\']?(https?:)?//', text)
  assert not re.search(r'@import|<link\b|<script[^>]*\bsrc=', text)


def _report_cfg(wd, **kw):
  c = report_config.get_config()
  c.workdir_in = wd
  c.update(kw)
  return c


def test_pipeline_report_is_self_contained_and_holds_the_hierarchy(tmp_path):
  wd = str(tmp_path / 'wd')
  hier = fake.pipeline_workdir(wd, n1=60, n_concepts=9, figures=True)
  path = report_html.write(wd)
  assert path == os.path.join(wd, 'report', 'index.html')
  assert_self_contained(path)
  with open(path) as f:
    text = f.read()
  assert text.count('src="data:image/png;base64,') == 2  # curves + density, embedded
  assert '<td>fvu</td><td>0.1234</td>' in text  # the metrics table
  data = embedded_data(path)
  assert [c[0] for c in data['concepts']] == [c['id'] for c in hier['concepts']]
  assert [c[1] for c in data['concepts']] == [c['members'] for c in hier['concepts']]
  assert [c[2] for c in data['concepts']] == [[round(w, 3) for w in c['weights']]
                                              for c in hier['concepts']]
  assert data['unassigned'] == hier['unassigned'] and 'panels' not in data  # no harvest
  assert not os.path.exists(os.path.join(wd, 'report', 'data'))
  w1 = np.load(os.path.join(wd, 'export', 'level1_decoder.npy'))
  for c in data['concepts']:
    rows = w1[c[1]]
    cos = rows @ rows.T
    want = (cos.sum() - len(rows)) / (len(rows) * (len(rows) - 1))
    assert c[3] == pytest.approx(want, abs=1e-4)
  # the page's script puts the ids on the elements the browser test looks for
  assert 'data-concept-id="' in text and 'data-feature-id="' in text


def test_coherence_is_one_for_identical_rows_and_none_for_singletons():
  w = np.tile(np.array([[0.6, 0.8]], np.float32), (3, 1))
  assert report_html.coherence(w, [0, 1, 2]) == pytest.approx(1.0)
  assert report_html.coherence(np.eye(3, dtype=np.float32), [0, 1, 2]) == pytest.approx(0.0)
  assert report_html.coherence(w, [1]) is None


def test_report_mode_rerenders_a_workdir_without_training(tmp_path):
  wd = str(tmp_path / 'wd')
  fake.pipeline_workdir(wd)  # a run from before the curves were drawn (figures=False)
  out = modes.run(_report_cfg(wd, page_size=7), '')
  path = os.path.join(wd, 'report', 'index.html')
  assert out['mode'] == 'report' and out['report'] == path and out['bytes'] > 1000
  assert embedded_data(path)['page_size'] == 7
  # the curves are drawn again from histories.json, into report/
  assert os.path.getsize(os.path.join(wd, 'report', 'curves.png')) > 1000
  assert not os.path.exists(os.path.join(wd, 'level1', 'ckpt'))  # nothing trained


@pytest.mark.parametrize('remove, pattern', [
    (None, r'workdir_in .*nowhere.* does not exist'),
    ('export/metrics.json', r'export/metrics\.json is missing.*--config\.workdir_in'),
    ('export/hierarchy.json', r'export/hierarchy\.json is missing'),
    ('export/level1_decoder.npy', r'export/level1_decoder\.npy is missing'),
])
def test_bad_workdir_in_names_the_missing_file(tmp_path, remove, pattern):
  wd = str(tmp_path / 'wd')
  fake.pipeline_workdir(wd)
  if remove:
    os.remove(os.path.join(wd, remove))
  else:
    wd = str(tmp_path / 'nowhere')
  with pytest.raises(ValueError, match=pattern):
    modes.run(_report_cfg(wd), '')


def test_report_config_refuses_unknown_and_missing_keys():
  with pytest.raises(ValueError, match=r"unknown config key\(s\) \['top_imgs'\]"):
    config_lib.report_from_config_dict({'workdir_in': 'x', 'top_imgs': 3})
  with pytest.raises(ValueError, match=r"'workdir_in' is required"):
    config_lib.report_from_config_dict(report_config.get_config())
  with pytest.raises(ValueError, match=r"'top_images' must be > 0"):
    config_lib.report_from_config_dict({'workdir_in': 'x', 'top_images': 0})


def test_top_images_and_heat_maps_are_the_planted_ones(tmp_path):
  wd, hier = fake.image_workdir(str(tmp_path))
  path = report_html.write(wd, n_top=3)
  data = embedded_data(path)
  assert data['grid'] == list(fake.GRID)
  p = panels(os.path.dirname(path))
  assert data['panels'] == {'part': report_html.PANEL_PART, 'f': [0], 'c': [0]}
  for f in range(4):
    imgs = sorted((i for i in range(fake.N_IMAGES) if fake.planted(i)[0] == f),
                  key=lambda i: -fake.planted(i)[2])[:3]
    top = p['f'][str(f)][0]
    assert [t[0] for t in top] == imgs, f
    for img, score, cells, q in top:
      _, cell, code = fake.planted(img)
      assert score == pytest.approx(code) and cells == [cell] and q == [255]
  assert '4' not in p['f']  # never fires: no panel data
  # concept {0, 1}: the images lighting feature 0 or 1, best first, and their labels
  assert [t[0] for t in p['c']['0'][0]] == [5, 4, 1]
  assert p['c']['0'][1] == [['dog', 2], ['cat', 1]]
  assert data['concepts'][0][4] == 'dog'  # a concept's label: its dominant one (searchable)
  assert data['flabel'] == {str(f): p['f'][str(f)][1][0][0] for f in p['f']}
  for img, (thumb, label) in data['images'].items():
    assert thumb == f'thumbs/{img}.jpg' and label == fake.FILES[int(img)].split('/')[0]
    with Image.open(os.path.join(wd, 'report', thumb)) as im:
      assert im.size == (patches.THUMB_PX, patches.THUMB_PX)
  assert_self_contained(path)


def test_images_moved_since_the_harvest_give_panels_without_thumbnails(tmp_path):
  import shutil
  wd, _ = fake.image_workdir(str(tmp_path))
  shutil.rmtree(str(tmp_path / 'harvest' / 'images'))
  data = embedded_data(report_html.write(wd))
  assert data['panels']['f'] and all(v[0] is None for v in data['images'].values())


def test_compare_report_links_every_method(tmp_path):
  wd = str(tmp_path / 'cmp')
  fake.pipeline_workdir(os.path.join(wd, 'csae'))
  fake.pipeline_workdir(os.path.join(wd, 'matryoshka_cosine'), seed=1)
  os.remove(os.path.join(wd, 'matryoshka_cosine', 'histories.json'))  # a baseline: no curves
  results = {'csae': {'family': 'csae', 'level1/variance_explained': 0.91, 'hms/mean': 0.5},
             'matryoshka_cosine': {'family': 'matryoshka', 'level1/variance_explained': 0.88}}
  with open(os.path.join(wd, 'compare.json'), 'w') as f:
    json.dump(results, f)
  path = report_html.write_compare(wd)
  assert_self_contained(path)
  with open(path) as f:
    text = f.read()
  assert '<tr data-method="csae"><td>csae</td><td>0.910</td><td>0.500</td></tr>' in text
  assert '<td>—</td>' in text  # the baseline has no HMS
  for name in results:
    assert f'href="{name}/report/index.html"' in text
  # the baseline's report is written here; CSAE's own run wrote its own (not rewritten)
  assert os.path.exists(os.path.join(wd, 'matryoshka_cosine', 'report', 'index.html'))
  assert not os.path.exists(os.path.join(wd, 'csae', 'report', 'index.html'))
  modes.run(_report_cfg(wd), '')  # the report mode re-renders them all
  assert os.path.exists(os.path.join(wd, 'csae', 'report', 'index.html'))


def test_compare_report_gives_a_baseline_the_top_images_of_its_own_concepts(tmp_path):
  """A baseline keeps no stage manifest: its report scans the harvest CSAE's run names, with
  the baseline's own level-1 SAE and concepts."""
  import shutil
  wd = str(tmp_path / 'cmp')
  csae_wd, _ = fake.image_workdir(str(tmp_path))
  shutil.move(csae_wd, os.path.join(wd, 'csae'))
  base = os.path.join(wd, 'kmeans')
  shutil.copytree(os.path.join(wd, 'csae', 'export'), os.path.join(base, 'export'))
  hier = {'schema_version': 1, 'alive': list(range(8)), 'unassigned': [4, 5, 6, 7],
          'concepts': [{'id': 0, 'members': [0, 2], 'weights': [1.0, 1.0]},
                       {'id': 1, 'members': [1, 3], 'weights': [1.0, 1.0]}]}
  with open(os.path.join(base, 'export', 'hierarchy.json'), 'w') as f:
    json.dump(hier, f)
  with open(os.path.join(wd, 'compare.json'), 'w') as f:
    json.dump({'csae': {'family': 'csae'}, 'kmeans': {'family': 'clustering'}}, f)
  report_html.write_compare(wd)
  data = embedded_data(os.path.join(base, 'report', 'index.html'))
  assert data['grid'] == list(fake.GRID) and data['panels']['c'] == [0]
  p = panels(os.path.join(base, 'report'))
  # concept {0, 2}: image 4 (feature 0, code 5), image 2 (feature 2, code 3), image 0 (code 1)
  assert [t[0] for t in p['c']['0'][0]] == [4, 2, 0]
  assert [t[0] for t in p['c']['1'][0]] == [5, 3, 1]  # {1, 3}
  assert [t[0] for t in p['f']['0'][0]] == [4, 0]
  assert all(os.path.exists(os.path.join(base, 'report', t)) for t, _ in data['images'].values())
  assert_self_contained(os.path.join(base, 'report', 'index.html'))


def test_image_ranges_need_each_images_rows_together():
  ids, lo, hi = patches.image_ranges(np.array([0, 0, 1, 1, 1, 3]), 'index.npz')
  assert ids.tolist() == [0, 1, 3] and lo.tolist() == [0, 2, 5] and hi.tolist() == [2, 5, 6]
  with pytest.raises(ValueError, match=r'index\.npz: image_id is not in ascending row order'):
    patches.image_ranges(np.array([0, 1, 0]), 'index.npz')


def test_top_images_of_a_larger_harvest_match_a_brute_force_scan(tmp_path):
  """Several batches (batch_rows smaller than the harvest), random codes: the streamed, device-
  reduced top lists equal a plain numpy scan over every row."""
  rng = np.random.default_rng(0)
  n_img, per, d = 40, 6, 8
  site, _ = fake.harvest_folder(str(tmp_path / 'h'))
  x = rng.standard_normal((n_img * per, d)).astype(np.float32)
  np.save(os.path.join(site, 'shard_00000.npy'), x)
  cells = np.tile(np.arange(per), n_img)
  np.savez(os.path.join(site, 'index.npz'), image_id=np.repeat(np.arange(n_img), per),
           token_index=cells, row=cells // 3, col=cells % 3)
  sae = fake.identity_sae(d)
  sae['k'] = 3
  wd = str(tmp_path / 'wd')
  concepts = [{'id': 0, 'members': [0, 5], 'weights': [1, 1]},
              {'id': 1, 'members': [2], 'weights': [1]}]
  fake.pipeline_workdir(wd, n1=d, n_concepts=1, d=d, data_path=site,
                        w_dec_nd=np.eye(d, dtype=np.float32), sae=sae)
  tops = patches.top_images(os.path.join(wd, 'export'), site, concepts, str(tmp_path / 'r'),
                            n_top=4, batch_rows=50)
  codes = np.maximum(x, 0) * (np.argsort(np.argsort(-np.maximum(x, 0), 1), 1) < 3)  # TopK 3
  per_img = codes.reshape(n_img, per, d)
  for f in range(d):
    want = np.argsort(-per_img[:, :, f].max(1), kind='stable')[:4]
    assert [t[0] for t in tops.features[f]] == want.tolist(), f
    img = want[0]
    lit = np.flatnonzero(per_img[img, :, f] > 0)
    assert tops.features[f][0][2] == lit.tolist()
  cc = per_img[:, :, [0, 5]].sum(-1)
  assert [t[0] for t in tops.concepts[0]] == np.argsort(-cc.max(1), kind='stable')[:4].tolist()


def test_steering_captions_are_shown_escaped(tmp_path):
  wd = str(tmp_path / 'wd')
  fake.pipeline_workdir(wd)
  os.makedirs(os.path.join(wd, 'steer'))
  rows = [{'image': 3, 'arm': 'concept', 'concept': 1, 'sign': 1, 'value': 2.5,
           'mode': 'clamp', 'tokens': [1, 2], 'text': 'a cat <script>x</script> on grass'},
          {'image': 3, 'arm': 'none', 'concept': 1, 'sign': 0, 'value': 0.0, 'mode': 'clamp',
           'tokens': [1], 'text': 'a dog'}]
  with open(os.path.join(wd, 'steer', 'captions.jsonl'), 'w') as f:
    f.write('\n'.join(json.dumps(r) for r in rows) + '\n')
  with open(report_html.write(wd)) as f:
    page = f.read()
  assert 'id="steering"' in page and '2 captions' in page
  assert '<td>a cat &lt;script&gt;x&lt;/script&gt; on grass</td>' in page
  assert '<th>arm</th>' in page and '<th>tokens</th>' not in page
