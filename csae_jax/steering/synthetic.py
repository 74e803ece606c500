"""stage='steer_synthetic': a measurable steering benchmark without real weights.

Per seed, on the built-in synthetic hierarchy (16 parents x 4 children, the pipeline's default):
1. train the staged CSAE (the pipeline) and the Matryoshka baseline (as mode=compare does);
2. train a readout: logistic regression from raw activations to the 16 parent-concept labels
   (the "judge": parent k is present when p_k > 0.5), on samples of its own;
3. name each CSAE concept (>= min_members members) by its members' true parent (a member's
   true child is the one its decoder row is closest to), measure its clamp value s * u on
   samples of their own (each sample a one-token "image", `steering.value`), and build every
   arm as the VLM protocol does (`steering.arms`);
4. steer held-out samples with each arm: insertion (+v) on the samples where the parent is
   absent, suppression (-v) on those where it is present and the readout sees it.
Reported per arm (mean over concepts, then mean +- std over seeds): appeared % (insertion
samples the readout now calls present; `none`: its false-positive rate), removed %
(suppression samples it no longer calls present), the mean change of p_parent under insertion
and suppression, and the side effect: mean |change| of the 15 other parents' probabilities.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from csae_jax import checkpoint as ckpt_lib
from csae_jax import config as config_lib
from csae_jax import pipeline, stages
from csae_jax.compare import methods as methods_lib
from csae_jax.compare import report
from csae_jax.steering import arms as arms_lib
from csae_jax.steering import interventions as iv
from csae_jax.steering import results as results_lib
from csae_jax.steering import rows as rows_lib
from csae_jax.steering import value as value_lib

KEYS = [('appeared_pct', 'appeared %'), ('removed_pct', 'removed %'),
        ('dp_insert', 'Δp(parent) insert'), ('dp_suppress', 'Δp(parent) suppress'),
        ('side_effect', 'side effect |Δp(other)|')]


def train_readout(x_nd: np.ndarray, y_nk: np.ndarray, steps: int = 500, lr: float = 0.05):
  """Logistic regression x -> K independent labels (full batch, Adam); returns (w, b)."""
  w, b = jnp.zeros((x_nd.shape[1], y_nk.shape[1])), jnp.zeros(y_nk.shape[1])
  opt = optax.adam(lr)
  state = opt.init((w, b))
  x, y = jnp.asarray(x_nd), jnp.asarray(y_nk, jnp.float32)

  def loss(p):
    return jnp.mean(optax.sigmoid_binary_cross_entropy(x @ p[0] + p[1], y))

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    upd, s = opt.update(g, s, p)
    return optax.apply_updates(p, upd), s

  p = (w, b)
  for _ in range(steps):
    p, state = step(p, state)
  return p


def readout_probs(p, x_nd) -> np.ndarray:
  return np.asarray(jax.nn.sigmoid(jnp.asarray(x_nd) @ p[0] + p[1]))


def concept_parents(sae: iv.SAE, truth, concepts: list[dict]) -> list[tuple[int, float]]:
  """(true parent, share of members agreeing) per concept."""
  w = np.asarray(sae.params['w_dec'])
  nearest_child = np.argmax(w @ truth.children_cd.T, axis=1)
  out = []
  for c in concepts:
    parents = truth.parent_of_child_c[nearest_child[np.asarray(c['members'])]]
    values, counts = np.unique(parents, return_counts=True)
    out.append((int(values[np.argmax(counts)]), float(counts.max() / len(parents))))
  return out


@jax.jit
def _apply(edit, x):
  return edit(x)


def steer_concept(plan: arms_lib.ConceptPlan, parent: int, saes: dict, x_nd, active_n, p_n_k,
                  readout, mode: str) -> dict:
  """Metrics of every arm for one concept and mode."""
  absent, present = ~active_n, active_n & (p_n_k[:, parent] > 0.5)
  others = np.arange(p_n_k.shape[1]) != parent
  out = {}
  for name, arm in plan.arms.items():
    if name == 'none':
      out[name] = {'appeared_pct': 100.0 * float(np.mean(p_n_k[absent, parent] > 0.5)),
                   'removed_pct': 0.0, 'dp_insert': 0.0, 'dp_suppress': 0.0, 'side_effect': 0.0}
      continue
    row, side = {}, []
    for sign, sel in (('+', absent), ('-', present)):
      if mode == 'ablate' and sign == '+':
        continue
      v = 0.0 if mode == 'ablate' else (arm.value if sign == '+' else -arm.value)
      edit = iv.make(saes[arm.source], arm.members, mode=mode, value=v)
      p_after = readout_probs(readout, _apply(edit, jnp.asarray(x_nd)))
      delta = p_after[sel, parent] - p_n_k[sel, parent]
      if sign == '+':
        row['appeared_pct'] = 100.0 * float(np.mean(p_after[sel, parent] > 0.5))
        row['dp_insert'] = float(np.mean(delta))
      else:
        row['removed_pct'] = 100.0 * float(np.mean(p_after[sel, parent] <= 0.5))
        row['dp_suppress'] = float(np.mean(delta))
      side.append(np.abs(p_after[sel][:, others] - p_n_k[sel][:, others]).mean())
    row['side_effect'] = float(np.mean(side))
    out[name] = row
  return out


def run_seed(cfg: config_lib.SteerSyntheticConfig, seed: int, workdir: str) -> dict:
  base = config_lib.from_config_dict({'train': {'steps': cfg.steps, 'seed': seed},
                                      'level2': {'steps': cfg.level2_steps},
                                      'overwrite': cfg.overwrite})
  pcfg, source, mesh = stages.setup(base, workdir)
  arm_names = [a.strip() for a in cfg.arms.split(',')]
  metrics = pipeline.fit(dataclasses.replace(pcfg, mode='staged'), source, mesh,
                         os.path.join(workdir, 'csae')).metrics
  saes = {'csae': iv.load_sae(os.path.join(workdir, 'csae', 'export'))}
  hierarchy = ckpt_lib.read_json(os.path.join(workdir, 'csae', 'export', 'hierarchy.json'))
  matryoshka = None
  if 'matryoshka' in arm_names:
    methods_lib.matryoshka_methods(pcfg, source, mesh, workdir)
    mdir = os.path.join(workdir, 'matryoshka_cosine', 'export')
    saes['matryoshka'] = iv.load_sae(mdir)
    matryoshka = (saes['matryoshka'],
                  arms_lib.matryoshka_groups(ckpt_lib.read_json(os.path.join(mdir, 'hierarchy.json'))))
  # three disjoint sample streams: the readout's, the "harvest" for u, the steered samples
  x_r, _, act_r = source.sample(np.random.default_rng([seed, 77, 1]), cfg.n_readout)
  x_h, _, _ = source.sample(np.random.default_rng([seed, 77, 2]), cfg.n_eval)
  x_e, _, act_e = source.sample(np.random.default_rng([seed, 77, 3]), cfg.n_eval)
  readout = train_readout(x_r, act_r)
  p_e = readout_probs(readout, x_e)
  acc = float(np.mean((p_e > 0.5) == act_e))
  rows = rows_lib.InMemoryRows(x_h)
  concepts = arms_lib.eligible(hierarchy, cfg.min_members)
  scores = value_lib.image_scores(saes['csae'], rows, [c['members'] for c in concepts])
  parents = concept_parents(saes['csae'], source.truth, concepts)
  matched = (arms_lib.match_all(concepts, saes['csae'], *matryoshka, rows) if matryoshka
             else {})
  modes = [m.strip() for m in cfg.modes.split(',')]
  per_mode = {m: [] for m in modes}
  for j, c in enumerate(tqdm(concepts, desc=f'steer seed {seed}', leave=False)):
    plan = arms_lib.plan(c, scores[:, j], sae=saes['csae'], rows=rows, alive=hierarchy['alive'],
                         arms=arm_names, s=cfg.s, value=cfg.value, seed=seed,
                         images_per_concept=1, top_frac=0.0,
                         matryoshka=(saes['matryoshka'], matched[int(c['id'])]) if matched
                         else None)
    for m in modes:
      per_mode[m].append(steer_concept(plan, parents[j][0], saes, x_e, act_e[:, parents[j][0]],
                                       p_e, readout, m))
  mean = {m: {a: {k: float(np.mean([r[a][k] for r in rs if k in r[a]]))
                  for k, _ in KEYS if any(k in r[a] for r in rs)} for a in arm_names}
          for m, rs in per_mode.items()}
  return {'arms': mean, 'n_concepts': len(concepts), 'readout_accuracy': acc,
          'concept_purity': float(np.mean([p for _, p in parents])),
          'parent_ari': metrics.get('synthetic/parent_ari')}


def run(cd, workdir: str) -> dict:
  cfg = (cd if isinstance(cd, config_lib.SteerSyntheticConfig)
         else config_lib.steer_synthetic_from_config_dict(cd))
  t0 = time.perf_counter()
  out_dir = os.path.join(os.path.abspath(workdir), 'steer_synthetic')
  seeds = config_lib.compare_seeds(config_lib.CompareConfig(seeds=cfg.seeds))
  per_seed = {s: run_seed(cfg, s, os.path.join(out_dir, f'seed_{s}')) for s in seeds}
  tables, summary = [], {}
  for m in cfg.modes.split(','):
    m = m.strip()
    mean, std = report.aggregate({s: r['arms'][m] for s, r in per_seed.items()})
    junk = ('family', 'level2/collapsed')  # compare's per-method extras
    mean = {a: {k: v for k, v in r.items() if k not in junk} for a, r in mean.items()}
    summary[m] = {'mean': mean, 'std': std}
    tables.append(f'**{m}**\n\n' + results_lib.table(mean, std if len(seeds) > 1 else None, KEYS))
  info = {k: [r[k] for r in per_seed.values()] for k in
          ('n_concepts', 'readout_accuracy', 'concept_purity', 'parent_ari')}
  table = '\n\n'.join(tables)
  out = {'stage': 'steer_synthetic', 'seeds': seeds, 'modes': summary, 'per_seed': per_seed,
         **info, 'wall_s': round(time.perf_counter() - t0, 2), 'config': dataclasses.asdict(cfg),
         'table': table}
  ckpt_lib.write_json_atomic(os.path.join(out_dir, 'results.json'), out)
  with open(os.path.join(out_dir, 'results.md'), 'w') as f:
    f.write(f'# Synthetic steering benchmark (seeds {seeds}; mean ± std over seeds)\n\n'
            f'Concepts per seed {info["n_concepts"]}, readout accuracy '
            f'{np.round(info["readout_accuracy"], 3).tolist()}, concept purity '
            f'{np.round(info["concept_purity"], 3).tolist()}; {out["wall_s"]} s.\n\n{table}\n')
  return out
