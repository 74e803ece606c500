"""End to end: the small variant of the default config, resume equivalence, refusal of a
workdir made with another config, and user arrays (plain np.save files) with bad-input errors."""

import json
import os

import numpy as np
import pytest

from csae_jax import modes
from experiments.configs import csae


def small(**overrides):
  c = csae.get_config('small')
  c.train.steps = 300
  c.train.checkpoint_every = 100
  c.level2.steps = 300
  c.level2.restarts = 4
  c.joint.level2_start = 150
  c.data.eval_rows = 4096
  c.update_from_flattened_dict(overrides)
  return c


def _export(wd):
  e = os.path.join(wd, 'export')
  with open(os.path.join(e, 'hierarchy.json')) as f:
    hier = json.load(f)
  return (np.load(os.path.join(e, 'level1_decoder.npy')),
          np.load(os.path.join(e, 'level2_decoder.npy')), hier)


@pytest.fixture(scope='module')
def staged_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp('staged'))
  return wd, modes.run(small(), wd)


def test_staged_pipeline_exports_and_recovers_children(staged_run):
  wd, m = staged_run
  w1, w2, hier = _export(wd)
  assert w1.shape == (m['level1/n_latents'], m['d']) and w1.dtype == np.float32
  # one level-2 row per concept (cascade/concepts.py), at most n2 of them
  assert w2.shape == (len(hier['concepts']), m['d']) and len(hier['concepts']) <= m['level2/n_latents']
  np.testing.assert_allclose(np.linalg.norm(w1, axis=1), 1.0, atol=1e-5)
  assert hier['schema_version'] == 1 and hier['concepts']
  members = [j for c in hier['concepts'] for j in c['members']]
  assert len(members) == len(set(members))  # each feature has at most one parent
  assert set(members) | set(hier['unassigned']) == set(hier['alive'])
  for c in hier['concepts']:
    assert c['weights'] == sorted(c['weights'], reverse=True)
  with open(os.path.join(wd, 'export', 'metrics.json')) as f:
    on_disk = json.load(f)
  for key in ('level1/fvu', 'level1/l0', 'level1/dead_frac', 'level2/variance_explained',
              'synthetic/child_mcc', 'synthetic/parent_ari', 'synthetic/parent_nmi',
              'level2/largest_concept_share', 'level2/near_duplicate_sibling_frac', 'config_hash'):
    assert key in on_disk
  # the inference rule reproduces the training sparsity on held-out data (TopK: the k largest
  # positive codes; the code L1 leaves some of the k at 0, in training and inference alike)
  with open(os.path.join(wd, 'level1', 'history.jsonl')) as f:
    train_l0 = [json.loads(line) for line in f][-1]['level1/l0']
  assert 0 < m['level1/l0'] <= m['level1/k'] + 1e-6
  assert abs(m['level1/l0'] - train_l0) / train_l0 < 0.15
  assert m['synthetic/child_mcc'] > 0.9
  assert m['level1/variance_explained'] > 0.9
  assert m['synthetic/parent_ari'] > 0.5  # far above chance (0) even at this tiny budget


