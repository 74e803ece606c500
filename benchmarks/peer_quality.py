"""Peer comparison: csae_jax's level-1 TopK / BatchTopK SAEs against SAELens's, same data.

Both libraries train on the *same batches in the same order* (row ids from csae_jax's
`ArraySource.global_indices`, inputs scaled to unit mean squared norm by the same scalar), with the
same batch size, learning rate, LR schedule (linear warmup, constant, linear decay to 0 over the
last 20%), Adam betas and gradient clipping, and the same dead-latent window (in tokens). Each
library keeps its own defaults for everything else (initialisation, decoder-norm handling, AuxK
weight and normalisation, BatchTopK threshold estimate); the README lists them.

Both trained SAEs are then evaluated by ONE numpy function on the same held-out rows, under each
library's own inference rule (TopK: k largest per row; BatchTopK: the learned threshold, which
SAELens exports as a JumpReLU SAE):
    FVU  = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2     (1 - explained variance)
    L0   = mean active latents per held-out row
    dead = fraction of latents that never fire on the held-out rows
Each library's own evaluation (csae_jax `evals.recon`, SAELens inference `encode`/`decode`) is
recorded too, as a cross-check of the numpy one.

SAELens runs in its own virtual environment (benchmarks/.venv_saelens, created on first use with
the CPU torch 2.13.0 wheel, never a CUDA build) via `benchmarks/_saelens_side.py`. The runs are
sequential: the machine never trains both libraries at once.

    python benchmarks/peer_quality.py                       # the defaults (README table)
    python benchmarks/peer_quality.py --steps 100 --libs ours  # quick look at our side only

Writes <out>/peer_quality.json and <out>/peer_quality.md (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import _venvs  # noqa: E402  (after the path fix, for `python benchmarks/...`)

SAELENS_PIN = 'sae-lens==6.54.12'  # the version measured in README.md (accepts torch 2.13)
ARCHS = {'topk': 'topk', 'batch_topk': 'batchtopk'}  # ours -> SAELens architecture name
FVU_MARGIN = 0.01     # ours must reach FVU <= SAELens's + this
L0_TOLERANCE = 0.10   # "equal L0": |L0 ours - L0 SAELens| <= this * k


def log(msg: str) -> None:
  print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)


# ---------------------------------------------------------------------------------------------
# SAELens environment


def venv_python() -> str:
  return _venvs.venv_python('saelens')


def ensure_saelens_venv() -> dict:
  """benchmarks/.venv_saelens (created on first use, see _venvs); returns the versions."""
  return _venvs.ensure_venv('saelens', SAELENS_PIN, 'sae_lens')


# ---------------------------------------------------------------------------------------------
# Data: one synthetic export, the exact training batches and the held-out rows


def prepare_data(args, work: str) -> dict:
  """Writes the synthetic activations once (raw, unnormalised, csae_jax's export format), then
  the [steps, batch] row ids of csae_jax's training batches and the scaled held-out rows."""
  from csae_jax import config as config_lib
  from csae_jax.sources import arrays, synthetic
  from experiments.configs import csae as csae_config

  base = config_lib.from_config_dict(csae_config.get_config()).data.synthetic
  syn = dataclasses.replace(base, d=args.d, n_parents=args.n_parents)
  n_rows = args.steps * args.batch_size + args.holdout_rows  # one epoch: no row is seen twice
  data_dir = os.path.join(work, 'data')
  key = {'synthetic': dataclasses.asdict(syn), 'n_rows': n_rows, 'seed': args.seed,
         'steps': args.steps, 'batch_size': args.batch_size, 'holdout_rows': args.holdout_rows,
         'version': 1}
  meta_path = os.path.join(work, 'meta.json')
  if os.path.exists(meta_path) and json.load(open(meta_path)).get('key') == key:
    log(f'reusing the activations in {data_dir}')
    return json.load(open(meta_path))
  shutil.rmtree(data_dir, ignore_errors=True)  # only what this script wrote there
  os.makedirs(work, exist_ok=True)
  t0 = time.perf_counter()
  src = synthetic.SyntheticSource(syn, batch_size=args.batch_size, seed=args.seed)
  src.write(data_dir, n_rows)
  log(f'wrote {n_rows} x {args.d} synthetic rows ({src.n_atoms} true atoms) to {data_dir} in '
      f'{time.perf_counter() - t0:.1f}s')
  # The same reader our pipeline builds from data.path: it fixes the unit-norm scale, the
  # held-out split and the batch order, which the SAELens side then replays exactly.
  arr = arrays.ArraySource(data_dir, batch_size=args.batch_size, seed=args.seed,
                           holdout_rows=args.holdout_rows)
  ids_sb = np.stack([arr.global_indices(s) for s in range(args.steps)])
  np.save(os.path.join(work, 'train_ids.npy'), ids_sb)
  x_eval = np.concatenate(list(arr.eval_batches(args.holdout_rows, 4096)))
  np.save(os.path.join(work, 'eval.npy'), x_eval)
  meta = {'key': key, 'scale': arr.scale, 'n_rows': n_rows, 'n_train': arr.n_train,
          'n_eval': len(x_eval), 'true_atoms': src.n_atoms, 'data_dir': data_dir}
  with open(meta_path, 'w') as f:
    json.dump(meta, f, indent=1)
  return meta


# ---------------------------------------------------------------------------------------------
# One evaluation for both libraries


def evaluate_np(w, x_nd: np.ndarray, *, rule: str, k: int, threshold=None,
                chunk: int = 2048) -> dict:
  """FVU / L0 / never-firing latents of an SAE with weights w (w_enc [d, n], b_enc [n],
  w_dec [n, d], b_dec [d]) under the inference rule 'topk' (k largest positive pre-activations
  per row) or 'threshold' (pre-activation > threshold, scalar or per latent, and > 0)."""
  w_enc, b_enc = np.asarray(w['w_enc'], np.float32), np.asarray(w['b_enc'], np.float32)
  w_dec, b_dec = np.asarray(w['w_dec'], np.float32), np.asarray(w['b_dec'], np.float32)
  n = w_enc.shape[1]
  sq_err, l0 = 0.0, 0
  fires_n = np.zeros(n, np.int64)
  for lo in range(0, len(x_nd), chunk):
    x_bd = x_nd[lo:lo + chunk]
    pre_bn = (x_bd - b_dec) @ w_enc + b_enc
    if rule == 'topk':
      idx_bk = np.argpartition(-pre_bn, k - 1, axis=1)[:, :k]
      keep_bn = np.zeros_like(pre_bn, bool)
      np.put_along_axis(keep_bn, idx_bk, True, axis=1)
      keep_bn &= pre_bn > 0
    else:
      keep_bn = (pre_bn > np.asarray(threshold, np.float32)) & (pre_bn > 0)
    codes_bn = np.where(keep_bn, pre_bn, 0.0).astype(np.float32)
    x_hat_bd = codes_bn @ w_dec + b_dec
    sq_err += float(np.sum((x_hat_bd.astype(np.float64) - x_bd) ** 2))
    l0 += int(keep_bn.sum())
    fires_n += keep_bn.sum(0)
  x64 = x_nd.astype(np.float64)
  total_var = float(np.sum((x64 - x64.mean(0)) ** 2))
  return {'fvu': sq_err / total_var, 'l0': l0 / len(x_nd), 'dead_frac': float(np.mean(fires_n == 0)),
          'n_rows': len(x_nd)}


def calibrated_threshold(w, x_nd: np.ndarray, k: int, chunk: int = 2048) -> float:
  """The threshold at which a BatchTopK SAE fires exactly k latents per row on average over
  x_nd (batch top-k over the whole held-out set): an equal-L0 comparison that does not depend on
  how well each library estimated its inference threshold during training."""
  w_enc, b_enc = np.asarray(w['w_enc'], np.float32), np.asarray(w['b_enc'], np.float32)
  b_dec = np.asarray(w['b_dec'], np.float32)
  pre = np.concatenate([((x_nd[lo:lo + chunk] - b_dec) @ w_enc + b_enc).ravel()
                        for lo in range(0, len(x_nd), chunk)])
  m = k * len(x_nd)
  # strictly above the (m+1)-th largest value: exactly m latents fire (ties have measure 0)
  return float(max(np.partition(pre, len(pre) - m - 1)[len(pre) - m - 1], 0.0))


def shared_eval(w, x_nd: np.ndarray, arch: str, k: int, threshold=None) -> dict:
  """The library's inference rule, plus (BatchTopK) the held-out-calibrated equal-L0 variant."""
  if arch == 'topk':
    out = evaluate_np(w, x_nd, rule='topk', k=k)
    return {**out, 'fvu_at_k': out['fvu'], 'dead_frac_at_k': out['dead_frac']}
  out = evaluate_np(w, x_nd, rule='threshold', k=k, threshold=threshold)
  thr_k = calibrated_threshold(w, x_nd, k)
  at_k = evaluate_np(w, x_nd, rule='threshold', k=k, threshold=thr_k)
  return {**out, 'fvu_at_k': at_k['fvu'], 'l0_at_k': at_k['l0'],
          'dead_frac_at_k': at_k['dead_frac'], 'threshold_at_k': thr_k}


# ---------------------------------------------------------------------------------------------
# The two sides


def schedule(args) -> dict:
  """The shared LR schedule and dead-latent window, from csae_jax's config (see README)."""
  from experiments.configs import csae as csae_config
  t = csae_config.get_config().train
  warmup = min(t.warmup_steps, max(args.steps - 1, 0))          # as csae_jax.train.optim
  decay_steps = args.steps - max(int(t.decay_start * args.steps), warmup)
  dead_tokens = max(4 * args.batch_size, args.steps * args.batch_size // 10)  # config.resolve_sae
  return {'warmup_steps': warmup, 'decay_steps': decay_steps,
          'dead_tokens': dead_tokens, 'dead_steps': dead_tokens // args.batch_size}


def run_ours(args, arch: str, meta: dict, x_eval: np.ndarray) -> dict:
  import jax
  from csae_jax import stages
  from csae_jax.cascade import level1 as level1_lib
  from experiments.configs import csae as csae_config

  cd = csae_config.get_config()
  cd.data.path = meta['data_dir']
  cd.data.holdout_rows = args.holdout_rows
  cd.data.eval_rows = args.holdout_rows
  cd.level1.arch = arch
  cd.level1.n_latents = args.n_latents
  cd.level1.k = args.k
  cd.train.steps = args.steps
  cd.train.batch_size = args.batch_size
  cd.train.lr = args.lr
  cd.train.seed = args.seed
  cd.train.checkpoint_every = args.steps  # one save, at the end (SAELens saves nothing)
  # Pinned to the settings SAELens is given (and that were measured), whatever the defaults
  # become: the linear-decay schedule, float32 compute, dense decoding.
  for key, value in (('lr_schedule', 'linear_decay'), ('compute_dtype', 'float32'),
                     ('sparse_decode', False)):
    if key in cd.train:
      cd.train[key] = value
  workdir = tempfile.mkdtemp(prefix=f'peer_ours_{arch}_')  # fresh: nothing to resume
  try:
    cfg, source, mesh = stages.setup(cd, workdir)
    assert abs(source.scale - meta['scale']) < 1e-6 * meta['scale'], (source.scale, meta['scale'])
    log(f'ours {arch}: {args.steps} steps x {args.batch_size}, lr {args.lr}, devices '
        f'{jax.device_count()} ({jax.default_backend()})')
    t0 = time.perf_counter()
    l1, res, stage = level1_lib.train(cfg, source, mesh, workdir)
    ev = l1.ev
    wall = time.perf_counter() - t0
    stage.close()
    p = {k: np.asarray(jax.device_get(v)) for k, v in res.state.params['level1'].items()}
    thr = float(res.state.threshold['level1'])
    since = np.asarray(jax.device_get(res.state.since_fired['level1']))
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  s1 = cfg.level1
  if s1.dead_tokens != schedule(args)['dead_tokens']:
    raise RuntimeError(f'csae_jax resolved dead_tokens={s1.dead_tokens}, the benchmark assumed '
                       f'{schedule(args)["dead_tokens"]}; update schedule()')
  shared = shared_eval(p, x_eval, arch, args.k, thr)
  out = {'library': 'csae_jax', 'arch': arch, 'wall_s': wall, **shared,
         'own_eval': {k: ev[k] for k in ('fvu', 'l0', 'dead_frac', 'n_rows')},
         'threshold': thr if arch != 'topk' else None,
         'train_dead_frac': float(np.mean(since >= s1.dead_tokens)),
         'settings': {'auxk_weight': s1.auxk_weight, 'k_aux': s1.k_aux,
                      'dead_tokens': s1.dead_tokens, 'b_dec_init': s1.b_dec_init,
                      'decoder_init': s1.decoder_init, 'threshold_start': s1.threshold_start,
                      'threshold_decay': s1.threshold_decay, 'k_anneal_frac': s1.k_anneal_frac}}
  log(f'ours {arch}: {wall:.1f}s, held-out fvu {shared["fvu"]:.4f} l0 {shared["l0"]:.2f} dead '
      f'{shared["dead_frac"]:.4f} (own eval fvu {ev["fvu"]:.4f})')
  return out


def run_saelens(args, arch: str, work: str, x_eval: np.ndarray) -> dict:
  sched = schedule(args)
  out_dir = os.path.join(work, f'saelens_{arch}')
  shutil.rmtree(out_dir, ignore_errors=True)
  cmd = [venv_python(), os.path.join(HERE, '_saelens_side.py'), '--arch', ARCHS[arch],
         '--work', work, '--out', out_dir, '--n_latents', str(args.n_latents), '--k', str(args.k),
         '--lr', str(args.lr), '--warmup_steps', str(sched['warmup_steps']),
         '--decay_steps', str(sched['decay_steps']),
         '--dead_feature_window', str(args.saelens_dead_window or sched['dead_steps']),
         '--threads', str(args.threads), '--seed', str(args.seed)]
  log(f'saelens {arch}: ' + ' '.join(cmd[1:]))
  subprocess.run(cmd, check=True)
  m = json.load(open(os.path.join(out_dir, 'metrics.json')))
  w = dict(np.load(os.path.join(out_dir, 'weights.npz')))
  shared = shared_eval(w, x_eval, arch, args.k, w.get('threshold'))
  out = {'library': 'sae_lens', 'arch': arch, 'wall_s': m['wall_s'], **shared,
         'own_eval': m['own_eval'], 'threshold': m.get('threshold'),
         'train_dead_frac': m['trainer_dead_frac'], 'inference_class': m['inference_class'],
         'versions': {'sae_lens': m['sae_lens_version'], 'torch': m['torch_version']},
         'dead_feature_window_steps': m['dead_feature_window'], 'settings': m['config']}
  log(f'saelens {arch}: {m["wall_s"]:.1f}s, held-out fvu {shared["fvu"]:.4f} l0 '
      f'{shared["l0"]:.2f} dead {shared["dead_frac"]:.4f}')
  return out


# ---------------------------------------------------------------------------------------------
# Report


def verdicts(rows: list[dict], k: int) -> list[dict]:
  out = []
  for arch in ARCHS:
    ours = next((r for r in rows if r['arch'] == arch and r['library'] == 'csae_jax'), None)
    peer = next((r for r in rows if r['arch'] == arch and r['library'] == 'sae_lens'), None)
    if ours is None or peer is None:
      continue
    # Under each library's own inference rule: no worse FVU (+ margin), bought with no more
    # active latents (L0 at most SAELens's + tolerance: a lower L0 only makes FVU harder), and no
    # more never-firing latents on the held-out rows ...
    fvu_ok = ours['fvu'] <= peer['fvu'] + FVU_MARGIN
    l0_ok = ours['l0'] <= peer['l0'] + L0_TOLERANCE * k
    dead_ok = ours['dead_frac'] <= peer['dead_frac']
    # ... and at exactly equal L0 (= k): TopK by construction; BatchTopK with both thresholds
    # calibrated on the held-out rows, so neither library's threshold estimate decides it.
    at_k_ok = ours['fvu_at_k'] <= peer['fvu_at_k'] + FVU_MARGIN
    out.append({'arch': arch, 'pass': bool(fvu_ok and l0_ok and dead_ok and at_k_ok),
                'fvu_ok': bool(fvu_ok), 'dead_ok': bool(dead_ok), 'l0_ok': bool(l0_ok),
                'fvu_at_k_ok': bool(at_k_ok),
                'fvu_at_k_ours': ours['fvu_at_k'], 'fvu_at_k_saelens': peer['fvu_at_k'],
                'fvu_ours': ours['fvu'], 'fvu_saelens': peer['fvu'],
                'dead_ours': ours['dead_frac'], 'dead_saelens': peer['dead_frac'],
                'l0_ours': ours['l0'], 'l0_saelens': peer['l0']})
  return out


def markdown(rows: list[dict], checks: list[dict], info: dict) -> str:
  lines = ['| arch | library | FVU | L0 | dead frac | wall s | FVU at L0=k | '
           'own-eval FVU / L0 | train dead frac |',
           '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
  for r in rows:
    lines.append(f"| {r['arch']} | {r['library']} | {r['fvu']:.4f} | {r['l0']:.2f} | "
                 f"{r['dead_frac']:.4f} | {r['wall_s']:.1f} | {r['fvu_at_k']:.4f} | "
                 f"{r['own_eval']['fvu']:.4f} / {r['own_eval']['l0']:.2f} | "
                 f"{r['train_dead_frac']:.4f} |")
  lines.append('')
  for c in checks:
    why = []
    why.append(f"FVU {c['fvu_ours']:.4f} vs {c['fvu_saelens']:.4f} + {FVU_MARGIN}: "
               f"{'ok' if c['fvu_ok'] else 'NO'}")
    why.append(f"dead {c['dead_ours']:.4f} vs {c['dead_saelens']:.4f}: "
               f"{'ok' if c['dead_ok'] else 'NO'}")
    why.append(f"L0 {c['l0_ours']:.2f} vs {c['l0_saelens']:.2f} + {L0_TOLERANCE:.0%} of k: "
               f"{'ok' if c['l0_ok'] else 'NO'}")
    if c['arch'] != 'topk':
      why.append(f"at L0 = k (thresholds calibrated on the held-out rows): FVU "
                 f"{c['fvu_at_k_ours']:.4f} vs {c['fvu_at_k_saelens']:.4f} + {FVU_MARGIN}: "
                 f"{'ok' if c['fvu_at_k_ok'] else 'NO'}")
    lines.append(f"- **{c['arch']}: {'PASS' if c['pass'] else 'FAIL'}** — " + '; '.join(why))
  lines.append('')
  lines.append(f"Settings: {json.dumps(info['settings'])}  ")
  lines.append(f"Versions: {json.dumps(info['versions'])}; csae_jax commit "
               f"{info['git']['commit']}{' (package modified)' if info['git']['package_dirty'] else ''}  ")
  lines.append(f"Date: {info['date']}; machine: {info['machine']}; load average at start / end: "
               f"{info['load_start']} / {info['load_end']}; total {info['total_wall_s']:.0f} s  ")
  lines.append(f"Command: `{info['command']}`")
  return '\n'.join(lines) + '\n'


def git_state() -> dict:
  """The commit measured, and whether the package or configs differed from it."""
  def git(*a):
    r = subprocess.run(['git', '-C', ROOT, *a], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ''
  dirty = git('status', '--porcelain', '--', 'csae_jax', 'experiments')
  return {'commit': git('rev-parse', '--short', 'HEAD'), 'package_dirty': bool(dirty)}


def parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--steps', type=int, default=700, help='optimiser steps (both libraries)')
  p.add_argument('--batch_size', type=int, default=1024, help='inputs per step (both)')
  p.add_argument('--lr', type=float, default=2e-3, help='peak Adam LR (both; csae_jax default)')
  p.add_argument('--out', default=os.path.join(HERE, 'results'), help='results directory')
  p.add_argument('--d', type=int, default=256, help='activation dimension (synthetic source)')
  p.add_argument('--n_parents', type=int, default=16, help='synthetic parents (x4 children)')
  p.add_argument('--n_latents', type=int, default=4096)
  p.add_argument('--k', type=int, default=32)
  p.add_argument('--holdout_rows', type=int, default=16384, help='held-out evaluation rows')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--threads', type=int, default=2, help='torch threads for SAELens')
  p.add_argument('--saelens_dead_window', type=int, default=0,
                 help="SAELens dead_feature_window in steps; 0 = match csae_jax's dead_tokens "
                      "(its own default is 1000 steps)")
  p.add_argument('--archs', default='topk,batch_topk')
  p.add_argument('--libs', default='ours,saelens')
  p.add_argument('--work', default='', help='scratch dir for the activations and SAELens outputs, '
                                            'kept and reused when it matches (default: a temp dir, '
                                            'deleted at the end; regenerating takes seconds)')
  return p.parse_args()


def main():
  args = parse()
  archs = [a for a in args.archs.split(',') if a]
  libs = [l for l in args.libs.split(',') if l]
  for a in archs:
    if a not in ARCHS:
      raise SystemExit(f'--archs: unknown {a!r}; known: {", ".join(ARCHS)}')
  os.makedirs(args.out, exist_ok=True)
  work = os.path.abspath(args.work) if args.work else tempfile.mkdtemp(prefix='peer_quality_')
  t_start = time.perf_counter()
  load_start = [round(v, 2) for v in os.getloadavg()]
  if load_start[0] > 0.5 * (os.cpu_count() or 1):
    log(f'WARNING: load average {load_start} on {os.cpu_count()} cores: other processes share '
        f'the CPU, so wall times are inflated (the quality numbers are not affected)')
  versions = {'python': platform.python_version()}
  if 'saelens' in libs:
    versions.update(ensure_saelens_venv())
    log(f'SAELens venv: sae_lens {versions["sae_lens"]}, torch {versions["torch"]}')
  import jax
  versions['jax'] = jax.__version__
  meta = prepare_data(args, work)
  x_eval = np.load(os.path.join(work, 'eval.npy'))
  sched = schedule(args)
  rows = []
  for arch in archs:
    if 'ours' in libs:
      rows.append(run_ours(args, arch, meta, x_eval))
    if 'saelens' in libs:
      rows.append(run_saelens(args, arch, work, x_eval))
  checks = verdicts(rows, args.k)
  info = {'date': datetime.datetime.now().strftime('%Y-%m-%d %H:%M'),
          'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores',
          'command': 'python ' + ' '.join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
          'versions': versions, 'git': git_state(),
          'settings': {'d': args.d, 'n_latents': args.n_latents, 'k': args.k,
                       'steps': args.steps, 'batch_size': args.batch_size, 'lr': args.lr,
                       'tokens': args.steps * args.batch_size, 'eval_rows': meta['n_eval'],
                       'true_atoms': meta['true_atoms'], **sched,
                       'saelens_dead_window_steps': args.saelens_dead_window
                       or sched['dead_steps']},
          'total_wall_s': round(time.perf_counter() - t_start, 1),
          'load_start': load_start, 'load_end': [round(v, 2) for v in os.getloadavg()]}
  md = markdown(rows, checks, info)
  with open(os.path.join(args.out, 'peer_quality.json'), 'w') as f:
    json.dump({**info, 'rows': rows, 'checks': checks}, f, indent=1, default=float)
  with open(os.path.join(args.out, 'peer_quality.md'), 'w') as f:
    f.write(md)
  if not args.work:
    shutil.rmtree(work, ignore_errors=True)
  print('\n' + md)
  log(f'total {info["total_wall_s"]:.0f}s; wrote {args.out}/peer_quality.json and .md')


if __name__ == '__main__':
  main()
