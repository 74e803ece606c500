"""What every training stage shares: the data source, the mesh, SAE initialisation, the
optimiser and the orbax stage with its manifest.

Nothing here knows about modes: `cascade/` (level 1, staged level 2, joint), `compare/` and
`sweep.py` build on these pieces, and `modes.py` dispatches between them.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import sklearn.cluster
from absl import logging

from csae_jax import checkpoint as ckpt_lib
from csae_jax import config as config_lib
from csae_jax import sharding
from csae_jax.saes import common, get_arch, objective
from csae_jax.sources import arrays, synthetic
from csae_jax.train import optim
from csae_jax.train import step as step_lib

EVAL_BATCH = 4096


def make_source(cfg: config_lib.Config):
  kw = dict(batch_size=cfg.train.batch_size, seed=cfg.train.seed,
            process_index=jax.process_index(), process_count=jax.process_count())
  if cfg.data.path:
    holdout = None if cfg.data.holdout_rows < 0 else cfg.data.holdout_rows
    return arrays.ArraySource(cfg.data.path, holdout_rows=holdout, **kw)
  return synthetic.SyntheticSource(cfg.data.synthetic, **kw)


def ground_truth(cfg: config_lib.Config, source) -> synthetic.GroundTruth | None:
  """The synthetic ground truth: the built-in source's, or the ground_truth.npz that
  SyntheticSource.write left beside exported rows; None for real activations."""
  if not cfg.data.path:
    return source.truth
  return synthetic.read_ground_truth(cfg.data.path, source.d)


def first_global_batch(source) -> np.ndarray:
  """The whole first batch, identical on every host (initialisation must agree across hosts)."""
  if hasattr(source, 'global_batch'):
    return source.global_batch(0)
  return source.read_rows(source.global_indices(0)) * np.float32(source.scale)


def level_spec(sae: config_lib.SAEConfig, d: int, steps: int,
               compute_dtype: str = 'float32', sparse_decode: bool = False,
               mesh=None) -> step_lib.LevelSpec:
  """mesh: where the SAE trains; on one whose latents are not sharded (mesh.model = 1) TopK and
  BatchTopK select with `lax.top_k` (objective.SAEHyper.select_top_k). Without a mesh, or
  with latents sharded, the bisection, which never gathers them."""
  hyper = objective.SAEHyper(
      arch=sae.arch, k=sae.k, k_aux=sae.k_aux, auxk_weight=sae.auxk_weight,
      dead_tokens=sae.dead_tokens, k_anneal_steps=int(sae.k_anneal_frac * steps),
      d=min(d, sae.n_latents), l1_coeff=sae.l1_coeff,
      sparsity_warmup_steps=int(sae.sparsity_warmup_frac * steps),
      bandwidth=sae.jumprelu_bandwidth, l0_coeff=sae.l0_coeff,
      target_l0=float(sae.k) if sae.target_l0 < 0 else sae.target_l0,
      groups=config_lib.matryoshka_groups(sae.matryoshka_groups, sae.n_latents),
      compute_dtype=compute_dtype, sparse_decode=sparse_decode,
      code_l1=sae.code_l1,
      select_top_k=mesh is not None and mesh.shape['model'] == 1)
  return step_lib.LevelSpec(hyper, sae.threshold_decay, sae.threshold_start)


def init_sae(key: jax.Array, sae: config_lib.SAEConfig, x_bd: np.ndarray) -> common.Params:
  """Decoder rows (random, or data rows), encoder = decoder^T, b_dec from the first batch."""
  return sae_init_fn(key, sae, x_bd)()


def sae_init_fn(key: jax.Array, sae: config_lib.SAEConfig, x_bd: np.ndarray
                ) -> Callable[[], common.Params]:
  """`init_sae` in two parts. What needs the host (b_dec from the first batch, data or
  k-means++ rows) runs now; the returned function builds the [n, d] arrays and is jittable, so
  `state.create_sharded` builds each device's shard in place: a 1M x 2048 level 1 (8 GiB per
  matrix) never exists whole on one device."""
  x = jnp.asarray(x_bd)
  b_dec = jnp.zeros(x.shape[1], jnp.float32)
  if sae.b_dec_init == 'geometric_median':
    b_dec = jax.jit(common.geometric_median)(x)
  elif sae.b_dec_init == 'mean':
    b_dec = jnp.mean(x, 0)
  rows = None
  if sae.decoder_init in ('data', 'kmeans++'):
    centred = np.asarray(x - b_dec, np.float64)
    if sae.decoder_init == 'kmeans++':
      # k-means++ seeding (D^2 sampling): latents start spread over the data, far from each
      # other, which avoids the merged / split groups a k=1 SAE otherwise gets stuck in.
      seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
      n_seed = min(sae.n_latents, len(centred))
      rows, _ = sklearn.cluster.kmeans_plusplus(centred, n_seed, random_state=seed)
    else:
      rows = centred
    rows = common.normalize_rows(jnp.asarray(rows, jnp.float32))
  d = x.shape[1]

  def build() -> common.Params:
    params = common.init_params(key, d, sae.n_latents, rows_nd=rows)
    params['b_dec'] = b_dec
    params.update(get_arch(sae.arch).extra_params(sae.n_latents, sae))
    return params
  return build


def stack(trees: list) -> dict:
  """Leaves stacked along a new leading axis (R SAEs for a vmapped step)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unit_rows(params) -> np.ndarray:
  """[n, d] float32 unit decoder rows of an SAE's params (level 2's training data)."""
  w_nd = np.asarray(jax.device_get(params['w_dec']), np.float32)
  return w_nd / np.maximum(np.linalg.norm(w_nd, axis=1, keepdims=True), 1e-12)


