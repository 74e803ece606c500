"""stage='steer': the paper's steering protocol on a VLM (`run(config, workdir)`).

1. The concepts' per-image activations over the harvest of the steered site (one pass), their
   top images, their words (top images' labels) and the clamp values (`value`, `arms`).
2. Unsteered greedy captions of every image used; insertion (+v) captions of each arm on every
   image of the concept; the judge; suppression (-v) captions on the images whose unsteered
   caption shows the concept (or all, `suppress_on=all`); the judge again.
3. `WD/steer/captions.jsonl` (one caption per line, appended as they are made: a killed run
   resumes and skips what is there), `judgments.jsonl`, `results.json` / `results.md`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
from tqdm.auto import tqdm

from csae_jax import checkpoint as ckpt_lib
from csae_jax import config as config_lib
from csae_jax import sharding
from csae_jax.sources import images as images_lib
from csae_jax.steering import arms as arms_lib
from csae_jax.steering import generate, judge as judge_lib, results as results_lib
from csae_jax.steering import interventions as iv
from csae_jax.steering import rows as rows_lib
from csae_jax.steering import value as value_lib
from csae_jax.vlms import preprocess, registry


def harvest_folder(cfg: config_lib.SteerConfig) -> str:
  """--config.harvest, else the level-1 data.path recorded by the run that made the export."""
  if cfg.harvest:
    return cfg.harvest
  manifest = os.path.join(os.path.dirname(os.path.abspath(cfg.export.rstrip('/'))), 'level1',
                          'manifest.json')
  path = (ckpt_lib.read_json(manifest).get('data', {}).get('path')
          if os.path.exists(manifest) else None)
  if not path:
    raise ValueError(f'cannot tell which harvest made {cfg.export!r} (no data path in '
                     f'{manifest}); set --config.harvest=WD/activations/<site>')
  return path


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _key(r: dict) -> tuple:
  return (r['image_id'], r['arm'], r['concept'], r['sign'])


class Run:
  """One steering run's state: model, SAEs, images, and the captions made so far."""

  def __init__(self, cfg: config_lib.SteerConfig, workdir: str):
    self.cfg = cfg
    self.dir = os.path.join(os.path.abspath(workdir), 'steer')
    self.rows = rows_lib.HarvestRows(harvest_folder(cfg))
    m = self.rows.manifest
    self.site = cfg.site or m.get('site', '')
    if self.site != m.get('site'):
      raise ValueError(f'site {self.site!r} is not the harvest\'s site {m.get("site")!r}: the '
                       'clamp value is measured on the steered site, harvest it first')
    self.saes = {'csae': iv.load_sae(cfg.export)}
    self.hierarchy = ckpt_lib.read_json(os.path.join(cfg.export, 'hierarchy.json'))
    self.matryoshka = None
    if cfg.matryoshka_export:
      self.saes['matryoshka'] = iv.load_sae(cfg.matryoshka_export)
      self.matryoshka = (self.saes['matryoshka'], arms_lib.matryoshka_groups(
          ckpt_lib.read_json(os.path.join(cfg.matryoshka_export, 'hierarchy.json'))))
    port, _ = registry.resolve(cfg.model)
    mesh = sharding.make_mesh(cfg.mesh) if cfg.mesh.model > 1 else None
    self.model = registry.load(port, cfg.model_path, dtype=cfg.dtype, mesh=mesh)
    self.pre = preprocess.Qwen3VLPreprocessor(cfg.model_path,
                                              image_size=cfg.image_size or m['image_size'])
    self.captioner = generate.Captioner(self.model, self.pre, model_path=cfg.model_path,
                                        prompt=cfg.prompt, max_new_tokens=cfg.max_new_tokens,
                                        batch_size=cfg.batch_size)
    self.images = images_lib.open_images(cfg.images, data_dir=cfg.data_dir, split=cfg.split)
    self._pixels: dict[int, np.ndarray] = {}
    self.n_tok = self.captioner.n_tokens(self.site)
    self.positions = self._positions()
    self.judge = self._judge()
    os.makedirs(self.dir, exist_ok=True)
    self.captions_path = os.path.join(self.dir, 'captions.jsonl')
    self._check_manifest()
    self.records = {_key(r): r for r in _read_jsonl(self.captions_path)}

  def _positions(self):
    spec = self.cfg.positions.strip()
    if not spec:
      return None
    if spec == 'image':
      return None if self.site.startswith('vision/') else self.captioner.image_positions()
    try:
      return [int(p) for p in spec.split(',')]
    except ValueError as e:
      raise ValueError(f'positions = {spec!r}: use "", "image" or token indices "0,1,5"') from e

  def _judge(self):
    if self.cfg.judge == 'lexical':
      return judge_lib.LexicalJudge()
    port, _ = registry.resolve(self.cfg.judge_model)
    same = os.path.abspath(self.cfg.judge_model_path) == os.path.abspath(self.cfg.model_path)
    model = self.model if same else registry.load(port, self.cfg.judge_model_path,
                                                  dtype=self.cfg.dtype)
    pre = preprocess.Qwen3VLPreprocessor(self.cfg.judge_model_path,
                                         image_size=self.pre.image_size)
    return judge_lib.VLMJudge(model, pre, seed=self.cfg.seed,
                              eos=generate.end_token_ids(self.cfg.judge_model_path, pre.tokenizer))

  def _check_manifest(self):
    path = os.path.join(self.dir, 'manifest.json')
    want = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k != 'overwrite'}
    if os.path.exists(path) and ckpt_lib.read_json(path) != want:
      if not self.cfg.overwrite:
        raise ValueError(f'{self.dir} holds a steering run with other settings; use another '
                         '--workdir or --config.overwrite=True to start again')
      if os.path.exists(self.captions_path):
        os.remove(self.captions_path)
    ckpt_lib.write_json_atomic(path, want)

  def pixels(self, ids: list[int]) -> np.ndarray:
    for i in ids:
      if i not in self._pixels:
        want = self.rows.file(i)
        if i >= len(self.images) or (want is not None and self.images.key(i) != want):
          raise ValueError(f'image {i} of the harvest ({want!r}) is not image {i} of '
                           f'--config.images={self.cfg.images!r}; steer the harvested images')
        self._pixels[i] = self.pre.resize(self.images.load(i))
    return np.stack([self._pixels[i] for i in ids])

  def caption(self, ids: list[int], arm: arms_lib.Arm, concept, sign):
    """Captions of the images not captioned yet under (arm, concept, sign), appended to disk."""
    todo = [i for i in ids if (i, arm.name, concept, sign) not in self.records]
    if not todo:
      return
    edits, value = None, None
    if arm.name != 'none':
      value = 0.0 if self.cfg.mode == 'ablate' else (1.0 if sign == '+' else -1.0) * arm.value
      direction = self._direction(arm, concept)
      edits = {self.site: iv.make(self.saes[arm.source], arm.members, mode=self.cfg.mode,
                                  value=value, positions=self.positions, n_tokens=self.n_tok,
                                  direction=direction)}
    tokens = self.captioner(self.pixels(todo), edits)
    with open(self.captions_path, 'a') as f:
      for i, t in zip(todo, tokens):
        r = {'image': self.rows.file(i), 'image_id': int(i), 'arm': arm.name, 'concept': concept,
             'sign': sign, 'value': value, 'mode': self.cfg.mode, 'site': self.site,
             'source': arm.source if arm.name != 'none' else None, 'members': arm.members,
             'tokens': t, 'text': self.captioner.text(t)}
        self.records[_key(r)] = r
        f.write(json.dumps(r) + '\n')

  def _direction(self, arm, concept):
    if self.cfg.mode != 'add' or self.cfg.direction == 'members' or arm.name != 'concept':
      return None
    return np.load(os.path.join(self.cfg.export, 'level2_decoder.npy'))[concept]

  def text(self, image, arm, concept, sign) -> str:
    return self.records[(image, arm, concept, sign)]['text']


