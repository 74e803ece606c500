"""Frozen, validated configuration: the library boundary for ml_collections ConfigDicts.

Configs are written as ConfigDicts (experiments/configs/*.py, CLI overrides) and converted here
into frozen dataclasses. Every user mistake (unknown key, wrong type, bad value) raises a
`ValueError` that names the key and says how to fix it. Sizes left at 0 ("auto") are filled in
by `resolve` once the data dimension is known.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any

SAE_ARCHS = ('batch_topk', 'topk', 'relu_l1', 'jumprelu', 'matryoshka')
RECIPES = ('default', 'reference')
MODES = ('staged', 'joint', 'sweep', 'compare')
STOP_GRADIENTS = ('none', 'partial', 'bilateral')
LR_SCHEDULES = ('linear_decay', 'cosine', 'constant')
B_DEC_INITS = ('geometric_median', 'mean', 'zeros')
DECODER_INITS = ('random', 'data', 'kmeans++')


ACTIVE_COUNTS = ('bernoulli', 'poisson', 'fixed')


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  d: int = 128
  n_parents: int = 16
  n_children: int = 4
  # > n_children: unequal branching, parent i has a count drawn uniformly from
  # [n_children, n_children_max] (from the dictionary seed); 0 = every parent has n_children.
  n_children_max: int = 0
  child_parent_cos: float = 0.6
  # Cosine between the two parents of each consecutive pair (0, 1), (2, 3), ...: 0 = orthonormal.
  parent_corr: float = 0.0
  p_parent: float = 0.2
  # How many parents are active in a sample: 'bernoulli' (each independently with p_parent),
  # 'poisson' (Poisson(mean_active) many, capped at n_parents, chosen uniformly) or 'fixed'
  # (exactly round(mean_active)); mean_active 0 = n_parents * p_parent.
  active_count: str = 'bernoulli'
  mean_active: float = 0.0
  parent_emission: float = 0.0
  log_mag_mean: float = 0.0
  log_mag_std: float = 0.25
  noise_std: float = 0.02
  # > noise_std: anisotropic noise, per-dimension std spread evenly over [noise_std,
  # noise_std_max] in a random order of the dimensions; 0 = isotropic noise_std.
  noise_std_max: float = 0.0
  seed: int = 1234
  scene_size: int = 1
  scene_cooccur: float = 0.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
  path: str = ''
  holdout_rows: int = -1
  eval_rows: int = 32768
  synthetic: SyntheticConfig = SyntheticConfig()


@dataclasses.dataclass(frozen=True)
class SAEConfig:
  arch: str = 'topk'
  n_latents: int = 0
  k: int = 0
  recipe: str = 'default'
  auxk_weight: float | None = None
  k_aux: int = 0
  dead_tokens: int | None = None
  k_anneal_frac: float | None = None
  b_dec_init: str = 'geometric_median'
  decoder_init: str | None = None
  threshold_decay: float | None = None
  threshold_start: int | None = None
  l1_coeff: float = 0.1                 # relu_l1: weight of sum_i f_i ||d_i||
  # k-sparse level 1 (topk, batch_topk, matryoshka): L1 on the selected codes, relative to a
  # typical code (objective.code_l1_loss); None = the recipe's (level 2 and other archs: 0).
  code_l1: float | None = None
  sparsity_warmup_frac: float = 0.05    # relu_l1 / jumprelu: coefficient warmup
  jumprelu_bandwidth: float = 0.05      # jumprelu: STE rectangle width
  jumprelu_init_threshold: float = 0.1  # jumprelu: initial threshold (unit-norm inputs)
  l0_coeff: float = 1.0                 # jumprelu: weight of the L0 (or target-L0) loss
  target_l0: float = -1.0               # jumprelu: -1 = k, 0 = plain L0 penalty
  matryoshka_groups: str = ''           # matryoshka: comma-separated group sizes; '' = 2 halves
  # level-1 only: alive = fires on at least this fraction of held-out inputs
  alive_min_density: float = 1e-4
  # level-2 only (ignored at level 1)
  restarts: int = 1
  steps: int = 3000
  batch_size: int = 0
  lr: float = 1e-3
  assign_threshold: float = 1e-3
  # Level-2 concepts (cascade/concepts.py): the SAE trains oversplit x n_latents latents (at most
  # half the rows; 0 = half the rows, the most the merge can use: a small SAE puts correlated
  # concepts in one latent, which no merge undoes), then fragments of one concept are merged (cross / within similarity of their
  # members >= merge_ratio; 0 = no merging), rows move to the concept their members are most
  # similar to (refine), and at most n_latents concepts are kept (the most coherent).
  oversplit: float = 0.0
  merge_ratio: float = 0.7
  # merge_z > 0: pairs with merge_floor <= ratio < merge_ratio merge too, unless measurably
  # distinct: within similarity above cross by more than merge_z standard errors (then merged
  # last, only to meet n_latents). A parent that is its own level-1 feature (parent emission)
  # leaves fragments at ratio 0.6-0.7, as close as correlated parents (~0.6), which the z-test
  # tells apart by their many members. 0 = the ratio alone (merge_ratio).
  merge_z: float = 3.0
  merge_floor: float = 0.5
  refine: bool = True
  # Rows whose nearest other row is no closer than a random direction's nearest typically is
  # (this quantile of that cosine, merge.isolated_rows) join no concept; 0 = every row joins.
  isolate_q: float = 0.5
  # After the merge, a concept whose two halves (2-means) the merge would keep apart is split
  # (merge.split_labels): a level-2 latent can hold two correlated concepts.
  split: bool = True
  # Rows whose level-1 feature's mean code (when it fires, x its decoder norm) is below this
  # fraction of the median row's join no concept (concepts.weak_rows); 0 = every row joins.
  weak_code_frac: float = 0.2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 4000
  batch_size: int = 1024
  lr: float = 0.0  # 0 = auto_lr(level1.n_latents)
  seed: int = 0
  warmup_steps: int = 100
  decay_start: float = 0.8
  lr_schedule: str = 'linear_decay'
  compute_dtype: str = 'float32'
  # The k-sparse level-1 step (saes/sparse.py). None = auto (`use_sparse_step`): on CPU where it
  # applies (TopK or BatchTopK level 1 with a fixed k, n1 >= 16384, any mode but sweep,
  # latents not sharded), off elsewhere. True where it does not apply is an error, False: the dense step.
  sparse_decode: bool | None = None
  grad_clip: float = 1.0
  log_every: int = 25
  checkpoint_every: int = 500
  keep_checkpoints: int = 2


@dataclasses.dataclass(frozen=True)
class JointConfig:
  alpha: float = 0.1
  level2_start: int = 2000
  stop_gradient: str = 'none'


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """mode='sweep': level-1 SAEs for every combination, trained together in one vmapped step.
  Comma-separated values; empty = the single value of the base config.
  level=2: level-2 SAEs (seeds, lr = level2.lr, n2 = level2.n_latents) on the decoder rows of
  this config's level 1, trained once (stage 'level1'), in one vmapped step."""
  level: int = 1
  seeds: str = ''
  lr: str = ''
  k: str = ''
  l1_coeff: str = ''
  l0_coeff: str = ''
  n2: str = ''


