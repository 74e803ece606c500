"""Tests of csae_jax/config.py (validation, resolution, hashing) and experiments/configs/csae.py."""

import dataclasses

import pytest

from csae_jax import config as config_lib
from experiments.configs import csae


def _dict(variant=None):
  return csae.get_config(variant).to_dict()


def _build(mutate):
  d = _dict()
  mutate(d)
  return config_lib.from_config_dict(d)


# ---- experiments/configs/csae.py -------------------------------------------------------------

def test_default_config_builds():
  cfg = config_lib.from_config_dict(csae.get_config())
  assert isinstance(cfg, config_lib.Config)
  assert cfg.mode == 'staged'
  assert cfg.train.steps == 4000
  assert cfg.level2.k == 1
  assert cfg.level2.restarts == 8
  # Frozen: the library boundary hands out immutable configs.
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.mode = 'joint'  # type: ignore[misc]


def test_small_variant_builds_and_is_smaller():
  small = config_lib.from_config_dict(csae.get_config('small'))
  full = config_lib.from_config_dict(csae.get_config())
  assert small.train.steps < full.train.steps
  assert small.train.steps == 600
  assert small.joint.level2_start < small.train.steps
  # The small variant must also be valid in joint mode (the CI runs it).
  d = _dict('small')
  d['mode'] = 'joint'
  assert config_lib.from_config_dict(d).mode == 'joint'


def test_unknown_variant_raises():
  with pytest.raises(ValueError, match='unknown config variant'):
    csae.get_config('nope')


def test_configdict_and_plain_dict_agree():
  assert (config_lib.from_config_dict(csae.get_config())
          == config_lib.from_config_dict(_dict()))


# ---- unknown keys and types ------------------------------------------------------------------

def test_unknown_key_via_unlocked_configdict():
  cd = csae.get_config()
  cd.unlock()
  cd.level1.unknown = 1
  with pytest.raises(ValueError, match=r"level1\.unknown"):
    config_lib.from_config_dict(cd)


def test_unknown_top_level_key():
  with pytest.raises(ValueError, match='bogus'):
    _build(lambda d: d.update(bogus=1))


@pytest.mark.parametrize('path,value', [
    (('train', 'steps'), 'abc'),
    (('mode',), 3),
    (('train', 'steps'), True),          # bool is not an int
    (('train', 'batch_size'), 2.0),       # float is not an int
    (('level1', 'recipe'), 1),
    (('overwrite',), 1),                  # int is not a bool
    (('train', 'lr'), '1e-3'),
    (('level1', 'auxk_weight'), 'x'),     # Optional[float]
])
def test_wrong_type_names_the_key(path, value):
  def mutate(d):
    node = d
    for p in path[:-1]:
      node = node[p]
    node[path[-1]] = value
  key = '.'.join(path)
  with pytest.raises(ValueError, match=repr(key).replace('.', r'\.')):
    _build(mutate)


def test_group_replaced_by_scalar_raises():
  with pytest.raises(ValueError, match='level1'):
    _build(lambda d: d.update(level1=3))


def test_int_for_float_is_accepted_and_converted():
  cfg = _build(lambda d: d['train'].update(lr=1))
  assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
  cfg = _build(lambda d: d['level1'].update(auxk_weight=0))
  assert cfg.level1.auxk_weight == 0.0 and isinstance(cfg.level1.auxk_weight, float)


def test_none_allowed_only_for_optional_fields():
  assert _build(lambda d: d['level1'].update(auxk_weight=None)).level1.auxk_weight is None
  with pytest.raises(ValueError, match=r"'train\.steps'"):
    _build(lambda d: d['train'].update(steps=None))


# ---- bad values ------------------------------------------------------------------------------

@pytest.mark.parametrize('mutate,key', [
    (lambda d: d.update(mode='foo'), 'mode'),
    (lambda d: d['joint'].update(stop_gradient='x'), 'joint.stop_gradient'),
    (lambda d: d['level1'].update(arch='x'), 'level1.arch'),
    (lambda d: d['level2'].update(recipe='x'), 'level2.recipe'),
    (lambda d: d['level1'].update(decoder_init='x'), 'level1.decoder_init'),
    (lambda d: d['train'].update(steps=0), 'train.steps'),
    (lambda d: d['train'].update(batch_size=-4), 'train.batch_size'),
    (lambda d: d['level1'].update(k_anneal_frac=1.0), 'level1.k_anneal_frac'),
    (lambda d: d['data']['synthetic'].update(p_parent=1.5), 'data.synthetic.p_parent'),
    (lambda d: d['data']['synthetic'].update(scene_cooccur=-0.1), 'data.synthetic.scene_cooccur'),
    (lambda d: d['data']['synthetic'].update(scene_size=3), 'data.synthetic.scene_size'),
    (lambda d: d['level2'].update(merge_z=-1.0), 'level2.merge_z'),
    (lambda d: d['level2'].update(merge_floor=0.9), 'level2.merge_floor'),
    (lambda d: d['level2'].update(merge_ratio=3.0), 'level2.merge_ratio'),
    (lambda d: d['level2'].update(oversplit=0.5), 'level2.oversplit'),
])
def test_bad_values_raise_naming_the_key(mutate, key):
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):
    _build(mutate)


