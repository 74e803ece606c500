"""Synthetic hierarchical concepts: the built-in data and the exact ground truth for tests.

K parent directions; parent i has C_i child directions
    child = normalize(a * parent + sqrt(1 - a^2) * u),  u a unit vector orthogonal to the parent,
so siblings share the parent component (geometric hierarchy; a = 0 leaves only the statistical
one). Per sample a set of parents is active; an active parent fires exactly one of its children
(siblings are mutually exclusive) and, with probability `parent_emission`, also its own direction.
Magnitudes are log-normal; Gaussian noise is added.

The knobs (config.SyntheticConfig, each tested for its marginals), so that one generator makes
every family of the robustness suite (benchmarks/robustness.py) without special cases:
  branching      C_i = n_children, or uniform in [n_children, n_children_max] (unequal)
  parent_corr    the parents of each consecutive pair have this cosine (correlated concepts)
  active_count   'bernoulli' (each parent independently with p_parent), 'poisson' or 'fixed'
                 number of active parents (mean_active), chosen uniformly
  scenes         scene_size / scene_cooccur: members copy their scene leader's on/off state
  magnitudes     LogNormal(log_mag_mean, log_mag_std) (the tail: log_mag_std)
  noise          isotropic noise_std, or per-dimension std spread over [noise_std, noise_std_max]

Batches are a pure function of (seed, step): the source is streamable (nothing is held but the
dictionary), deterministic and resumable. It has the same interface as `ArraySource`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Iterator

import numpy as np

from csae_jax.config import SyntheticConfig
from csae_jax.sources import batches as batches_lib

# Evaluation rows come from a disjoint random stream (step ids above any training step).
_EVAL_STREAM = 1 << 40


@dataclasses.dataclass(frozen=True)
class GroundTruth:
  parents_kd: np.ndarray        # [K, d] unit parent directions
  children_cd: np.ndarray       # [K * C, d] unit child directions, parent-major
  parent_of_child_c: np.ndarray  # [K * C] int, index of each child's parent


GROUND_TRUTH_FILE = 'ground_truth.npz'  # written by SyntheticSource.write beside the rows


def read_ground_truth(data_path: str, d: int) -> GroundTruth | None:
  """The GroundTruth that SyntheticSource.write put in the data directory (or beside the data
  file), or None when there is none: exported synthetic data is scored like built-in data."""
  folder = data_path if os.path.isdir(data_path) else os.path.dirname(data_path)
  path = os.path.join(folder, GROUND_TRUTH_FILE)
  if not os.path.isfile(path):
    return None
  keys = ('parents_kd', 'children_cd', 'parent_of_child_c')
  with np.load(path) as z:
    missing = [k for k in keys if k not in z.files]
    if missing:
      raise ValueError(f'{path}: missing key(s) {missing} (has {z.files}); write it with '
                       f'SyntheticSource.write, or remove it to skip ground-truth scoring.')
    truth = GroundTruth(*(np.asarray(z[k]) for k in keys))
  c = len(truth.children_cd)
  if (truth.children_cd.shape != (c, d) or truth.parents_kd.ndim != 2
      or truth.parents_kd.shape[1] != d or truth.parent_of_child_c.shape != (c,)):
    raise ValueError(f'{path}: parents_kd {truth.parents_kd.shape}, children_cd '
                     f'{truth.children_cd.shape}, parent_of_child_c '
                     f'{truth.parent_of_child_c.shape} do not fit data of width d={d} '
                     f'(expected [K, {d}], [C, {d}], [C]); is it the ground truth of another '
                     f'export?')
  return truth


def branching(cfg: SyntheticConfig) -> np.ndarray:
  """[K] number of children of each parent (from the dictionary seed)."""
  if not cfg.n_children_max or cfg.n_children_max == cfg.n_children:
    return np.full(cfg.n_parents, cfg.n_children, np.int64)
  # A stream of its own: equal-branching dictionaries stay bit-identical to earlier versions.
  rng = np.random.default_rng([cfg.seed, 1])
  return rng.integers(cfg.n_children, cfg.n_children_max + 1, size=cfg.n_parents)


def make_ground_truth(cfg: SyntheticConfig) -> GroundTruth:
  rng = np.random.default_rng(cfg.seed)
  k, d = cfg.n_parents, cfg.d
  g_kd = rng.standard_normal((k, d))
  if k <= d:  # orthonormal parents when they fit: the hierarchy is then exactly as specified
    q_dk, _ = np.linalg.qr(g_kd.T)
    parents_kd = q_dk.T
  else:
    parents_kd = g_kd / np.linalg.norm(g_kd, axis=1, keepdims=True)
  if cfg.parent_corr:
    # Pairs (0, 1), (2, 3), ...: the second mixes in the first. With orthonormal parents the
    # pair's cosine is exactly parent_corr and every other pair stays orthogonal.
    c = cfg.parent_corr
    second = np.arange(1, k, 2)
    mixed = c * parents_kd[second - 1] + np.sqrt(1 - c * c) * parents_kd[second]
    parents_kd[second] = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)
  counts_k = branching(cfg)
  parent_of_child_c = np.repeat(np.arange(k), counts_k)
  if np.all(counts_k == cfg.n_children):
    u_cd = rng.standard_normal((k, cfg.n_children, d)).reshape(-1, d)
  else:
    u_cd = rng.standard_normal((len(parent_of_child_c), d))
  p_cd = parents_kd[parent_of_child_c]
  u_cd -= np.sum(u_cd * p_cd, axis=1, keepdims=True) * p_cd
  u_cd /= np.linalg.norm(u_cd, axis=-1, keepdims=True)
  a = cfg.child_parent_cos
  children_cd = a * p_cd + np.sqrt(1 - a * a) * u_cd
  children_cd /= np.linalg.norm(children_cd, axis=-1, keepdims=True)
  return GroundTruth(parents_kd=parents_kd.astype(np.float32),
                     children_cd=children_cd.astype(np.float32),
                     parent_of_child_c=parent_of_child_c)


def noise_std_d(cfg: SyntheticConfig) -> np.ndarray | float:
  """Per-dimension noise std: the scalar noise_std (isotropic), or evenly spread over
  [noise_std, noise_std_max] in a random order of the dimensions (anisotropic)."""
  if not cfg.noise_std_max or cfg.noise_std_max == cfg.noise_std:
    return cfg.noise_std
  std_d = np.linspace(cfg.noise_std, cfg.noise_std_max, cfg.d)
  return np.random.default_rng([cfg.seed, 2]).permutation(std_d).astype(np.float32)


class SyntheticSource:
  """Streams synthetic batches; `batch(step)` is this process's slice of the global batch."""

  kind = 'synthetic'

  def __init__(self, cfg: SyntheticConfig, *, batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1, scale: float | None = None):
    if batch_size % process_count:
      raise ValueError(f'train.batch_size = {batch_size} must be divisible by the number of '
                       f'processes ({process_count})')
    self.cfg = cfg
    self.truth = make_ground_truth(cfg)
    self.d = cfg.d
    self.batch_size = batch_size
    self.seed = seed
    self.process_index, self.process_count = process_index, process_count
    self.n_atoms = len(self.truth.children_cd) + (cfg.n_parents if cfg.parent_emission else 0)
    self.noise_std_d = noise_std_d(cfg)
    counts_k = np.bincount(self.truth.parent_of_child_c, minlength=cfg.n_parents)
    self._first_child_k = np.concatenate([[0], np.cumsum(counts_k)[:-1]])
    self._counts_k = counts_k
    # One scalar for unit mean squared norm, from a fixed sample (independent of the seed).
    self.scale = scale if scale is not None else float(
        1.0 / np.sqrt(np.mean(np.sum(self.sample(np.random.default_rng(7), 16384)[0] ** 2, -1))))
    h = hashlib.sha256(repr(dataclasses.asdict(cfg)).encode())
    h.update(self.truth.children_cd.tobytes())
    self.fingerprint = h.hexdigest()

  def active_parents(self, rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, K] bool: which parents are active in each of n samples."""
    cfg = self.cfg
    k = cfg.n_parents
    if cfg.active_count == 'bernoulli':
      active_nk = rng.random((n, k)) < cfg.p_parent
    else:
      mean = cfg.mean_active or k * cfg.p_parent
      if cfg.active_count == 'poisson':
        m_n = np.minimum(rng.poisson(mean, size=n), k)
      else:
        m_n = np.full(n, int(round(mean)))
      # m_n parents uniformly without replacement: the m_n smallest of K random keys.
      rank_nk = np.argsort(np.argsort(rng.random((n, k)), axis=1), axis=1)
      active_nk = rank_nk < m_n[:, None]
    if cfg.scene_cooccur and cfg.scene_size > 1:
      # Scenes: consecutive groups of scene_size parents; each non-leader copies its leader's
      # state with probability scene_cooccur (marginals stay p_parent, concepts co-occur).
      leader_k = np.arange(k) // cfg.scene_size * cfg.scene_size
      copy_nk = (rng.random((n, k)) < cfg.scene_cooccur) & (np.arange(k) != leader_k)
      active_nk = np.where(copy_nk, active_nk[:, leader_k], active_nk)
    return active_nk

  def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    """n raw samples: (x_nd, child_coef_nc, parent_active_nk)."""
    cfg, t = self.cfg, self.truth
    k = cfg.n_parents
    active_nk = self.active_parents(rng, n)
    if np.all(self._counts_k == cfg.n_children):  # (the stream of earlier versions)
      choice_nk = rng.integers(0, cfg.n_children, size=(n, k))
    else:
      choice_nk = (rng.random((n, k)) * self._counts_k).astype(np.int64)
    mag_nk = rng.lognormal(cfg.log_mag_mean, cfg.log_mag_std, size=(n, k))
    child_coef_nc = np.zeros((n, len(t.children_cd)), np.float32)
    rows, parents = np.nonzero(active_nk)
    child_coef_nc[rows, self._first_child_k[parents] + choice_nk[rows, parents]] = (
        mag_nk[rows, parents])
    x_nd = child_coef_nc @ t.children_cd
    if cfg.parent_emission:
      emit_nk = active_nk & (rng.random((n, k)) < cfg.parent_emission)
      pmag_nk = rng.lognormal(cfg.log_mag_mean, cfg.log_mag_std, size=(n, k))
      x_nd += (emit_nk * pmag_nk).astype(np.float32) @ t.parents_kd
    x_nd += self.noise_std_d * rng.standard_normal((n, self.d)).astype(np.float32)
    return x_nd.astype(np.float32), child_coef_nc, active_nk

  def global_batch(self, step: int) -> np.ndarray:
    """[batch_size, d] float32, normalised, the whole batch at `step`."""
    x_bd = self.sample(np.random.default_rng([self.seed, step]), self.batch_size)[0]
    return x_bd * np.float32(self.scale)

  def batch(self, step: int) -> np.ndarray:
    per = self.batch_size // self.process_count
    return self.global_batch(step)[self.process_index * per:(self.process_index + 1) * per]

  def eval_batches(self, max_rows: int, batch_size: int) -> batches_lib.Batches:
    return batches_lib.Batches(
        lambda: (x_bd for x_bd, _, _ in self.eval_samples(max_rows, batch_size)), max_rows)

  def eval_samples(self, max_rows: int, batch_size: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Held-out (x_bd normalised, child_coef_bc, parent_active_bk): the inputs of
    `eval_batches` with their ground truth (parent detection, synthetic HMS)."""
    for i, start in enumerate(range(0, max_rows, batch_size)):
      n = min(batch_size, max_rows - start)
      rng = np.random.default_rng([self.seed, _EVAL_STREAM + i])
      x_bd, coef_bc, active_bk = self.sample(rng, n)
      yield x_bd * np.float32(self.scale), coef_bc, active_bk

  def manifest(self) -> dict:
    return {'kind': 'synthetic', 'config': dataclasses.asdict(self.cfg), 'd': self.d,
            'scale': self.scale, 'fingerprint': self.fingerprint, 'n_atoms': self.n_atoms}

  def write(self, out_dir: str, n_rows: int, rows_per_shard: int = 65536) -> list[str]:
    """Writes n_rows raw (unnormalised) samples in the export format plus the ground truth."""
    from csae_jax.sources import arrays  # pylint: disable=g-import-not-at-top

    def chunks():
      for i, start in enumerate(range(0, n_rows, rows_per_shard)):
        rng = np.random.default_rng([self.seed, i])
        yield self.sample(rng, min(rows_per_shard, n_rows - start))[0]

    paths = arrays.write_shards(out_dir, chunks(), rows_per_shard=rows_per_shard)
    np.savez(os.path.join(out_dir, GROUND_TRUTH_FILE + '.tmp.npz'), parents_kd=self.truth.parents_kd,
             children_cd=self.truth.children_cd, parent_of_child_c=self.truth.parent_of_child_c)
    os.replace(os.path.join(out_dir, GROUND_TRUTH_FILE + '.tmp.npz'),
               os.path.join(out_dir, GROUND_TRUTH_FILE))
    return paths