# SAEConfig fields read after training, by the concept step on the finished level-2 SAE: a
# change reruns that step, not the training.
POST_TRAINING_KEYS = ('assign_threshold', 'isolate_q', 'merge_floor', 'merge_ratio', 'merge_z',
                      'refine', 'split', 'weak_code_frac')
# SAEConfig fields only the level-2 stage reads: level 1's checkpoints do not depend on them
# (a new level-2 default must not throw away a finished level 1).
LEVEL2_ONLY_KEYS = ('oversplit', 'restarts')


def stage_config(cfg: config_lib.Config, *parts: str) -> dict:
  """The config groups a stage depends on (its hash decides whether a checkpoint is reused)."""
  d = config_lib.to_dict(cfg)
  out = {p: d[p] for p in parts}
  if 'data' in out:
    out['data'] = {k: v for k, v in out['data'].items() if k != 'eval_rows'}
  if 'sweep' in out and 'level1' in parts:  # level-2 sweep keys: a level-1 grid's hash as before
    out['sweep'] = {k: v for k, v in out['sweep'].items() if k not in ('level', 'n2')}
  for p in set(parts) & {'level1', 'level2'}:
    drop = POST_TRAINING_KEYS + (LEVEL2_ONLY_KEYS if p == 'level1' else ())
    out[p] = {k: v for k, v in out[p].items() if k not in drop}
    if not out[p].get('code_l1'):  # 0 is the objective from before the key existed: same hash
      out[p].pop('code_l1', None)
  return out


def make_stage(cfg: config_lib.Config, workdir: str, name: str, parts: tuple[str, ...], source,
               parent: dict | None = None) -> ckpt_lib.Stage:
  """The orbax stage `<workdir>/<name>/` with its manifest (config hash, data fingerprint,
  parent stage): a rerun resumes it, a foreign config is refused."""
  cfg_part = stage_config(cfg, *parts)
  manifest = {'config': cfg_part, 'config_hash': config_lib.stable_hash(cfg_part),
              'data_fingerprint': source.fingerprint, 'data': source.manifest(), 'parent': parent}
  return ckpt_lib.Stage(workdir, name, manifest=manifest, keep=cfg.train.keep_checkpoints,
                        overwrite=cfg.overwrite)


def optimizer(lr: float, steps: int, t: config_lib.TrainConfig):
  return optim.make_optimizer(lr, steps, t.warmup_steps, t.decay_start, t.grad_clip,
                              t.lr_schedule)


def setup(cd_or_cfg, workdir: str):
  """Validated + resolved config, the data source and the mesh: what every stage needs."""
  cfg = cd_or_cfg if isinstance(cd_or_cfg, config_lib.Config) else config_lib.from_config_dict(
      cd_or_cfg)
  os.makedirs(workdir, exist_ok=True)
  source = make_source(cfg)
  cfg = config_lib.resolve(cfg, d=source.d,
                           synthetic_atoms=getattr(source, 'n_atoms', None) if not cfg.data.path else None)
  mesh = sharding.make_mesh(cfg.mesh)
  n_data = mesh.shape['data']
  if cfg.train.batch_size % n_data:
    raise ValueError(f'train.batch_size = {cfg.train.batch_size} is not divisible by the '
                     f'{n_data} devices of the mesh data axis; pick a multiple of {n_data}')
  if cfg.level1.n_latents % mesh.shape['model'] or cfg.level2.n_latents % mesh.shape['model']:
    raise ValueError(f'level1.n_latents and level2.n_latents must be divisible by mesh.model = '
                     f'{mesh.shape["model"]}')
  per = cfg.train.batch_size // jax.process_count()
  rows = sharding.process_rows(sharding.named(mesh, 'batch', 'embed'), cfg.train.batch_size)
  if rows != (jax.process_index() * per, (jax.process_index() + 1) * per):
    # the sources hand each process its contiguous 1/process_count of the batch
    raise ValueError(f'process {jax.process_index()} holds rows {rows} of the batch, not its '
                     f'{per} rows from {jax.process_index() * per}: the mesh model axis spans '
                     f'hosts; set --config.mesh.model to a divisor of the devices per host '
                     f'({jax.local_device_count()})')
  logging.info('resolved config: %s', config_lib.to_dict(cfg))
  return cfg, source, mesh