def choose_concepts(run: Run) -> tuple[list[dict], dict[int, np.ndarray], dict[int, list[str]]]:
  """(chosen concepts, their per-image scores, their words)."""
  cfg = run.cfg
  pool = arms_lib.eligible(run.hierarchy, cfg.min_members)
  wanted = config_lib.steer_concepts(cfg)
  by_id = {int(c['id']): c for c in run.hierarchy['concepts']}
  if wanted:
    missing = [c for c in wanted if c not in by_id]
    if missing:
      raise ValueError(f'concepts {missing} are not in {cfg.export}/hierarchy.json')
    pool = [by_id[c] for c in wanted]
  scores = value_lib.image_scores(run.saes['csae'], run.rows, [c['members'] for c in pool])
  hier = judge_lib.load_hierarchy(cfg.label_hierarchy)
  words = {}
  for j, c in enumerate(pool):
    top = value_lib.top_images(scores[:, j])
    words[int(c['id'])] = judge_lib.concept_words([run.rows.label(i) for i in top], hier,
                                                  cfg.label_min_frac)
  if wanted:
    unnamed = [c for c in wanted if not words[c]]
    if unnamed:
      raise ValueError(f'concepts {unnamed} have no labelled top images, so no judge can name '
                       'them; label the images (class subfolders) or choose other concepts')
    chosen = pool
  else:
    named = [j for j, c in enumerate(pool) if words[int(c['id'])]]
    if not named:
      raise ValueError('no concept has labelled top images; the judge needs image labels '
                       '(class subfolders of --config.images)')
    rng = np.random.default_rng(cfg.seed)
    pick = sorted(rng.choice(named, min(cfg.n_concepts, len(named)), replace=False))
    chosen = [pool[j] for j in pick]
  col = {int(c['id']): j for j, c in enumerate(pool)}
  return chosen, {int(c['id']): scores[:, col[int(c['id'])]] for c in chosen}, words


