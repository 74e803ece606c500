"""The arms of the protocol: which level-1 features each arm steers, at which value, per concept.

- `none`: nothing (the unsteered caption).
- `concept`: every level-1 member of the level-2 concept (hierarchy.json).
- `single`: the best single child: the member with the largest sum over the concept's top
  images of its mean code (the member that carries most of the concept on its own images).
- `random`: as many alive level-1 features, drawn at random outside the concept (seeded per
  concept).
- `matryoshka`: the Matryoshka baseline's matched set: the inner (parent) latent whose group
  (itself and its children in the Matryoshka export's hierarchy.json) has the unit-mean decoder
  direction closest (cosine) to the concept's, steered in the Matryoshka SAE.

Values: `concept`, `single` and `random` share the concept's v = s * u (so the arms differ only
in which features move); `matryoshka` uses s * u measured for its own set in its own SAE, whose
codes have their own scale. `value` > 0 overrides every arm's v.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from csae_jax.steering import interventions as iv
from csae_jax.steering import rows as rows_lib
from csae_jax.steering import value as value_lib


@dataclasses.dataclass
class Arm:
  name: str
  source: str            # 'csae' or 'matryoshka': which SAE steers
  members: list[int]
  value: float           # unsigned clamp magnitude v
  matched: Optional[int] = None   # matryoshka: the matched inner latent
  match_cos: Optional[float] = None


@dataclasses.dataclass
class ConceptPlan:
  concept: int
  members: list[int]
  u: float
  top_images: list[int]
  arms: dict[str, Arm]
  images: list[int] = dataclasses.field(default_factory=list)
  words: list[str] = dataclasses.field(default_factory=list)


def eligible(hierarchy: dict, min_members: int) -> list[dict]:
  return [c for c in hierarchy['concepts'] if len(c['members']) >= min_members]


def unit_centroid(sae: iv.SAE, members: list[int]) -> np.ndarray:
  w = np.asarray(sae.params['w_dec'])[np.asarray(members, np.int64)]
  w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
  c = w.mean(0)
  return c / max(float(np.linalg.norm(c)), 1e-12)


def matryoshka_groups(hierarchy: dict) -> list[tuple[int, list[int]]]:
  """(inner latent, steered set = the inner latent and its children) per Matryoshka concept."""
  return [(int(c['id']), [int(c['id'])] + [int(m) for m in c['members'] if m != c['id']])
          for c in hierarchy['concepts']]


def match(direction_d: np.ndarray, sae: iv.SAE, groups: list[tuple[int, list[int]]]
          ) -> tuple[int, float]:
  """Index into `groups` of the set whose unit-mean direction is closest, and the cosine."""
  if not groups:
    raise ValueError('the Matryoshka export has no concepts to match')
  cos = [float(unit_centroid(sae, members) @ direction_d) for _, members in groups]
  best = int(np.argmax(cos))
  return best, cos[best]


def match_all(concepts: list[dict], sae: iv.SAE, m_sae: iv.SAE,
              groups: list[tuple[int, list[int]]], rows: rows_lib.Rows) -> dict[int, dict]:
  """Per concept id: its matched Matryoshka set, the cosine and that set's top images (one pass
  over the rows with the Matryoshka SAE for every concept)."""
  out = {}
  for c in concepts:
    best, cos = match(unit_centroid(sae, [int(m) for m in c['members']]), m_sae, groups)
    out[int(c['id'])] = {'inner': groups[best][0], 'members': groups[best][1], 'cos': cos}
  scores = value_lib.image_scores(m_sae, rows, [m['members'] for m in out.values()],
                                  desc='matryoshka activations')
  for j, m in enumerate(out.values()):
    m['top'] = value_lib.top_images(scores[:, j])
  return out


def random_members(rng: np.random.Generator, alive: list[int], exclude: list[int], size: int
                   ) -> list[int]:
  pool = np.setdiff1d(np.asarray(alive, np.int64), np.asarray(exclude, np.int64))
  if len(pool) < size:
    raise ValueError(f'the random arm needs {size} alive features outside the concept, only '
                     f'{len(pool)} exist')
  return sorted(int(i) for i in rng.choice(pool, size, replace=False))


def concept_images(rng: np.random.Generator, scores_i: np.ndarray, n: int, top_frac: float
                   ) -> list[int]:
  """n images: the top_frac * n highest-scoring (where the concept is) and random others."""
  n = min(n, len(scores_i))
  top = [int(i) for i in value_lib.top_images(scores_i, int(round(top_frac * n)))]
  rest = np.setdiff1d(np.arange(len(scores_i)), top)
  return top + sorted(int(i) for i in rng.choice(rest, n - len(top), replace=False))


def plan(concept: dict, scores_i: np.ndarray, *, sae: iv.SAE, rows: rows_lib.Rows, alive: list[int],
         arms: list[str], s: float, value: float, seed: int, images_per_concept: int,
         top_frac: float, matryoshka: Optional[tuple[iv.SAE, dict]] = None) -> ConceptPlan:
  """The arms of one concept (`scores_i`: its per-image activation, `value.image_scores`).
  matryoshka: (its SAE, this concept's entry of `match_all`) when that arm runs."""
  cid, members = int(concept['id']), [int(m) for m in concept['members']]
  rng = np.random.default_rng([seed, cid])
  top = value_lib.top_images(scores_i)
  u, strength_m = value_lib.concept_scale(sae, rows, members, top)
  v = value or s * u
  out = {'none': Arm('none', 'csae', [], 0.0),
         'concept': Arm('concept', 'csae', members, v),
         'single': Arm('single', 'csae', [members[int(np.argmax(strength_m))]], v)}
  if 'random' in arms:
    out['random'] = Arm('random', 'csae', random_members(rng, alive, members, len(members)), v)
  if 'matryoshka' in arms:
    m_sae, m = matryoshka
    m_u, _ = value_lib.concept_scale(m_sae, rows, m['members'], m['top'])
    out['matryoshka'] = Arm('matryoshka', 'matryoshka', m['members'], value or s * m_u,
                            matched=m['inner'], match_cos=round(m['cos'], 4))
  return ConceptPlan(cid, members, u, [int(i) for i in top], {a: out[a] for a in arms},
                     concept_images(rng, scores_i, images_per_concept, top_frac))