def test_concepts_are_merged_level2_latents_with_their_mean_directions(staged_run):
  """The level-2 SAE trains half the rows' worth of latents (oversplit 0, the default); the
  export holds at most n2 concepts, one row per concept, the
  unit mean of its members' level-1 rows, and the concept SAE's argmax is that nearest row."""
  from csae_jax import export
  wd, m = staged_run
  w1, w2, hier = _export(wd)
  assert m['level2/latents_trained'] == max(m['level2/n_latents'], m['level1/alive'] // 2)
  assert m['level2/concepts'] == len(hier['concepts']) <= m['level2/n_latents']
  ids = sorted(c['id'] for c in hier['concepts'])
  assert ids == list(range(len(ids)))  # concept id = its row
  for c in hier['concepts']:
    mean = w1[c['members']].sum(0)
    np.testing.assert_allclose(w2[c['id']], mean / np.linalg.norm(mean), atol=1e-5)
    np.testing.assert_allclose(c['weights'], w1[c['members']] @ w2[c['id']], atol=1e-5)
  p2, thr2, arch2, k2 = export.load_sae(os.path.join(wd, 'export', 'level2_sae.npz'))
  assert (arch2, k2) == ('topk', 1) and p2['w_dec'].shape == w2.shape
  # signals a user of real data reads (README: "Can I trust these concepts?")
  for key in ('level1/near_duplicate_frac', 'level2/near_duplicate_concepts',
              'level2/effective_concepts', 'level2/concept_share_p90',
              'synthetic/children_recovered', 'synthetic/parent_ari_recovered'):
    assert key in m, key
  assert 1 <= m['level2/effective_concepts'] <= m['level2/concepts']


def test_paper_rule_exports_the_trained_level2_sae(tmp_path):
  """oversplit 1, no merge, no refine: the trained SAE as it is, n2 rows, argmax parents."""
  m = modes.run(small(**{'level2.oversplit': 1.0, 'level2.merge_ratio': 0.0,
                         'level2.refine': False, 'train.steps': 100, 'level2.steps': 100}),
                str(tmp_path))
  _, w2, hier = _export(str(tmp_path))
  assert w2.shape == (m['level2/n_latents'], m['d'])
  assert m['level2/latents_trained'] == m['level2/n_latents'] and 'level2/merges' not in m


def test_exported_sae_reconstructs_raw_activations(staged_run):
  """The input-normalisation scale is folded into the exported level-1 SAE."""
  from csae_jax import config as config_lib
  from csae_jax import export
  from csae_jax.evals import recon
  from csae_jax.sources import synthetic
  wd, m = staged_run
  params, thr, arch, k = export.load_sae(os.path.join(wd, 'export', 'level1_sae.npz'))
  src = synthetic.SyntheticSource(config_lib.SyntheticConfig(), batch_size=512, seed=0)
  raw = [x / src.scale for x in src.eval_batches(4096, 1024)]
  assert np.mean(np.sum(raw[0] ** 2, -1)) > 2  # raw data is not unit-scaled
  ev = recon.evaluate(params, raw, thr, arch=arch, k=k)
  assert ev['fvu'] == pytest.approx(m['level1/fvu'], abs=1e-3)


class _Interrupt(Exception):
  pass


def _interrupt_at(step, desc_hits):
  def hook(done, state):
    if done == step and not desc_hits:
      desc_hits.append(done)
      raise _Interrupt(f'killed at {done}')
  return hook


@pytest.mark.parametrize('mode', ['staged', 'joint'])
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, mode):
  cfg = small(mode=mode)
  ref = modes.run(cfg, str(tmp_path / 'ref'))
  wd = str(tmp_path / 'resumed')
  with pytest.raises(_Interrupt):  # dies in level 1 / joint, after the checkpoint at step 200
    modes.run(cfg, wd, hooks=[_interrupt_at(250, [])])
  if mode == 'staged':
    with pytest.raises(_Interrupt):  # level 1 is done; dies in level 2 this time
      modes.run(cfg, wd, hooks=[_interrupt_at(150, [])])
  out = modes.run(cfg, wd)
  for a, b in zip(_export(str(tmp_path / 'ref'))[:2], _export(wd)[:2]):
    np.testing.assert_array_equal(a, b)
  assert _export(str(tmp_path / 'ref'))[2] == _export(wd)[2]
  assert out['synthetic/parent_ari'] == ref['synthetic/parent_ari']


def test_workdir_with_other_config_is_refused_unless_overwrite(staged_run):
  wd, _ = staged_run
  with pytest.raises(ValueError, match=r'different config.*level1\.k.*overwrite=True'):
    modes.run(small(**{'level1.k': 3}), wd)
  assert os.path.exists(os.path.join(wd, 'level1', 'ckpt'))  # nothing was lost


def _write_arrays(root, shapes, dtype=np.float32, seed=0):
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i, shape in enumerate(shapes):
    np.save(os.path.join(root, f'acts_{i}.npy'), rng.standard_normal(shape).astype(dtype))


