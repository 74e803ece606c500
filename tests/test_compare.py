"""The comparison run (mode='compare'): every method trained on the same data, exported in the
CSAE format and scored by one scorer; the scorer itself checked on a hand-made export."""

import json
import os

import numpy as np
import pytest

from csae_jax import config as config_lib
from csae_jax import export, modes
from csae_jax.compare import score
from csae_jax.sources import synthetic
from experiments.configs import compare as compare_config

METHODS = ['csae', 'csae_joint_alpha1', 'csae_partial', 'csae_bilateral', 'flat_coactivation',
           'matryoshka_conditional', 'matryoshka_cosine', 'stacked', 'agglomerative',
           'spectral', 'kmeans', 'topk_reference', 'oracle']


def _small(**over):
  c = compare_config.get_config('small')
  c.train.steps, c.level2.steps, c.joint.level2_start = 150, 150, 75
  c.level2.restarts, c.data.eval_rows, c.compare.n_perm = 2, 4096, 20
  c.update_from_flattened_dict(over)
  return c


@pytest.fixture(scope='module')
def compared(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp('compare'))
  return wd, modes.run(_small(), wd)


def test_every_method_is_exported_and_scored(compared):
  wd, out = compared
  assert out['compare/methods'] == METHODS
  with open(os.path.join(wd, 'compare.json')) as f:
    results = json.load(f)
  assert sorted(results) == sorted(METHODS)
  for m in METHODS:
    exp = os.path.join(wd, m, 'export')
    for name in ('level1_decoder.npy', 'level2_decoder.npy', 'hierarchy.json', 'metrics.json',
                 'level1_sae.npz'):
      assert os.path.exists(os.path.join(exp, name)), (m, name)
    r = results[m]
    for key in ('synthetic/parent_ari', 'hms/minus_null', 'hms/p_value', 'level2/coverage',
                'synthetic/sibling_f1', 'synthetic/parent_mcc', 'level1/variance_explained'):
      assert key in r, (m, key)
    assert 0 < r['hms/p_value'] <= 1
  # methods with parent activations on inputs get the parent/child statistics
  for m in ('flat_coactivation', 'matryoshka_conditional', 'stacked'):
    assert 0 <= results[m]['parent_child/p_parent_given_child_mean'] <= 1
    assert 0 <= results[m]['synthetic/parent_detection_f1'] <= 1
  assert 'parent_child/p_parent_given_child_mean' not in results['csae']
  # the grouping baselines share CSAE's level 1: identical level-1 numbers
  for m in ('flat_coactivation', 'stacked', 'kmeans'):
    assert results[m]['level1/variance_explained'] == results['csae']['level1/variance_explained']
  # the oracle groups CSAE's level 1 by the true parents, whose directions are its level 2
  assert results['oracle']['level2/concepts_used'] <= _small().data.synthetic.n_parents
  assert results['oracle']['synthetic/parent_mcc'] == pytest.approx(1.0, abs=1e-5)
  md = open(os.path.join(wd, 'compare.md')).read()
  assert all(f'| {m} |' in md for m in METHODS)
  assert os.path.getsize(os.path.join(wd, 'compare_hms.png')) > 5000
  assert os.path.getsize(os.path.join(wd, 'compare_recon.png')) > 5000
  # the run report: the comparison table and a report per method (csae's from its pipeline)
  with open(os.path.join(wd, 'report', 'index.html')) as f:
    page = f.read()
  for m in METHODS:
    assert f'<tr data-method="{m}">' in page and f'href="{m}/report/index.html"' in page, m
    assert os.path.exists(os.path.join(wd, m, 'report', 'index.html')), m


def test_scoring_is_a_function_of_the_export(compared):
  """Re-scoring an export gives the same numbers (nothing depends on the training process),
  and the scorer agrees with the pipeline's own ARI for CSAE."""
  wd, _ = compared
  cfg = config_lib.from_config_dict(_small())
  src = synthetic.SyntheticSource(cfg.data.synthetic, batch_size=512, seed=0)
  es = score.synthetic_eval_set(src, 4096)
  with open(os.path.join(wd, 'compare.json')) as f:
    results = json.load(f)
  again, _ = score.score(os.path.join(wd, 'kmeans', 'export'), es, n_perm=20, seed=0)
  for k in ('synthetic/parent_ari', 'hms/mean', 'hms/null_mean', 'synthetic/sibling_f1'):
    assert again[k] == pytest.approx(results['kmeans'][k], rel=1e-6), k
  pipeline_metrics = json.load(open(os.path.join(wd, 'csae', 'export', 'metrics.json')))
  assert results['csae']['synthetic/parent_ari'] == pytest.approx(
      pipeline_metrics['synthetic/parent_ari'], abs=1e-9)


