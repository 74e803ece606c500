"""The clamp value, the judges and the protocol: the CLI as the issue writes it, suppression only
where the unsteered caption shows the concept, resuming, the blind VLM judge."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from csae_jax import checkpoint as ckpt_lib
from csae_jax.steering import judge as judge_lib
from csae_jax.steering import protocol, results as results_lib
from csae_jax.steering import rows as rows_lib
from csae_jax.steering import value as value_lib
from tests.steering.conftest import write_random_export
from tests.steering.test_interventions import np_codes, random_sae

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_image_scores_top_images_and_scale_on_constructed_rows():
  sae = random_sae('batch_topk')
  rng = np.random.default_rng(0)
  image_r = np.sort(rng.integers(0, 9, 50))  # 9 images, uneven token counts
  x = rng.standard_normal((50, 16)).astype(np.float32) * 1.5
  rows = rows_lib.InMemoryRows(x, image_r)
  groups = [[1, 2, 3], [7], list(range(40))]
  got = value_lib.image_scores(sae, rows, groups, batch_rows=16)  # batches cut images in two
  f = np_codes(sae, x)
  for i in range(9):
    for g, members in enumerate(groups):
      want = f[image_r == i][:, members].mean(0).sum() if (image_r == i).any() else 0.0
      np.testing.assert_allclose(got[i, g], want, rtol=1e-4, atol=1e-5)
  top = value_lib.top_images(got[:, 0], 4)
  assert list(top) == list(np.argsort(-got[:, 0])[:len(top)]) and (got[top, 0] > 0).all()
  # u: per image the mean of the member codes above the cut, then the mean over images
  codes = np.array([[0.2, 3.0], [1.0, 0.0], [5.0, 0.4], [0.1, 0.3]])
  img = np.array([0, 0, 1, 2])
  assert value_lib.scale_from_codes(codes, img, 0.5, 9.0) == pytest.approx(((3 + 1) / 2 + 5) / 2)
  assert value_lib.scale_from_codes(codes[3:], img[3:], 0.5, 9.0) == 9.0  # nothing above: fallback
  u, strength = value_lib.concept_scale(sae, rows, [1, 2, 3], top)
  sel = np.isin(image_r, top)
  fm = f[sel][:, [1, 2, 3]]
  per = [fm[image_r[sel] == i][fm[image_r[sel] == i] > value_lib.cutoff(sae)].mean()
         for i in np.unique(image_r[sel]) if (fm[image_r[sel] == i] > value_lib.cutoff(sae)).any()]
  assert u == pytest.approx(np.mean(per), rel=1e-4)
  assert strength.shape == (3,)


def test_lexical_judge_words_synonyms_and_matching(tmp_path):
  path = tmp_path / 'h.json'
  path.write_text(json.dumps({'tabby': 'cat', 'cat': 'animal', 'n02': ['goldfish', 'carp']}))
  hier = judge_lib.load_hierarchy(str(path))
  words = judge_lib.concept_words(['tabby', 'tabby', 'dog', None, 'tabby'], hier, 0.5)
  assert words == ['tabby', 'cat', 'animal']  # dog is 1 of 4 labelled: below min_frac
  assert judge_lib.concept_words(['fish/n02'], hier) == ['n02', 'goldfish', 'carp']
  assert judge_lib.concept_words(['Great_white_shark, white shark'], {}) == [
      'great white shark', 'white shark']
  j = judge_lib.LexicalJudge()
  assert j.judge(['cat'], [['Two Cats sleep', 'a catalogue', 'cat.', 'dog']]) == [
      [True, False, True, False]]
  with pytest.raises(ValueError, match='parent label'):
    (tmp_path / 'bad.json').write_text('[1, 2]')
    judge_lib.load_hierarchy(str(tmp_path / 'bad.json'))


class _FakePort:
  """Answers the blind question like a judge that says yes to captions containing 'cat'."""

  def __init__(self):
    self.questions = []

  def prompt_ids(self, grid, text):
    assert len(grid) == 0  # text only
    self.questions.append(text)
    return np.array([1, 2, 3])

  def generate(self, ids, pixels, grid, n, eos_token_id=None):
    assert pixels is None and grid is None
    return np.zeros((1, 2), np.int64)

  @property
  def tokenizer(self):
    return self

  def decode(self, tokens, skip_special_tokens=True):
    lines = self.questions[-1].splitlines()[2:]
    return '\n'.join(f'{line[0]}: {"yes" if "cat" in line else "no"}' for line in lines[:-1])


def test_vlm_judge_is_blind_and_maps_answers_back():
  port = _FakePort()
  j = judge_lib.VLMJudge(port, port, seed=3)
  sets = [['a cat', 'a dog', 'the cat sat', 'grass'], ['w1', 'cat']]
  got = j.judge(['cat'], sets)
  # the last caption of each set gets no answer from the fake (counted as unparsed, "no")
  assert j.unparsed == 2
  shown = [[line[3:] for line in q.splitlines()[2:]] for q in port.questions]
  for s, q, verdict in zip(sets, shown, got):
    assert sorted(q) == sorted(s)
    for cap, v in zip(s, verdict):
      assert v == ('cat' in cap and q.index(cap) < len(q) - 1)
  assert any(q != s for q, s in zip(shown, sets))  # shuffled: the judge cannot see the arm
  assert judge_lib.VLMJudge.parse('A: yes\nB) no\nc - YES', 4) == ([True, False, True, None], 1)


def test_similarity_and_summary():
  assert results_lib.similarity('a cat on grass', 'a cat on grass') == 1.0
  assert 0 < results_lib.similarity('a cat on grass', 'a dog on grass') < 1
  records = [{'image_id': i, 'image': f'{i}.png', 'arm': 'none', 'concept': None, 'sign': None,
              'text': 'a cat'} for i in range(4)]
  records += [{'image_id': i, 'image': f'{i}.png', 'arm': 'concept', 'concept': 7, 'sign': s,
               'text': 'a cat' if s == '+' else 'grass'} for i in range(4) for s in '+-']
  verdicts = {(i, 'none', 7, '+'): i < 1 for i in range(4)}
  verdicts.update({(i, 'concept', 7, '+'): i < 3 for i in range(4)})
  # suppression judged on every image (suppress_on=all): only image 0 had the concept to remove
  verdicts.update({(i, 'concept', 7, '-'): i == 3 for i in range(4)})
  out = results_lib.summarise(records, verdicts, ['none', 'concept'])['arms']
  assert out['none']['appeared_pct'] == 25.0 and out['concept']['appeared_pct'] == 75.0
  assert out['concept']['removed_pct'] == 100.0 and out['concept']['n_suppress'] == 1
  assert out['concept']['similarity'] == pytest.approx(np.mean([1.0] * 4 + [0.0] * 4))


def _run_cli(args, cwd):
  return subprocess.run([sys.executable, '-m', 'experiments.run', *args], cwd=cwd,
                        capture_output=True, text=True, timeout=600)


def test_cli_present_only_suppression_and_resume(steer_setup, tmp_path):
  s = steer_setup
  site = 'vision/block_2'
  run_dir = tmp_path / 'csae_run'
  export_dir = write_random_export(str(run_dir / 'export'), s['rows'][site], arch='batch_topk')
  # the level-1 manifest a pipeline run leaves beside its export names its harvest
  (run_dir / 'level1').mkdir()
  ckpt_lib.write_json_atomic(str(run_dir / 'level1' / 'manifest.json'),
                             {'data': {'kind': 'arrays', 'path': s['site_dirs'][site]}})
  wd = str(tmp_path / 'wd')
  args = ['--config=experiments/configs/steer.py', '--config.model=qwen3-vl',
          f'--config.model_path={s["folder"]}', f'--config.images={s["image_dir"]}',
          f'--config.export={export_dir}', f'--config.site={site}', '--config.concepts=0,1',
          '--config.arms=none,concept', '--config.value=8.0', '--config.mode=clamp',
          '--config.max_new_tokens=12', f'--workdir={wd}']
  proc = _run_cli(args + ['--config.images_per_concept=6'], ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'appeared %' in proc.stdout
  with open(os.path.join(wd, 'steer', 'results.json')) as f:
    res = json.load(f)
  with open(os.path.join(wd, 'steer', 'captions.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert {k for k in records[0]} >= {'image', 'arm', 'concept', 'value', 'mode', 'tokens', 'text'}
  base = {r['image_id']: r['text'] for r in records if r['arm'] == 'none'}
  judge = judge_lib.LexicalJudge()
  for c in res['concepts']:
    assert c['words'] and c['arms']['concept']['value'] == 8.0
    present = {i for i, t in base.items() if judge.judge(c['words'], [[t]])[0][0]}
    supp = {r['image_id'] for r in records if r['concept'] == c['id'] and r['sign'] == '-'}
    ins = [r for r in records if r['concept'] == c['id'] and r['sign'] == '+']
    assert supp == present and len(ins) == 6
    assert all(r['value'] == -8.0 for r in records if r['sign'] == '-')
  assert res['arms']['none']['appeared_pct'] is not None
  # resume: the same command makes no new caption and the same results
  n_lines = len(records)
  again = protocol.run(dict(model='qwen3-vl', model_path=s['folder'], images=s['image_dir'],
                            export=export_dir, site=site, concepts='0,1', arms='none,concept',
                            value=8.0, mode='clamp', max_new_tokens=12, images_per_concept=6),
                       wd)
  with open(os.path.join(wd, 'steer', 'captions.jsonl')) as f:
    assert len(f.readlines()) == n_lines
  assert again['arms'] == res['arms']
  with pytest.raises(ValueError, match='other settings'):
    protocol.run(dict(model='qwen3-vl', model_path=s['folder'], images=s['image_dir'],
                      export=export_dir, site=site, concepts='0,1', value=9.0), wd)
  # user mistakes: one clear line naming the key (the CLI prints it and exits with code 2)
  cfg = dict(model='qwen3-vl', model_path=s['folder'], images=s['image_dir'], export=export_dir)
  with pytest.raises(ValueError, match="harvest's site"):
    protocol.run(dict(cfg, site='vision/block_0'), str(tmp_path / 'wd2'))
  with pytest.raises(ValueError, match='matryoshka_export'):
    protocol.run(dict(cfg, arms='none,matryoshka'), str(tmp_path / 'wd3'))
  with pytest.raises(ValueError, match="'mode'"):
    protocol.run(dict(cfg, mode='clamp_all'), str(tmp_path / 'wd3'))


def test_vlm_judge_through_the_tiny_port(steer_setup, tmp_path):
  """judge=vlm end to end: the random model's answers are unparseable, so every caption counts
  as not showing the concept, and that is reported."""
  s = steer_setup
  site = 'vision/block_0'
  export_dir = write_random_export(str(tmp_path / 'export'), s['rows'][site], arch='topk')
  res = protocol.run(dict(model='qwen3-vl', model_path=s['folder'], images=s['image_dir'],
                          export=export_dir, harvest=s['site_dirs'][site], concepts='1',
                          arms='none,concept', images_per_concept=3, max_new_tokens=4,
                          batch_size=3, judge='vlm', judge_model='qwen3-vl',
                          judge_model_path=s['folder']), str(tmp_path / 'wd'))
  assert res['judge'] == 'vlm' and res['arms']['concept']['n_insert'] == 3
  assert res['judge_unparsed'] >= 1
  assert res['arms']['concept']['appeared_pct'] is not None