def arrays_cfg(path, **kw):
  return small(**{'data.path': path, 'train.steps': 60, 'level2.steps': 60,
                  'train.batch_size': 128, 'data.eval_rows': 512, 'level1.n_latents': 64,
                  'level1.k': 4, **kw})


def test_pipeline_on_plain_npy_files(tmp_path):
  data = str(tmp_path / 'acts')
  _write_arrays(data, [(700, 24), (500, 24)])
  np.save(os.path.join(data, 'acts_2.npy'), np.random.default_rng(1).standard_normal(
      (300, 24)).astype(np.float16))
  m = modes.run(arrays_cfg(data), str(tmp_path / 'wd'))
  w1, w2, hier = _export(str(tmp_path / 'wd'))
  # n2 = n1 / 2 by default caps the concepts; Gaussian rows have no siblings, so most rows are
  # isolated (level2.isolate_q) and fewer concepts remain: one exported row per concept
  assert w1.shape == (64, 24) and w2.shape[1] == 24 and 1 <= w2.shape[0] <= 32
  assert w2.shape[0] == len(hier['concepts'])
  assert m['level2/k'] == 1 and 'synthetic/child_mcc' not in m
  assert hier['alive']


@pytest.mark.parametrize('make, pattern', [
    (lambda d: None, r'does not exist'),
    (lambda d: os.makedirs(d), r'no \.npy'),
    (lambda d: _write_arrays(d, [(100, 8), (100, 9)]), r'acts_1\.npy.*9|9.*acts_1\.npy'),
    (lambda d: (os.makedirs(d), np.save(os.path.join(d, 'a.npy'), np.ones(10, np.float32))),
     r'a\.npy.*\(10,\)'),
    (lambda d: (os.makedirs(d), np.save(os.path.join(d, 'a.npy'), np.ones((4, 5, 6), np.float32))),
     r'a\.npy.*\(4, 5, 6\)'),
])
def test_bad_array_inputs_fail_clearly(tmp_path, make, pattern):
  data = str(tmp_path / 'acts')
  make(data)
  with pytest.raises(ValueError, match=pattern):
    modes.run(arrays_cfg(data), str(tmp_path / 'wd'))


def test_nan_in_data_names_file_and_row(tmp_path):
  data = str(tmp_path / 'acts')
  x = np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32)
  x[123, 3] = np.nan
  os.makedirs(data)
  np.save(os.path.join(data, 'bad.npy'), x)
  with pytest.raises(ValueError, match=r'bad\.npy.*123'):
    modes.run(arrays_cfg(data), str(tmp_path / 'wd'))


def test_k_larger_than_dictionary_is_refused(tmp_path):
  data = str(tmp_path / 'acts')
  _write_arrays(data, [(300, 8)])
  with pytest.raises(ValueError, match=r'level1\.k = 100 is larger than the dictionary'):
    modes.run(arrays_cfg(data, **{'level1.k': 100}), str(tmp_path / 'wd'))


def test_sweep_mode_trains_a_grid_and_reports_each(tmp_path):
  m = modes.run(small(**{'mode': 'sweep', 'sweep.k': '2,6', 'sweep.seeds': '0,1',
                            'train.steps': 200}), str(tmp_path))
  rows = m['sweep/results']
  assert len(rows) == 4 and {(r['seeds'], r['k']) for r in rows} == {(0, 2), (0, 6), (1, 2),
                                                                        (1, 6)}
  by_k = {k: np.mean([r['l0'] for r in rows if r['k'] == k]) for k in (2, 6)}
  assert by_k[2] < by_k[6]  # each member trained at its own sparsity
  with open(tmp_path / 'sweep' / 'results.json') as f:
    assert json.load(f) == rows
  assert (tmp_path / 'sweep' / 'pareto.png').stat().st_size > 1000
  with pytest.raises(ValueError, match=r'sweep\.k'):
    modes.run(small(**{'mode': 'sweep', 'sweep.k': '2,x'}), str(tmp_path / 'bad'))