COMPARE_FAMILIES = ('csae', 'joint', 'stop_gradient', 'flat', 'matryoshka', 'stacked',
                    'clustering', 'reference', 'oracle')


@dataclasses.dataclass(frozen=True)
class CompareConfig:
  """mode='compare': every method on the same activations, n1, n2 and budget (issue 4)."""
  methods: str = ','.join(COMPARE_FAMILIES)
  seeds: str = ''                   # comma-separated train seeds; '' = train.seed only
  alphas: str = '1.0,0.1'           # joint CSAE (no stop-gradient) alpha sweep
  ablation_alpha: float = 1.0       # alpha of the partial / bilateral stop-gradient runs
  baseline_k: int = 0               # k of the flat n2 SAE and the stacked SAE; 0 = level1.k
  n_perm: int = 200                 # random partitions in each HMS / taxonomy null
  null_seed: int = 0
  embeddings: str = ''              # real data: [n_images, e] .npy reference embeddings
  embedding_model: str = ''         # real data: or a vision port's (registry name); '' = none
  embedding_model_path: str = ''    # its local checkpoint folder
  embedding_site: str = ''          # its site; '' = the port's embedding site
  embedding_pool: str = 'mean'      # tokens -> one vector per image: mean | cls
  taxonomy: str = ''                # real data: json {fine label: coarse label}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1
  model: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
  mode: str = 'staged'
  overwrite: bool = False
  stability: bool = False   # staged / joint: train a second seed, report stability/* (ARI)
  data: DataConfig = DataConfig()
  level1: SAEConfig = SAEConfig()
  level2: SAEConfig = SAEConfig(arch='topk', k=1)
  train: TrainConfig = TrainConfig()
  joint: JointConfig = JointConfig()
  sweep: SweepConfig = SweepConfig()
  compare: CompareConfig = CompareConfig()
  mesh: MeshConfig = MeshConfig()


def _check_type(key: str, value: Any, annotation: Any) -> Any:
  """Coerces `value` to the annotated type or raises a ValueError naming `key`."""
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(annotation)
    if value is None and type(None) in args:
      return None
    (annotation,) = [a for a in args if a is not type(None)]
  if annotation is bool:
    if isinstance(value, bool):
      return value
  elif annotation is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  elif annotation is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
  elif annotation is str:
    if isinstance(value, str):
      return value
  raise ValueError(
      f'config key {key!r} must be of type {annotation.__name__}, got {value!r} '
      f'({type(value).__name__}); set e.g. --config.{key}=<{annotation.__name__}>')


def _build(cls: type, values: Any, prefix: str) -> Any:
  if hasattr(values, 'to_dict'):
    values = values.to_dict()
  if not isinstance(values, dict):
    raise ValueError(f'config key {prefix.rstrip(".")!r} must be a group of fields, got {values!r}')
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ValueError(
        f'unknown config key(s) {[prefix + u for u in unknown]}; known keys under '
        f'{prefix.rstrip(".") or "the root"}: {sorted(names)}')
  kwargs = {}
  for name, value in values.items():
    key = prefix + name
    hint = hints[name]
    if dataclasses.is_dataclass(hint):
      kwargs[name] = _build(hint, value, key + '.')
    else:
      kwargs[name] = _check_type(key, value, hint)
  return cls(**kwargs)


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f'config key {key!r} is {value!r}; choose one of {list(allowed)}')


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
  if value < 0 or (value == 0 and not allow_zero):
    raise ValueError(f'config key {key!r} must be {">= 0" if allow_zero else "> 0"}, got {value}')