def _judge_sets(run: Run, plan, ids, arms, sign) -> dict[tuple, bool]:
  sets = [[run.text(i, a, None if a == 'none' else plan.concept, None if a == 'none' else sign)
           for a in arms] for i in ids]
  out = {}
  for i, verdict in zip(ids, run.judge.judge(plan.words, sets)):
    for a, v in zip(arms, verdict):
      out[(i, a, plan.concept, sign)] = v
  return out


def run(cd, workdir: str) -> dict:
  cfg = cd if isinstance(cd, config_lib.SteerConfig) else config_lib.steer_from_config_dict(cd)
  t0 = time.perf_counter()
  r = Run(cfg, workdir)
  arm_names = config_lib.steer_arms(cfg)
  chosen, scores, words = choose_concepts(r)
  alive = r.hierarchy.get('alive') or sorted({m for c in r.hierarchy['concepts']
                                              for m in c['members']})
  matched = (arms_lib.match_all(chosen, r.saes['csae'], *r.matryoshka, r.rows)
             if 'matryoshka' in arm_names else {})
  plans = []
  for c in tqdm(chosen, desc='clamp values', file=sys.stderr, disable=len(chosen) < 3):
    p = arms_lib.plan(c, scores[int(c['id'])], sae=r.saes['csae'], rows=r.rows, alive=alive,
                      arms=arm_names, s=cfg.s, value=cfg.value, seed=cfg.seed,
                      images_per_concept=cfg.images_per_concept, top_frac=cfg.top_frac,
                      matryoshka=(r.saes['matryoshka'], matched[int(c['id'])]) if matched
                      else None)
    p.words = words[p.concept]
    plans.append(p)
  none = arms_lib.Arm('none', 'csae', [], 0.0)
  all_ids = sorted({i for p in plans for i in p.images})
  steered = [a for a in arm_names if a != 'none']
  bar = tqdm(total=len(plans) * len(steered) * 2 + 1, desc='steered captions', file=sys.stderr,
             dynamic_ncols=True)
  r.caption(all_ids, none, None, None)
  bar.update(1)
  verdicts: dict[tuple, bool] = {}
  for p in plans:
    if cfg.mode != 'ablate':
      for a in steered:
        r.caption(p.images, p.arms[a], p.concept, '+')
        bar.update(1)
    ins = _judge_sets(r, p, p.images, ['none'] + (steered if cfg.mode != 'ablate' else []), '+')
    verdicts.update(ins)  # ablate: the unsteered captions only
    present = [i for i in p.images if cfg.suppress_on == 'all' or ins[(i, 'none', p.concept, '+')]]
    for a in steered:
      r.caption(present, p.arms[a], p.concept, '-')
      bar.update(1)
    if present and steered:
      verdicts.update(_judge_sets(r, p, present, steered, '-'))
  bar.close()
  records = list(r.records.values())
  summary = results_lib.summarise(records, verdicts, arm_names)
  out = {'stage': 'steer', 'site': r.site, 'mode': cfg.mode, 'judge': r.judge.name,
         'judge_unparsed': r.judge.unparsed, 'n_concepts': len(plans),
         'concepts': [{'id': p.concept, 'words': p.words, 'u': round(p.u, 6),
                       'n_members': len(p.members), 'top_images': p.top_images,
                       'n_images': len(p.images),
                       'arms': {a: {'members': x.members, 'value': round(x.value, 6),
                                    'matched': x.matched, 'match_cos': x.match_cos}
                                for a, x in p.arms.items() if a != 'none'}} for p in plans],
         **summary, 'wall_s': round(time.perf_counter() - t0, 2),
         'config': dataclasses.asdict(cfg)}
  with open(os.path.join(r.dir, 'judgments.jsonl'), 'w') as f:
    for (i, a, c, s), v in sorted(verdicts.items(), key=str):
      f.write(json.dumps({'image_id': i, 'arm': a, 'concept': c, 'sign': s, 'shows': v}) + '\n')
  ckpt_lib.write_json_atomic(os.path.join(r.dir, 'results.json'), out)
  md = (f'# Steering at {r.site} ({cfg.mode}, {r.judge.name} judge)\n\n{len(plans)} concepts x '
        f'{cfg.images_per_concept} images; value = '
        f'{"%g" % cfg.value if cfg.value else "%g * u" % cfg.s}.\n\n'
        + results_lib.table(summary['arms']) + '\n')
  with open(os.path.join(r.dir, 'results.md'), 'w') as f:
    f.write(md)
  out['table'] = results_lib.table(summary['arms'])
  return out
