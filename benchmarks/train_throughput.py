"""Level-1 train-step throughput: ours (dense and k-sparse step) vs SAELens and sparsify, one run.

    python -m benchmarks.train_throughput --config first   # d 1024, n 16384, k 32, batch 4096
    python -m benchmarks.train_throughput --config paper   # d 2560, n 20000, k 6, batch 1024
    python -m benchmarks.train_throughput --config small   # d 256, n 4096, k 32, batch 512

Every step runs in its own process (ours: `python -m benchmarks.train_throughput --one ...`;
the peers in their own venvs, benchmarks/_venvs.py, through _peer_step_side.py), so each one's
peak resident memory is its own. All run with AuxK on (every latent counted dead) on the same
random activations, each for --steps timed steps after one warm-up step, the median step
reported (kept short: the machine is shared; the median moves with no single slow step), in
three regimes: `alive` (no latent dead, AuxK skipped), `some` (1/32 of the latents held dead,
as in a healthy run once the dead-latent window has passed) and `dead` (AuxK on, every latent
counted dead: AuxK's k_aux = d / 2 latents per row, the worst case). Reported, all measured in
this run:
  activations/s and the ratio to the fastest peer's step of the same arch;
  FLOP utilisation: useful FLOPs / time / the f32 matmul peak measured here on the step's own
    encoder GEMM shape. Useful FLOPs are what a k-sparse step must do: the encoder forward
    2 B d n, plus 8 d per selected pair (decode, dv, dW_dec, dW_enc), for the B k main pairs
    and the B k_aux AuxK pairs;
  compile time (ours; the peers' first step instead) and peak resident memory.
Host memory: ours runs as `python -m experiments.run` does, with glibc keeping freed memory
(csae_jax/hostmem.py: no fresh pages for each step's buffers), plus one k-sparse row with glibc's
defaults; each peer runs both ways (the setting helps their steps too), and the ratio to the
fastest peer is against the faster of the two (vs_peer_as_shipped: against the defaults only).
Writes benchmarks/results/train_throughput_<config>_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import _venvs  # noqa: E402

CONFIGS = {'first': (1024, 16384, 32, 4096), 'paper': (2560, 20000, 6, 1024),
           'small': (256, 4096, 32, 512)}
PEERS = {'saelens': ('sae-lens==6.54.12', 'sae_lens'), 'sparsify': ('eai-sparsify==1.3.3', 'sparsify')}
# Fraction of the latents dead per regime ('some': held dead, a healthy run's few dead latents).
DEAD_FRACTION = {'alive': 0.0, 'some': 1 / 32, 'dead': 1.0}
ARCHS = {'topk': {'saelens': 'topk', 'sparsify': 'topk'}, 'batch_topk': {'saelens': 'batchtopk'}}


def useful_flops(d: int, n: int, k: int, batch: int, regime: str = 'dead') -> float:
  k_aux = min(d // 2, round(DEAD_FRACTION[regime] * n))  # AuxK's latents per row
  return 2.0 * batch * d * n + 8.0 * batch * (k + k_aux) * d


def matmul_peak(d: int, n: int, batch: int, reps: int = 3, dtype: str = 'float32') -> float:
  """Best GFLOP/s of jnp.matmul at the step's encoder shape [batch, d] x [d, n] (bfloat16:
  float32 accumulation, as the step's bf16 matmuls)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (batch, d), dtype)
  b = jax.random.normal(jax.random.key(1), (d, n), dtype)
  f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  jax.block_until_ready(f(a, b))
  best = float('inf')
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    best = min(best, time.perf_counter() - t0)
  return 2.0 * batch * d * n / best / 1e9


def one_ours(args) -> dict:
  host = None
  if args.retain_host_memory:  # before JAX starts (as experiments.run does)
    from csae_jax import hostmem  # pylint: disable=g-import-not-at-top
    host = hostmem.retain_freed_memory()
  from benchmarks import train_step_throughput  # pylint: disable=g-import-not-at-top
  r = train_step_throughput.measure(args.d, args.n, args.k, args.batch, args.dtype, args.sparse,
                                    args.steps, arch=args.arch,
                                    dead_tokens=0 if args.dead else None, warm=1,
                                    dead_frac=args.dead_frac)
  r['peak_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  r['host_memory'] = host
  return r


def run_json(cmd: list[str], timeout: float) -> dict:
  _venvs.log(' '.join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd))
  try:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  except subprocess.TimeoutExpired:
    return {'error': f'timed out after {timeout:.0f} s'}
  if r.returncode != 0:
    return {'error': r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f'rc {r.returncode}'}
  return json.loads(r.stdout.strip().splitlines()[-1])