def _validate_sae(key: str, sae: SAEConfig) -> None:
  _one_of(f'{key}.arch', sae.arch, SAE_ARCHS)
  _one_of(f'{key}.recipe', sae.recipe, RECIPES)
  _one_of(f'{key}.b_dec_init', sae.b_dec_init, B_DEC_INITS)
  if sae.decoder_init is not None:
    _one_of(f'{key}.decoder_init', sae.decoder_init, DECODER_INITS)
  for name in ('n_latents', 'k', 'k_aux', 'batch_size'):
    _positive(f'{key}.{name}', getattr(sae, name), allow_zero=True)
  _positive(f'{key}.steps', sae.steps)
  _positive(f'{key}.restarts', sae.restarts)
  if sae.code_l1 is not None:
    _positive(f'{key}.code_l1', sae.code_l1, allow_zero=True)
  if not 0 <= sae.weak_code_frac < 1:
    raise ValueError(f'config key {key}.weak_code_frac = {sae.weak_code_frac} must be in [0, 1) '
                     '(0 = off)')
  if sae.oversplit != 0 and sae.oversplit < 1:
    raise ValueError(f'config key {key}.oversplit must be 0 (auto: half the rows) or >= 1 (1: '
                     f'train exactly n_latents level-2 latents), got {sae.oversplit}')
  if sae.merge_z < 0:
    raise ValueError(f'config key {key}.merge_z must be >= 0 (0: merge by the ratio alone; ~3: '
                     f'keep measurably distinct concepts apart), got {sae.merge_z}')
  if sae.merge_z and sae.merge_ratio and not 0 <= sae.merge_floor <= sae.merge_ratio:
    raise ValueError(f'config key {key}.merge_floor must be in [0, merge_ratio = '
                     f'{sae.merge_ratio}] (the z-tested band below merge_ratio), got '
                     f'{sae.merge_floor}')
  if not 0 <= sae.merge_ratio <= 2:
    raise ValueError(f'config key {key}.merge_ratio must be in [0, 2] (0: no merging; ~0.7: '
                     f'merge fragments of one concept), got {sae.merge_ratio}')
  if not 0 <= sae.alive_min_density < 1:
    raise ValueError(f'config key {key}.alive_min_density must be in [0, 1)')
  _positive(f'{key}.lr', sae.lr)
  if sae.k_anneal_frac is not None and not 0 <= sae.k_anneal_frac < 1:
    raise ValueError(f'config key {key}.k_anneal_frac must be in [0, 1), got {sae.k_anneal_frac}')
  if sae.threshold_decay is not None and not 0 < sae.threshold_decay < 1:
    raise ValueError(f'config key {key}.threshold_decay must be in (0, 1)')
  if sae.n_latents and sae.k and sae.k > sae.n_latents:
    raise ValueError(
        f'{key}.k = {sae.k} is larger than the dictionary ({key}.n_latents = {sae.n_latents}); '
        f'set {key}.k <= {sae.n_latents} (typically a few percent of it)')