def test_stability_option_trains_the_next_seed_and_compares(tmp_path):
  wd = str(tmp_path)
  m = modes.run(small(**{'stability': True, 'level2.steps': 200}), wd)
  assert m['stability/seed'] == 1
  assert os.path.exists(os.path.join(wd, 'stability', 'export', 'hierarchy.json'))
  # the built-in hierarchy is easy: a second seed finds the true children again (64 of the
  # ~100 alive features; the rest are seed-specific mixtures) and groups them the same way
  assert m['stability/feature_match'] > 0.4 and m['stability/concept_ari'] > 0.5
  with open(os.path.join(wd, 'export', 'metrics.json')) as f:
    assert json.load(f)['stability/concept_ari'] == m['stability/concept_ari']


def test_exported_synthetic_data_is_scored_against_its_ground_truth(tmp_path):
  from csae_jax.evals import synthetic as synthetic_eval
  from csae_jax.sources import synthetic
  from csae_jax import config as config_lib
  c = small()
  data = str(tmp_path / 'acts')
  synth = config_lib.from_config_dict(c).data.synthetic
  synthetic.SyntheticSource(synth, batch_size=128, seed=3).write(data, 6000)
  m = modes.run(arrays_cfg(data, **{'train.steps': 500, 'level2.steps': 40, 'level2.restarts': 1,
                                    'level1.n_latents': c.level1.n_latents}),
                str(tmp_path / 'wd'))
  w1, _, hier = _export(str(tmp_path / 'wd'))
  truth = synthetic.read_ground_truth(data, w1.shape[1])
  alive = np.zeros(len(w1), bool)
  alive[hier['alive']] = True
  labels = np.full(len(w1), -1)
  for concept in hier['concepts']:
    labels[concept['members']] = concept['id']
  want = synthetic_eval.scores(truth.children_cd, truth.parent_of_child_c, w1, alive, labels)
  for key in ('synthetic/children_recovered', 'synthetic/child_mean_max_cos',
              'synthetic/parent_ari_recovered'):
    assert m[key] == pytest.approx(want[key], abs=1e-6, nan_ok=True), key
  assert m['synthetic/children_recovered'] > 0.5  # the children were found, not scored at random
  assert np.isfinite(m['synthetic/parent_ari_recovered'])

  # A ground truth of another width is refused with both shapes named.
  np.savez(os.path.join(data, 'ground_truth.npz'), parents_kd=truth.parents_kd[:, :5],
           children_cd=truth.children_cd[:, :5], parent_of_child_c=truth.parent_of_child_c)
  with pytest.raises(ValueError, match=r'ground_truth\.npz.*\(\d+, 5\).*d=\d+'):
    modes.run(arrays_cfg(data, **{'train.steps': 20, 'level2.steps': 20, 'level2.restarts': 1}),
              str(tmp_path / 'wd2'))


def test_stage_hashes_ignore_what_the_stage_does_not_read():
  """A level-2 or concept-step setting must not invalidate a finished level 1 (nor a concept-
  step setting a finished level 2): they are left out of those stages' config hashes."""
  from csae_jax import config as config_lib
  from csae_jax import stages
  base = config_lib.from_config_dict(small())
  def part(overrides, *parts):
    return stages.stage_config(config_lib.from_config_dict(small(**overrides)), *parts)
  for key, value in (('level2.oversplit', 3.0), ('level2.merge_ratio', 0.9),
                     ('level2.merge_z', 3.0), ('level2.refine', False)):
    assert part({key: value}, 'level1', 'train', 'data') == stages.stage_config(
        base, 'level1', 'train', 'data'), key
  for key, value in (('level2.merge_ratio', 0.9), ('level2.merge_z', 3.0),
                     ('level2.refine', False), ('level2.assign_threshold', 0.1)):
    assert part({key: value}, 'level2') == stages.stage_config(base, 'level2'), key
  # what the training reads still counts
  assert part({'level2.oversplit': 3.0}, 'level2') != stages.stage_config(base, 'level2')
  assert part({'level1.k': 3}, 'level1') != stages.stage_config(base, 'level1')