def load() -> float:
  return round(os.getloadavg()[0], 2)


def markdown(res: dict) -> str:
  c = res['sizes']
  lines = [f"Level-1 step, d {c['d']}, n {c['n']}, k {c['k']}, batch {c['batch']}, f32 unless said; "
           f"{res['device']}, {os.cpu_count()} cores, load average {res['load_start']} -> "
           f"{res['load_end']} (shared machine: absolute figures are loaded ones; the ratios are "
           f"measured in the same run). f32 matmul peak here: {res['matmul_gflops']:.0f} GFLOP/s.",
           '', 'vs fastest peer: against the fastest peer step of the regime, the peers run both '
           'as shipped and with retained host memory (csae_jax/hostmem.py, as ours); as shipped: '
           'against the peers with glibc\'s defaults only.',
           '', '| regime | arch | step | s / step | activations / s | vs fastest peer | '
           'vs peer as shipped | FLOP util | compile s | peak RSS GiB |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for r in res['rows']:
    if 'error' in r:
      lines.append(f"| {r['regime']} | {r['arch']} | {r['step']} | {r['error']} | | | | | | |")
      continue
    ratio = lambda key: '' if r.get(key) is None else f'{r[key]:.2f}x'  # pylint: disable=cell-var-from-loop
    lines.append(f"| {r['regime']} | {r['arch']} | {r['step']} | {r['s_per_step']:.3f} | "
                 f"{r['acts_per_s']:.0f} | {ratio('vs_fastest_peer')} | "
                 f"{ratio('vs_peer_as_shipped')} | {100 * r['flop_util']:.1f}% | "
                 f"{r['compile_s']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} |")
  return '\n'.join(lines) + '\n'


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', choices=sorted(CONFIGS), default='first')
  ap.add_argument('--steps', type=int, default=5, help='timed steps per measurement (the median '
                  'is reported)')
  ap.add_argument('--libs', default='ours,saelens,sparsify')
  ap.add_argument('--timeout', type=float, default=900, help='seconds per measurement')
  ap.add_argument('--out', default=os.path.join(HERE, 'results'))
  ap.add_argument('--one', choices=('ours',), help=argparse.SUPPRESS)  # child: one step's JSON
  for name in ('d', 'n', 'k', 'batch'):
    ap.add_argument(f'--{name}', type=int, help=argparse.SUPPRESS)
  ap.add_argument('--arch', help=argparse.SUPPRESS)
  ap.add_argument('--sparse', type=int, help=argparse.SUPPRESS)
  ap.add_argument('--dead', type=int, default=1, help=argparse.SUPPRESS)
  ap.add_argument('--dtype', default='float32', help=argparse.SUPPRESS)
  ap.add_argument('--dead_frac', type=float, default=0.0, help=argparse.SUPPRESS)
  ap.add_argument('--regimes', default='alive,some,dead', help='alive: no latent dead (AuxK '
                  'skipped); some: 1/32 of the latents dead (held fixed); dead: every latent dead '
                  '(AuxK on, the worst case)')
  ap.add_argument('--bf16', type=int, default=1, help='also our k-sparse step with bfloat16 '
                  'matmuls (f32 accumulation and params)')
  ap.add_argument('--retain_host_memory', type=int, default=1, help=argparse.SUPPRESS)  # child
  args = ap.parse_args()
  if args.one:
    print(json.dumps(one_ours(args)))
    return
  d, n, k, batch = CONFIGS[args.config]
  libs = args.libs.split(',')
  load_start = load()
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import _results
  peak = matmul_peak(d, n, batch)
  _venvs.log(f'f32 matmul peak at [{batch}, {d}] x [{d}, {n}]: {peak:.0f} GFLOP/s (load {load()})')
  sizes = ['--d', str(d), '--n', str(n), '--k', str(k), '--batch', str(batch), '--steps',
           str(args.steps)]
  rows = []
  for regime in args.regimes.split(','):
    f = DEAD_FRACTION[regime]
    dead = int(f == 1.0)  # every latent dead: the children's --dead 1; a fraction: --dead_frac
    frac = ['--dead_frac', str(f)] if 0 < f < 1 else []
    for arch in ARCHS:
      if 'ours' in libs:
        # (sparse, dtype, retained host memory): ours as experiments.run runs it (retained), and
        # the k-sparse f32 step with glibc's defaults, to show what the setting is worth
        steps = ([(0, 'float32', 1), (1, 'float32', 1), (1, 'float32', 0)]
                 + ([(1, 'bfloat16', 1)] if args.bf16 else []))
        for sparse, dtype, retain in steps:
          r = run_json([sys.executable, '-m', 'benchmarks.train_throughput', '--one', 'ours',
                        '--arch', arch, '--sparse', str(sparse), '--dead', str(dead),
                        '--dtype', dtype, '--retain_host_memory', str(retain)] + sizes + frac,
                       args.timeout)
          name = 'ours, k-sparse' if sparse else 'ours, dense'
          rows.append({**r, 'arch': arch, 'regime': regime, 'retained': bool(retain),
                       'step': name + (', bf16 matmuls' if dtype != 'float32' else '')
                       + ('' if retain else ', glibc default malloc')})
      for lib, peer_arch in ARCHS[arch].items():
        if lib not in libs:
          continue
        pin, module = PEERS[lib]
        versions = _venvs.ensure_venv(lib, pin, module)
        # each peer as shipped (glibc's defaults) and with our retained host memory: the page
        # faults it removes are theirs too, so the goal's ratio is against the faster of both
        for retain in (0, 1):
          r = run_json([_venvs.venv_python(lib), os.path.join(HERE, '_peer_step_side.py'), '--lib',
                        lib, '--arch', peer_arch, '--dead', str(dead),
                        '--retain_host_memory', str(retain)] + sizes + frac, args.timeout)
          rows.append({**r, 'arch': arch, 'regime': regime, 'peer': True, 'retained': bool(retain),
                       'step': f'{lib} {versions[module]}'
                       + (', retained host memory' if retain else '')})
  for r in rows:
    if 'error' in r:
      continue
    if 'ms_per_step' in r:
      r['s_per_step'] = r['ms_per_step'] / 1e3
    else:
      r['compile_s'] = r['first_step_s']  # the peers' first step stands in for compile time
    r['acts_per_s'] = batch / r['s_per_step']
    flops = useful_flops(d, n, k, batch, r['regime'])
    r['flop_util'] = flops / r['s_per_step'] / (peak * 1e9)
  # vs the fastest peer step of the same regime (any arch: sparsify has no BatchTopK, and the
  # goal compares our BatchTopK step with the fastest peer step there is)
  # (vs_fastest_peer: the peers with retained host memory too; _as_shipped: glibc's defaults)
  for regime in args.regimes.split(','):
    for key, variants in (('vs_fastest_peer', (False, True)), ('vs_peer_as_shipped', (False,))):
      peer_s = [r['s_per_step'] for r in rows if r['regime'] == regime and r.get('peer')
                and 's_per_step' in r and r['retained'] in variants]
      for r in rows:
        if r['regime'] == regime and 's_per_step' in r:
          r[key] = min(peer_s) / r['s_per_step'] if peer_s else None
  res = {**_results.device(), 'config': args.config,
         'sizes': {'d': d, 'n': n, 'k': k, 'batch': batch}, 'steps': args.steps,
         'useful_gflop_per_step': {g: useful_flops(d, n, k, batch, g) / 1e9
                                   for g in ('alive', 'some', 'dead')}, 'matmul_gflops': peak, 'load_start': load_start,
         'load_end': load(), 'jax': jax.__version__, 'rows': rows}
  _results.save(res, args.out, f'train_throughput_{args.config}', markdown(res))


if __name__ == '__main__':
  main()