def validate(cfg: Config) -> Config:
  _one_of('mode', cfg.mode, MODES)
  _one_of('joint.stop_gradient', cfg.joint.stop_gradient, STOP_GRADIENTS)
  _validate_sae('level1', cfg.level1)
  _validate_sae('level2', cfg.level2)
  t = cfg.train
  for name in ('steps', 'batch_size', 'log_every', 'checkpoint_every', 'keep_checkpoints'):
    _positive(f'train.{name}', getattr(t, name))
  _positive('train.lr', t.lr, allow_zero=True)  # 0: auto_lr(n1)
  _positive('train.warmup_steps', t.warmup_steps, allow_zero=True)
  _one_of('train.lr_schedule', t.lr_schedule, LR_SCHEDULES)
  _one_of('train.compute_dtype', t.compute_dtype, ('float32', 'bfloat16'))
  for name in ('seeds', 'lr', 'k', 'l1_coeff', 'l0_coeff', 'n2'):
    sweep_values(cfg.sweep, name)  # parses, or says which key is malformed
  _one_of('sweep.level', cfg.sweep.level, (1, 2))
  level_axes = {1: ('k', 'l1_coeff', 'l0_coeff'), 2: ('n2',)}[3 - cfg.sweep.level]
  for name in level_axes:  # axes of the other level
    if getattr(cfg.sweep, name).strip():
      raise ValueError(f'config key sweep.{name} does not apply to sweep.level = '
                       f'{cfg.sweep.level}; sweep.level=1 sweeps seeds, lr, k, l1_coeff, '
                       f'l0_coeff; sweep.level=2 sweeps seeds, lr, n2')
  if t.sparse_decode and (cfg.level1.arch not in ('topk', 'batch_topk', 'matryoshka')
                          or (cfg.level1.k_anneal_frac or 0) > 0 or cfg.mode == 'sweep'
                          or (cfg.mode == 'joint' and cfg.level1.arch == 'matryoshka')):
    raise ValueError('train.sparse_decode needs a k-sparse level1.arch (topk, batch_topk; '
                     'matryoshka outside joint mode) with a fixed k (no k_anneal_frac), not in '
                     'mode=sweep (k is traced per SAE); set --config.train.sparse_decode=False')
  if t.sparse_decode and cfg.mesh.model > 1:
    # its lax.top_k and row gathers on the latent axis make XLA gather [batch, n_latents] and the
    # whole decoder on every device (tests/train/test_latent_sharding.py); the dense step's
    # bisection selection shards instead
    raise ValueError(f'train.sparse_decode does not shard the latent axis (mesh.model = '
                     f'{cfg.mesh.model}); set --config.train.sparse_decode=False or '
                     f'--config.mesh.model=1')
  if not 0 < t.decay_start <= 1:
    raise ValueError(f'config key train.decay_start must be in (0, 1], got {t.decay_start}')
  _positive('joint.alpha', cfg.joint.alpha, allow_zero=True)
  if cfg.mode == 'joint' and not 0 <= cfg.joint.level2_start < t.steps:
    raise ValueError(
        f'joint.level2_start = {cfg.joint.level2_start} must be in [0, train.steps = {t.steps})')
  c = cfg.compare
  for fam in compare_families(c):
    _one_of('compare.methods', fam, COMPARE_FAMILIES)
  for a in _floats('compare.alphas', c.alphas):
    _positive('compare.alphas', a)
  _positive('compare.n_perm', c.n_perm)
  _positive('compare.baseline_k', c.baseline_k, allow_zero=True)
  if cfg.mode == 'compare' and not cfg.data.path and (c.embeddings or c.taxonomy
                                                       or c.embedding_model):
    raise ValueError('compare.embeddings / embedding_model / taxonomy describe the images of '
                     'real data; set --config.data.path to a harvested activations folder '
                     '(synthetic data uses its ground truth as the embedding)')
  if c.embeddings and c.embedding_model:
    raise ValueError('compare.embeddings and compare.embedding_model both give the reference '
                     'embeddings; keep one (--config.compare.embeddings= or '
                     '--config.compare.embedding_model=)')
  _one_of('compare.embedding_pool', c.embedding_pool, ('mean', 'cls'))
  if c.embedding_model:
    from csae_jax.vlms import registry  # pylint: disable=g-import-not-at-top
    try:
      registry.resolve(c.embedding_model)
    except ValueError as e:
      raise ValueError(f'compare.embedding_model: {e}') from e
    if not c.embedding_model_path:
      raise ValueError('compare.embedding_model needs its checkpoint folder: set '
                       '--config.compare.embedding_model_path=DIR')
  validate_synthetic(cfg.data.synthetic)
  if cfg.mesh.model < 1 or (cfg.mesh.data < 1 and cfg.mesh.data != -1):
    raise ValueError('mesh.data must be >= 1 or -1 (all devices), mesh.model >= 1')
  return cfg


def mean_active_parents(s: SyntheticConfig) -> float:
  """Expected number of active parents per sample (scenes keep the marginals)."""
  if s.active_count == 'bernoulli':
    return s.n_parents * s.p_parent
  mean = min(s.mean_active or s.n_parents * s.p_parent, s.n_parents)
  return float(round(mean)) if s.active_count == 'fixed' else mean


def validate_synthetic(s: SyntheticConfig, key: str = 'data.synthetic') -> SyntheticConfig:
  for name in ('d', 'n_parents', 'n_children', 'scene_size'):
    _positive(f'{key}.{name}', getattr(s, name))
  if s.n_children_max and s.n_children_max < s.n_children:
    raise ValueError(f'{key}.n_children_max = {s.n_children_max} must be 0 (equal branching) '
                     f'or >= {key}.n_children = {s.n_children}')
  if not 0 <= s.parent_corr < 1:
    raise ValueError(f'{key}.parent_corr must be in [0, 1), got {s.parent_corr}')
  _one_of(f'{key}.active_count', s.active_count, ACTIVE_COUNTS)
  _positive(f'{key}.mean_active', s.mean_active, allow_zero=True)
  if s.active_count != 'bernoulli' and (s.mean_active or s.n_parents * s.p_parent) > s.n_parents:
    raise ValueError(f'{key}.mean_active = {s.mean_active} exceeds {key}.n_parents = '
                     f'{s.n_parents}')
  for name in ('noise_std', 'noise_std_max', 'log_mag_std'):
    _positive(f'{key}.{name}', getattr(s, name), allow_zero=True)
  if s.noise_std_max and s.noise_std_max < s.noise_std:
    raise ValueError(f'{key}.noise_std_max = {s.noise_std_max} must be 0 (isotropic) or >= '
                     f'{key}.noise_std = {s.noise_std}')
  if s.n_parents % s.scene_size:
    raise ValueError(f'{key}.scene_size = {s.scene_size} must divide {key}.'
                     f'n_parents = {s.n_parents} (scenes are consecutive groups of parents)')
  if not 0 <= s.child_parent_cos <= 1:
    raise ValueError(f'{key}.child_parent_cos must be in [0, 1]')
  for name in ('p_parent', 'parent_emission', 'scene_cooccur'):
    if not 0 <= getattr(s, name) <= 1:
      raise ValueError(f'{key}.{name} must be a probability in [0, 1]')
  return s