def test_k_larger_than_dictionary():
  def mutate(d):
    d['level1'].update(n_latents=8, k=9)
  with pytest.raises(ValueError, match='larger than the dictionary'):
    _build(mutate)
  # k == n is allowed.
  cfg = _build(lambda d: d['level1'].update(n_latents=8, k=8))
  assert cfg.level1.k == 8


def test_joint_level2_start_must_be_before_end():
  def joint(start, steps=100):
    def mutate(d):
      d['mode'] = 'joint'
      d['train']['steps'] = steps
      d['joint']['level2_start'] = start
    return mutate
  for start in (100, 101):
    with pytest.raises(ValueError, match='joint.level2_start'):
      _build(joint(start))
  assert _build(joint(99)).joint.level2_start == 99
  assert _build(joint(0)).joint.level2_start == 0
  # Staged mode ignores level2_start.
  cfg = _build(lambda d: (d['train'].update(steps=100), d['joint'].update(level2_start=500)))
  assert cfg.mode == 'staged'


# ---- resolve ---------------------------------------------------------------------------------

def _default():
  return config_lib.from_config_dict(csae.get_config())


def test_resolve_user_data_auto_sizes():
  r = config_lib.resolve(_default(), d=64)
  assert r.level1.n_latents == 16 * 64
  assert r.level1.k == 6
  assert r.level2.n_latents == r.level1.n_latents // 2
  assert r.level2.k == 1
  assert r.level2.decoder_init == 'kmeans++'
  assert r.level1.decoder_init == 'random'
  # Every recipe field is filled (nothing left None after resolution).
  for sae in (r.level1, r.level2):
    for f in dataclasses.fields(sae):
      assert getattr(sae, f.name) is not None, f.name
  assert r.level1.k_aux == 32  # d // 2


def test_code_l1_is_a_level1_k_sparse_default():
  r = config_lib.resolve(_default(), d=64)
  assert r.level1.code_l1 == config_lib.DEFAULT_CODE_L1 > 0
  assert r.level2.code_l1 == 0.0  # level 2 codes decoder rows with k = 1: no tie to break
  for change, want in ((dict(recipe='reference'), 0.0), (dict(arch='relu_l1'), 0.0),
                       (dict(arch='batch_topk'), config_lib.DEFAULT_CODE_L1),
                       (dict(code_l1=0.2), 0.2)):
    cfg = _build(lambda d, change=change: d['level1'].update(**change))
    assert config_lib.resolve(cfg, d=64).level1.code_l1 == want, change
  with pytest.raises(ValueError, match='level1.code_l1'):
    _build(lambda d: d['level1'].update(code_l1=-1.0))


def test_sparse_step_auto_is_on_exactly_where_it_applies():
  """train.sparse_decode = None (the default) means the k-sparse step on CPU for TopK and
  BatchTopK with a fixed k and n1 >= SPARSE_AUTO_MIN_LATENTS on an unsharded latent axis outside
  sweeps, and the dense step elsewhere and on GPU / TPU; an explicit value is kept."""
  assert _default().train.sparse_decode is None
  cases = ((lambda d: None, True),
           (lambda d: d['level1'].update(arch='topk'), True),
           (lambda d: d['level1'].update(arch='batch_topk'), True),
           (lambda d: d['level1'].update(arch='relu_l1'), False),
           (lambda d: d['level1'].update(arch='matryoshka'), False),
           (lambda d: d['level1'].update(recipe='reference'), False),  # k annealing
           (lambda d: d['level1'].update(k_anneal_frac=0.05), False),
           (lambda d: d.update(mode='joint'), True),   # level 1's part of the joint step
           (lambda d: d.update(mode='compare'), True),  # the baselines' level 1 alike
           (lambda d: d.update(mode='sweep'), False),
           (lambda d: d['mesh'].update(model=2), False),
           (lambda d: d['train'].update(sparse_decode=False), False))
  big = lambda d: d['level1'].update(n_latents=config_lib.SPARSE_AUTO_MIN_LATENTS)
  small = config_lib.resolve(_build(lambda d: d['level1'].update(n_latents=4096)), d=64)
  assert config_lib.use_sparse_step(small, 'cpu') is False  # small dictionaries: the dense step
  for i, (mutate, want) in enumerate(cases):
    cfg = config_lib.resolve(_build(lambda d, mutate=mutate: (big(d), mutate(d))), d=64)
    assert config_lib.use_sparse_step(cfg, 'cpu') is want, i
    assert config_lib.use_sparse_step(cfg, 'gpu') is False, i
    assert config_lib.use_sparse_step(cfg, 'tpu') is False, i
  forced = config_lib.resolve(_build(lambda d: d['train'].update(sparse_decode=True)), d=64)
  assert config_lib.use_sparse_step(forced, 'gpu') is True