def test_a_hand_made_true_hierarchy_scores_perfectly(tmp_path):
  """An export whose level 1 is the true children and whose concepts are the true parents gets
  ARI 1, sibling F1 1, parent MCC 1 and a synthetic HMS far above its null; shuffling the
  concepts brings HMS to its null."""
  cfg = config_lib.SyntheticConfig()
  src = synthetic.SyntheticSource(cfg, batch_size=512, seed=0)
  t = src.truth
  n, d = t.children_cd.shape
  params = {'w_enc': t.children_cd.T.copy(), 'b_enc': np.zeros(n, np.float32),
            'w_dec': t.children_cd.copy(), 'b_dec': np.zeros(d, np.float32)}
  es = score.synthetic_eval_set(src, 4096)

  def write(out, groups):
    hier = {'schema_version': 1, 'alive': list(range(n)), 'unassigned': [],
            'concepts': [{'id': int(c), 'members': [int(j) for j in np.flatnonzero(groups == c)],
                          'weights': [1.0] * int(np.sum(groups == c))} for c in np.unique(groups)]}
    export.write(str(out), level1=params, level1_threshold=-1.0, level1_arch='topk', level1_k=4,
                 scale=1.0, level2=None, level2_decoder_md=t.parents_kd, hierarchy=hier,
                 metrics={})
    return score.score(str(out), es, n_perm=50, seed=0)[0]

  good = write(tmp_path / 'true', t.parent_of_child_c)
  assert good['synthetic/parent_ari'] == pytest.approx(1.0)
  assert good['synthetic/sibling_f1'] == pytest.approx(1.0)
  assert good['synthetic/parent_mcc'] == pytest.approx(1.0, abs=1e-5)
  assert good['hms/minus_null'] > 0.2 and good['hms/p_value'] < 0.05
  shuffled = write(tmp_path / 'shuffled',
                   np.random.default_rng(0).permutation(t.parent_of_child_c))
  assert shuffled['synthetic/parent_ari'] < 0.2
  assert abs(shuffled['hms/minus_null']) < 3 * shuffled['hms/null_std'] + 1e-6


def test_compare_config_errors():
  with pytest.raises(ValueError, match="compare.methods"):
    config_lib.from_config_dict(_small(**{'compare.methods': 'csae,magic'}))
  with pytest.raises(ValueError, match='data.path'):
    config_lib.from_config_dict(_small(**{'compare.embeddings': 'x.npy'}))
  with pytest.raises(ValueError, match='variant'):
    compare_config.get_config('huge')
  with pytest.raises(ValueError, match='variant'):
    compare_config.get_config('small_small')
  syn = lambda v: config_lib.from_config_dict(compare_config.get_config(v)).data.synthetic
  assert (syn('').scene_size, syn('').scene_cooccur, syn('').child_parent_cos) == (2, 0.5, 0.6)
  assert syn('independent').scene_cooccur == 0.0
  assert (syn('small_control').child_parent_cos, syn('small_control').scene_cooccur) == (0.0, 0.5)


def test_oracle_groups_the_level1_features_by_their_true_parent(tmp_path):
  """The oracle row: each alive feature under the true parent of its closest true child (a
  noisy copy included); dead features stay out; real data (no ground truth) has no oracle."""
  from csae_jax.compare import methods as methods_lib  # pylint: disable=g-import-not-at-top
  src = synthetic.SyntheticSource(config_lib.SyntheticConfig(), batch_size=512, seed=0)
  t = src.truth
  rng = np.random.default_rng(0)
  noisy = t.children_cd[5] + 0.1 * rng.standard_normal(t.children_cd.shape[1])
  w_nd = np.concatenate([t.children_cd, noisy[None], rng.standard_normal((1, src.d))])
  alive_n = np.ones(len(w_nd), bool)
  alive_n[-1] = False
  n, d = w_nd.shape
  l1 = methods_lib.Level1({'w_enc': w_nd.T.astype(np.float32), 'b_enc': np.zeros(n, np.float32),
                           'w_dec': w_nd.astype(np.float32), 'b_dec': np.zeros(d, np.float32)},
                          -1.0, 'topk', 4, alive_n, {})
  (m,) = methods_lib.oracle_grouping(src, str(tmp_path), l1)
  hier = json.load(open(os.path.join(m.export_dir, 'hierarchy.json')))
  parent_n = np.full(n, -1)
  for c in hier['concepts']:
    parent_n[c['members']] = c['id']
  want = np.concatenate([t.parent_of_child_c, [t.parent_of_child_c[5]], [-1]])
  np.testing.assert_array_equal(parent_n, want)
  assert methods_lib.oracle_grouping(object(), str(tmp_path), l1) == []