def from_config_dict(cd: Any) -> Config:
  """ConfigDict (or dict) -> validated frozen Config."""
  return validate(_build(Config, cd, ''))


# Level 1's code L1 (objective.code_l1_loss), chosen on the robustness suite (README).
DEFAULT_CODE_L1 = 0.075
K_SPARSE_ARCHS = ('topk', 'batch_topk', 'matryoshka')

# Recipe values for the fields left at None. 'reference' is the paper's code (PAPER.md).
_RECIPE_DEFAULTS = {
    'default': dict(auxk_weight=1 / 32, dead_tokens=None, k_anneal_frac=0.0,
                    decoder_init=None, threshold_start=None, code_l1=DEFAULT_CODE_L1),
    'reference': dict(auxk_weight=0.0, dead_tokens=None, k_anneal_frac=0.1,
                      decoder_init='random', threshold_start=1000, code_l1=0.0),
}


def resolve_sae(sae: SAEConfig, *, d: int, n_latents: int, k: int, steps: int,
                batch_size: int, key: str) -> SAEConfig:
  """Fills every auto / recipe field of one SAE config for inputs of dimension d."""
  n = sae.n_latents or n_latents
  kk = sae.k or k
  if kk > n:
    raise ValueError(f'{key}.k = {kk} is larger than the dictionary ({key}.n_latents = {n}); '
                     f'lower {key}.k or raise {key}.n_latents')
  fill = dict(_RECIPE_DEFAULTS[sae.recipe])
  # Dead after ~ 1/10 of training's inputs without firing, at least 4 batches' worth.
  fill['dead_tokens'] = max(4 * batch_size, steps * batch_size // 10)
  fill['threshold_start'] = start = min(fill['threshold_start'] or steps // 10, steps // 2)
  if sae.threshold_start is not None:
    start = sae.threshold_start
  fill['threshold_decay'] = min(0.999, 1 - 5 / max(steps - start, 10))
  # Level 2 (inputs: decoder rows) starts from k-means++ seeds: measured, it avoids the merged
  # groups a k=1 SAE gets stuck in; level 1 starts from random directions.
  fill['decoder_init'] = fill['decoder_init'] or ('kmeans++' if key == 'level2' else 'random')
  # Level 2's inputs are decoder rows coded by k = 1: the tie the code L1 breaks (a feature
  # coded as a co-firing parent plus a residual) is a level-1 matter.
  if key != 'level1' or sae.arch not in K_SPARSE_ARCHS:
    fill['code_l1'] = 0.0
  changes = {f: v for f, v in fill.items() if getattr(sae, f) is None}
  if sae.arch == 'matryoshka':
    groups = matryoshka_groups(sae.matryoshka_groups, n)
    if sum(groups) != n or min(groups) < 1:
      raise ValueError(f'{key}.matryoshka_groups = {sae.matryoshka_groups!r} must be positive '
                       f'sizes summing to {key}.n_latents = {n}, e.g. "{n // 2},{n - n // 2}"')
  return dataclasses.replace(sae, n_latents=n, k=kk, k_aux=sae.k_aux or max(1, min(n, d // 2)),
                             **changes)


def compare_families(c: CompareConfig) -> list[str]:
  return [m.strip() for m in c.methods.split(',') if m.strip()]


def _floats(key: str, spec: str) -> list[float]:
  try:
    return [float(v) for v in spec.split(',') if v.strip()]
  except ValueError as e:
    raise ValueError(f'config key {key} = {spec!r} must be comma-separated numbers, '
                     f'e.g. --config.{key}=1,0.1') from e


def compare_seeds(c: CompareConfig) -> list[int]:
  values = _floats('compare.seeds', c.seeds)
  if any(v != int(v) for v in values):
    raise ValueError(f'config key compare.seeds = {c.seeds!r} must hold integers, e.g. 0,1,2')
  return [int(v) for v in values]


def compare_alphas(c: CompareConfig) -> list[float]:
  return _floats('compare.alphas', c.alphas)


def sweep_values(sweep: SweepConfig, name: str) -> list[float]:
  """The values of one sweep axis ([] when the axis is not swept)."""
  spec = getattr(sweep, name).strip()
  if not spec:
    return []
  try:
    values = [float(v) for v in spec.split(',')]
  except ValueError as e:
    raise ValueError(f'config key sweep.{name} = {spec!r} must be comma-separated numbers, '
                     f'e.g. --config.sweep.{name}=1,2,3') from e
  if name in ('seeds', 'k', 'n2') and any(v != int(v) for v in values):
    raise ValueError(f'config key sweep.{name} = {spec!r} must hold integers')
  return values


def matryoshka_groups(spec: str, n: int) -> tuple[int, ...]:
  """'a,b,c' -> (a, b, c); '' -> two halves (the CSAE paper's [n2, n1 - n2] with n2 = n1 / 2)."""
  if not spec.strip():
    return (n // 2, n - n // 2)
  try:
    return tuple(int(v) for v in spec.split(','))
  except ValueError as e:
    raise ValueError(f'matryoshka_groups must be comma-separated integers, got {spec!r}') from e


# sparsify's rule (EleutherAI): 2e-4 at 2^14 latents, scaled by 1 / sqrt(n) (larger dictionaries
# get smaller steps: every latent's gradient comes from fewer inputs).
AUTO_LR_BASE, AUTO_LR_LATENTS = 2e-4, 2 ** 14


def auto_lr(n_latents: int) -> float:
  """The default level-1 learning rate: 2e-4 * sqrt(2^14 / n1) (2.3e-3 at n1 = 128, 1.1e-3 at
  512, 1.8e-4 at 20,000, where the paper uses 1e-4)."""
  return AUTO_LR_BASE * (AUTO_LR_LATENTS / n_latents) ** 0.5


def resolve(cfg: Config, *, d: int, synthetic_atoms: int | None = None) -> Config:
  """Fills the auto sizes once the data dimension d is known.

  Synthetic data: n1 = 2x the number of true atoms, k1 = expected active atoms (rounded up),
  n2 = 1.25x the number of true parents: a few spare latents, as a user who does not know K
  would have (TopK level 2, seed 0, ARI: 1x 1.00, 1.25x 0.92, 1.5x 0.82, 2x 0.62). User data:
  the paper's ratios scaled to d (the release uses d = 1024, n1 = 20,000 ~ 20 d, k1 = 6,
  n2 = n1 / 2, k2 = 1): n1 = 16 d, k1 = 6, n2 = n1/2.
  """
  s = cfg.data.synthetic
  if synthetic_atoms is not None:
    n1_auto = 2 * synthetic_atoms
    expected_active = mean_active_parents(s) * (1 + s.parent_emission)
    k1_auto = max(1, int(-(-expected_active // 1)))
    n2_auto = s.n_parents + -(-s.n_parents // 4)  # 1.25 K: room for a few non-child atoms
  else:
    n1_auto, k1_auto = 16 * d, 6
    n2_auto = (cfg.level1.n_latents or n1_auto) // 2
  t = cfg.train
  level1 = resolve_sae(cfg.level1, d=d, n_latents=n1_auto, k=k1_auto, steps=t.steps,
                       batch_size=t.batch_size, key='level1')
  n2_auto = n2_auto if synthetic_atoms is not None else level1.n_latents // 2
  level2_steps = t.steps - cfg.joint.level2_start if cfg.mode == 'joint' else cfg.level2.steps
  level2 = resolve_sae(cfg.level2, d=d, n_latents=n2_auto, k=1, steps=level2_steps,
                       batch_size=cfg.level2.batch_size or level1.n_latents, key='level2')
  if level2.n_latents > level1.n_latents:
    raise ValueError(f'level2.n_latents = {level2.n_latents} exceeds level1.n_latents = '
                     f'{level1.n_latents}: level 2 groups level-1 features, make it smaller')
  train = t if t.lr else dataclasses.replace(t, lr=auto_lr(level1.n_latents))
  return dataclasses.replace(cfg, level1=level1, level2=level2, train=train)


def sparse_step_applies(cfg: Config) -> bool:
  """Whether the k-sparse level-1 step can run: TopK or BatchTopK with a fixed k, latents not
  sharded, any mode but a sweep (k is traced per SAE there). In joint mode it is level 1's part
  of the step (level 2 on the live rows stays dense); in compare mode every level 1 (CSAE's and
  the baselines') takes the same step, so the methods differ by method only."""
  return (cfg.level1.arch in ('topk', 'batch_topk') and not (cfg.level1.k_anneal_frac or 0) > 0
          and cfg.mode != 'sweep' and cfg.mesh.model == 1)


def use_sparse_step(cfg: Config, backend: str) -> bool:
  """train.sparse_decode resolved on the backend that trains (None = auto: the k-sparse step where
  it applies on CPU, where it measured 1.0-5x the dense step's speed (README "Training speed",
  `benchmarks/results/train_throughput_*_cpu.md`; about equal only with every latent dead at
  d 256, n 4096); off on GPU / TPU, where the dense step's
  GEMMs won (H200: 11.8 ms dense vs 21.7 ms sparse per step, README "GPUs and TPUs"). Resolved
  at the stage, not in `resolve`: the backend is known only once jax (and jax.distributed) is up,
  and the config's fingerprint stays the same on every backend."""
  if cfg.train.sparse_decode is not None:
    return cfg.train.sparse_decode
  return (backend == 'cpu' and sparse_step_applies(cfg)
          and cfg.level1.n_latents >= SPARSE_AUTO_MIN_LATENTS)


# Auto turns the k-sparse step on from this dictionary size: where it was measured (n 16384 and
# 20000: 1.5-5x the dense step). Below, it gains little (n 4096: 1.0-1.9x, d 256) and its other
# float summation order moved the robustness suite (n1 100-400): seed 0 all families, the sparse
# step by default: noise_anisotropic's CSAE ARI at n2 = K fell 0.978 -> 0.893 (the only run < 0.9,
# level 1 still 100% everywhere), so small dictionaries keep the dense step the suite validated.
SPARSE_AUTO_MIN_LATENTS = 16384


def to_dict(cfg: Any) -> dict:
  return dataclasses.asdict(cfg)


def stable_hash(obj: Any) -> str:
  """Hash of a json-able object (or dataclass), independent of key order."""
  if dataclasses.is_dataclass(obj):
    obj = dataclasses.asdict(obj)
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ---- harvesting (experiments/configs/harvest.py) ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HarvestConfig:
  """stage='harvest': activations of a VLM's named sites, from images, in the export format."""
  stage: str = 'harvest'
  model: str = 'qwen3-vl'          # a port ('qwen3-vl') or a registry name (csae_jax.vlms.registry)
  model_path: str = ''             # local HF checkpoint folder (config.json, *.safetensors, ...)
  images: str = ''                 # image folder, or 'tfds:NAME' (prepared under data_dir)
  data_dir: str = ''               # TFDS data_dir (nothing is downloaded)
  split: str = 'train'             # TFDS split
  sites: str = ''                  # comma-separated site names; '' = the model's default site
  image_size: int = 0              # images resized to image_size^2; 0 = the port's default
                                   # (Qwen3-VL: 256, the paper; Gemma-3: its checkpoint's size)
  prompt: str = 'Describe the image content accurately.'
  all_tokens: bool = False         # text sites: every token, not only the image tokens
  batch_size: int = 8              # images per forward
  workers: int = 0                 # preprocessing processes (0: in the main process)
  chunk_images: int = 256          # images per shard (the unit of resumption)
  max_images: int = 0              # 0 = all
  dtype: str = 'float32'           # compute dtype of the model: float32 | bfloat16
  store_dtype: str = 'float32'     # dtype of the saved activations: float32 | float16
  overwrite: bool = False
  mesh: MeshConfig = MeshConfig()


def harvest_from_config_dict(cd: Any) -> HarvestConfig:
  cfg = _build(HarvestConfig, cd, '')
  for key in ('model_path', 'images'):
    if not getattr(cfg, key):
      raise ValueError(f'config key {key!r} is required for harvesting; set --config.{key}=...')
  for key in ('batch_size', 'chunk_images'):
    _positive(key, getattr(cfg, key))
  _positive('image_size', cfg.image_size, allow_zero=True)
  _positive('max_images', cfg.max_images, allow_zero=True)
  _positive('workers', cfg.workers, allow_zero=True)
  if cfg.chunk_images % cfg.batch_size:
    raise ValueError(f'chunk_images = {cfg.chunk_images} must be a multiple of batch_size = '
                     f'{cfg.batch_size}')
  _one_of('dtype', cfg.dtype, ('float32', 'bfloat16'))
  _one_of('store_dtype', cfg.store_dtype, ('float32', 'float16'))
  return cfg


# ---- steering (experiments/configs/steer.py) ----------------------------------------------------

STEER_MODES = ('clamp', 'clamp_error', 'add', 'ablate')
STEER_ARMS = ('none', 'random', 'single', 'matryoshka', 'concept')


@dataclasses.dataclass(frozen=True)
class SteerConfig:
  """stage='steer': group-level concept steering of a VLM's captions (the paper's protocol)."""
  stage: str = 'steer'
  model: str = 'qwen3-vl'          # a port or a registry name (csae_jax.vlms.registry)
  model_path: str = ''             # local HF checkpoint folder (weights, tokenizer, processor)
  images: str = ''                 # the harvested image folder (or 'tfds:NAME' with data_dir)
  data_dir: str = ''
  split: str = 'train'
  export: str = ''                 # a CSAE export/ folder (level1_sae.npz, hierarchy.json)
  harvest: str = ''                # harvest site folder; '' = the export run's level-1 data.path
  matryoshka_export: str = ''      # a Matryoshka baseline export (compare: matryoshka_cosine)
  site: str = ''                   # '' = the harvest's site
  concepts: str = ''               # comma-separated concept ids; '' = sample n_concepts
  n_concepts: int = 10
  min_members: int = 2             # concepts with fewer level-1 members are not sampled
  images_per_concept: int = 100
  top_frac: float = 0.5            # of a concept's images, this fraction are its top images
  arms: str = ''                   # '' = none,random,single,[matryoshka,]concept
  value: float = 0.0               # > 0: clamp magnitude V for every arm (+V insert, -V suppress)
  s: float = 3.0                   # value = s * u (the paper's per-concept scale) when value = 0
  mode: str = 'clamp'              # clamp | clamp_error | add | ablate
  direction: str = 'members'       # add: unit sum of member rows | level2 (the concept's row)
  positions: str = ''              # '' = every token; 'image' = image tokens; or token indices
  max_new_tokens: int = 30
  prompt: str = 'Describe what is in this image in one short sentence.'
  image_size: int = 0              # 0 = the harvest's
  batch_size: int = 8              # images per generate call
  suppress_on: str = 'present'     # present (unsteered caption shows it) | all
  judge: str = 'lexical'           # lexical | vlm
  judge_model: str = ''            # vlm judge: port / registry name
  judge_model_path: str = ''
  label_hierarchy: str = ''        # json {label: parent} or {label: [synonyms]} (lexical judge)
  label_min_frac: float = 0.3      # labels covering this share of the top images name the concept
  seed: int = 0
  dtype: str = 'float32'
  overwrite: bool = False
  mesh: MeshConfig = MeshConfig()


def steer_from_config_dict(cd: Any) -> SteerConfig:
  cfg = _build(SteerConfig, cd, '')
  for key in ('model_path', 'images', 'export'):
    if not getattr(cfg, key):
      raise ValueError(f'config key {key!r} is required for steering; set --config.{key}=...')
  for key in ('n_concepts', 'images_per_concept', 'max_new_tokens', 'batch_size', 'min_members'):
    _positive(key, getattr(cfg, key))
  _positive('value', cfg.value, allow_zero=True)
  _positive('s', cfg.s)
  _positive('image_size', cfg.image_size, allow_zero=True)
  if not 0 <= cfg.top_frac <= 1 or not 0 < cfg.label_min_frac <= 1:
    raise ValueError('config keys top_frac must be in [0, 1] and label_min_frac in (0, 1]')
  _one_of('mode', cfg.mode, STEER_MODES)
  _one_of('direction', cfg.direction, ('members', 'level2'))
  _one_of('suppress_on', cfg.suppress_on, ('present', 'all'))
  _one_of('judge', cfg.judge, ('lexical', 'vlm'))
  _one_of('dtype', cfg.dtype, ('float32', 'bfloat16'))
  for arm in steer_arms(cfg):
    _one_of('arms', arm, STEER_ARMS)
  if 'matryoshka' in steer_arms(cfg) and not cfg.matryoshka_export:
    raise ValueError('arm "matryoshka" needs --config.matryoshka_export=DIR (a Matryoshka '
                     'baseline export, e.g. WD/matryoshka_cosine/export of mode=compare)')
  if cfg.judge == 'vlm' and not (cfg.judge_model and cfg.judge_model_path):
    raise ValueError('judge=vlm needs --config.judge_model=NAME and --config.judge_model_path=DIR')
  steer_concepts(cfg)
  return cfg


def steer_arms(cfg: SteerConfig) -> list[str]:
  if not cfg.arms.strip():
    return ['none', 'random', 'single'] + (['matryoshka'] if cfg.matryoshka_export else []) + [
        'concept']
  arms = [a.strip() for a in cfg.arms.split(',') if a.strip()]
  if len(set(arms)) != len(arms):
    raise ValueError(f'config key arms = {cfg.arms!r} names an arm twice')
  return arms


def steer_concepts(cfg: SteerConfig) -> list[int]:
  try:
    return [int(c) for c in cfg.concepts.split(',') if c.strip()]
  except ValueError as e:
    raise ValueError(f'config key concepts = {cfg.concepts!r} must be comma-separated concept '
                     'ids, e.g. --config.concepts=12,40') from e


@dataclasses.dataclass(frozen=True)
class SteerSyntheticConfig:
  """stage='steer_synthetic': the steering benchmark on the synthetic hierarchy."""
  stage: str = 'steer_synthetic'
  seeds: str = '0,1,2'
  modes: str = 'clamp,clamp_error'
  arms: str = 'none,random,single,matryoshka,concept'
  s: float = 3.0
  value: float = 0.0
  steps: int = 4000                # level-1 (and Matryoshka) training steps
  level2_steps: int = 3000
  n_eval: int = 4096               # held-out samples steered
  n_readout: int = 32768           # readout training samples
  min_members: int = 2
  overwrite: bool = False


def steer_synthetic_from_config_dict(cd: Any) -> SteerSyntheticConfig:
  cfg = _build(SteerSyntheticConfig, cd, '')
  for key in ('steps', 'level2_steps', 'n_eval', 'n_readout', 'min_members', 's'):
    _positive(key, getattr(cfg, key))
  _positive('value', cfg.value, allow_zero=True)
  for m in cfg.modes.split(','):
    _one_of('modes', m.strip(), STEER_MODES)
  for a in cfg.arms.split(','):
    _one_of('arms', a.strip(), STEER_ARMS)
  compare_seeds(CompareConfig(seeds=cfg.seeds))  # parses, or names the key
  return cfg


# ---- report (experiments/configs/report.py) -----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ReportConfig:
  """stage='report': re-render <workdir_in>/report/index.html of a finished run, no training."""
  stage: str = 'report'
  workdir_in: str = ''             # the --workdir of a finished pipeline or compare run
  top_images: int = 8              # harvested data: top-activating images per feature / concept
  max_images: int = 0              # harvested data: images scanned for them; 0 = all
  page_size: int = 100             # concepts built as DOM at a time
  images: bool = True              # False: no image panels (skips the pass over the harvest)


def report_from_config_dict(cd: Any) -> ReportConfig:
  cfg = _build(ReportConfig, cd, '')
  if not cfg.workdir_in:
    raise ValueError("config key 'workdir_in' is required for the report; set "
                     "--config.workdir_in=WD (the --workdir of a finished run)")
  _positive('top_images', cfg.top_images)
  _positive('page_size', cfg.page_size)
  _positive('max_images', cfg.max_images, allow_zero=True)
  return cfg