def test_resolve_explicit_sizes_kept():
  cfg = _build(lambda d: (d['level1'].update(n_latents=300, k=5),
                          d['level2'].update(n_latents=40, k=2)))
  r = config_lib.resolve(cfg, d=64)
  assert (r.level1.n_latents, r.level1.k) == (300, 5)
  assert (r.level2.n_latents, r.level2.k) == (40, 2)


def test_resolve_level2_auto_follows_explicit_level1():
  cfg = _build(lambda d: d['level1'].update(n_latents=300))
  r = config_lib.resolve(cfg, d=64)
  assert r.level1.n_latents == 300
  assert r.level2.n_latents == 150


def test_resolve_synthetic_sizes():
  cfg = _default()
  s = cfg.data.synthetic  # 16 parents x 4 children, p = 0.2
  atoms = s.n_parents * s.n_children
  r = config_lib.resolve(cfg, d=s.d, synthetic_atoms=atoms)
  assert r.level1.n_latents == 2 * atoms
  assert r.level1.k == 4  # ceil(16 * 0.2)
  assert r.level2.n_latents == 20  # 1.25 * 16


def test_recipes():
  ref = config_lib.resolve(_build(lambda d: d['level1'].update(recipe='reference')), d=64)
  assert ref.level1.auxk_weight == 0.0
  assert ref.level1.k_anneal_frac == pytest.approx(0.1)
  default = config_lib.resolve(_default(), d=64)
  assert default.level1.auxk_weight == pytest.approx(1 / 32)
  assert default.level1.k_anneal_frac == 0.0
  # An explicit field overrides the recipe's value.
  over = config_lib.resolve(
      _build(lambda d: d['level1'].update(recipe='reference', auxk_weight=0.5)), d=64)
  assert over.level1.auxk_weight == 0.5
  assert over.level1.k_anneal_frac == pytest.approx(0.1)


def test_resolve_k_above_n_raises():
  with pytest.raises(ValueError, match='larger than the dictionary'):
    config_lib.resolve(_build(lambda d: d['level1'].update(n_latents=4)), d=64)  # k auto = 6
  with pytest.raises(ValueError, match='level1.k'):
    config_lib.resolve(_build(lambda d: d['level1'].update(k=2000)), d=64)  # n auto = 1024


def test_resolve_level2_larger_than_level1_raises():
  cfg = _build(lambda d: (d['level1'].update(n_latents=100), d['level2'].update(n_latents=200)))
  with pytest.raises(ValueError, match='level2.n_latents'):
    config_lib.resolve(cfg, d=64)


# ---- stable_hash -----------------------------------------------------------------------------

def test_stable_hash_key_order_independent():
  a = {'x': 1, 'y': {'p': 2, 'q': [1, 2]}}
  b = {'y': {'q': [1, 2], 'p': 2}, 'x': 1}
  assert config_lib.stable_hash(a) == config_lib.stable_hash(b)
  assert config_lib.stable_hash(a) != config_lib.stable_hash({'x': 2, 'y': {'p': 2, 'q': [1, 2]}})
  assert config_lib.stable_hash(a) != config_lib.stable_hash({'x': 1, 'y': {'p': 2, 'q': [2, 1]}})


def test_stable_hash_of_configs():
  a, b = _default(), _default()
  assert config_lib.stable_hash(a) == config_lib.stable_hash(b)
  assert config_lib.stable_hash(a) == config_lib.stable_hash(config_lib.to_dict(a))
  c = _build(lambda d: d['train'].update(lr=1e-4))
  assert config_lib.stable_hash(a) != config_lib.stable_hash(c)
