"""Latent-sharded level-1 step at size on fake CPU devices: bytes per device, compile and step time.

    python -m benchmarks.scaling                       # n1 in 16k, 65k, 262k, 1M on 1, 2, 4, 8
    python -m benchmarks.scaling --d 2048 --n1 1048576 --devices 8 --mem_budget_gib 0   # compile

Every device count runs in its own process (XLA fixes the fake device count per process:
XLA_FLAGS=--xla_force_host_platform_device_count=N), on a 1 x N mesh: the dictionary is split
N ways over 'model', the batch is replicated. Per (N, n1), measured in that process:
  state MiB/device   params + Adam moments + counters per device, from the abstract state's
                     shapes and shardings (`footprint.state_bytes`); nothing is built for it;
  XLA arg/temp MiB   `compiled.memory_analysis()` per device: arguments (must equal the state
                     shards + the batch) and temporaries of the step;
  compile s          lowering + XLA compile of the donated, sharded train step;
  step s             median of --steps steps after one warm-up, when the whole process (all N
                     fake devices: N x (arguments + temporaries)) fits in --mem_budget_gib; else
                     compile only, and the row says so.
Fake devices share this machine's cores, so step time across N is not a speed-up measurement:
it shows that the sharded program runs and what the collectives cost on one host.
Writes benchmarks/results/scaling_cpu.json and scaling_cpu.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

MiB = 1 << 20


def one(n_devices: int, n1s: list[int], d: int, batch: int, k: int, steps: int,
        budget: float) -> list[dict]:
  """Runs inside the process with `n_devices` fake devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np
  from csae_jax import config as config_lib, sharding, stages
  from csae_jax.train import footprint, optim
  from csae_jax.train import state as state_lib
  assert len(jax.devices()) == n_devices, jax.devices()
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=1, model=n_devices))
  rows = []
  for n1 in n1s:
    sae = config_lib.resolve_sae(config_lib.SAEConfig(arch='topk', n_latents=n1, k=k), d=d,
                                 n_latents=n1, k=k, steps=1000, batch_size=batch, key='level1')
    spec = stages.level_spec(sae, d, 1000)
    opt = optim.make_optimizer(1e-3, 1000, 10, 0.8, 1.0)
    # random decoder init, b_dec 0: jittable, so the state is built shard by shard
    sae = dataclasses.replace(sae, b_dec_init='zeros', decoder_init='random')
    init = lambda sae=sae, n1=n1: {'level1': stages.init_sae(jax.random.key(0), sae,
                                                             jnp.zeros((batch, d)))}
    cs = footprint.compile_step(mesh, {'level1': spec}, init, opt, (batch, d))
    mem = footprint.compiled_bytes(cs.compiled)
    state_b = footprint.state_bytes(cs.state)
    row = {'n_devices': n_devices, 'n1': n1, 'd': d, 'batch': batch, 'k': k,
           'state_mib_per_device': state_b / MiB,
           'state_mib_global': footprint.global_bytes(cs.state) / MiB,
           'xla_argument_mib': mem['argument'] / MiB, 'xla_temp_mib': mem['temp'] / MiB,
           'xla_alias_mib': mem['alias'] / MiB,
           'argument_equals_state_plus_batch': mem['argument'] == state_b + batch * d * 4,
           'lower_s': cs.lower_s, 'compile_s': cs.compile_s}
    process_gib = n_devices * (mem['argument'] + mem['temp']) / (1 << 30)
    row['process_gib_estimate'] = process_gib
    if process_gib > budget:
      row['step_s'] = None
      row['note'] = f'compile only: {process_gib:.1f} GiB for all {n_devices} devices > {budget} GiB'
    else:
      st = state_lib.create_sharded(mesh, init, opt)
      batch_sharding = sharding.named(mesh, 'batch', 'embed')
      x = jax.device_put(np.random.default_rng(0).standard_normal((batch, d), np.float32),
                         batch_sharding)
      times = []
      for i in range(steps + 1):
        t0 = time.perf_counter()
        st, metrics = cs.compiled(st, x)
        jax.block_until_ready(metrics['loss'])
        if i:
          times.append(time.perf_counter() - t0)
      row['step_s'] = statistics.median(times)
      row['step_times_s'] = times
      row['loss'] = float(metrics['loss'])
      del st
    row['peak_rss_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def table(rows: list[dict]) -> str:
  out = ['| devices | n1 | d | state MiB/device | XLA arg MiB/device | XLA temp MiB/device '
         '| compile s | step s | peak RSS MiB |',
         '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    step = f"{r['step_s']:.2f}" if r['step_s'] is not None else 'compile only'
    out.append(f"| {r['n_devices']} | {r['n1']} | {r['d']} | {r['state_mib_per_device']:.0f} | "
               f"{r['xla_argument_mib']:.0f} | {r['xla_temp_mib']:.0f} | "
               f"{r['lower_s'] + r['compile_s']:.1f} | {step} | {r['peak_rss_mib']:.0f} |")
  return '\n'.join(out)


PAPER_N1 = (20000, 65536, 262144, 1048576)
PAPER_D = (1024, 2048, 4096, 5120)


def paper_table(devices=(1, 8, 64)) -> str:
  """GiB per device of a level-1 train state (params + Adam + counters), analytic from shapes
  (`footprint.analytic_state_bytes`, checked against the compiled step in
  tests/train/test_scale_compile.py) for the paper's sizes."""
  from csae_jax.train import footprint  # pylint: disable=g-import-not-at-top
  head = ' | '.join(f'{m} device{"s" if m > 1 else ""}' for m in devices)
  out = [f'| n1 | d | {head} |', '|---|---|' + '---|' * len(devices)]
  for n1 in PAPER_N1:
    for d in PAPER_D:
      cells = ' | '.join(f'{footprint.analytic_state_bytes(n1, d, m) / (1 << 30):.3g}'
                         for m in devices)
      out.append(f'| {n1:,} | {d} | {cells} |')
  return '\n'.join(out)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--n1', default='16384,65536,262144,1048576')
  ap.add_argument('--devices', default='1,2,4,8')
  ap.add_argument('--d', type=int, default=1024)
  ap.add_argument('--batch', type=int, default=512)
  ap.add_argument('--k', type=int, default=32)
  ap.add_argument('--steps', type=int, default=2)
  # 60% of this machine's memory: the 262k step (11 GiB of arguments + temporaries) runs on a
  # 24 GiB machine; 1M stays compile only
  ram_gib = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / (1 << 30)
  ap.add_argument('--mem_budget_gib', type=float, default=round(0.6 * ram_gib, 1))
  ap.add_argument('--out', default=os.path.join(HERE, 'results'))
  ap.add_argument('--name', default='scaling_cpu')
  ap.add_argument('--one', type=int, default=0, help='internal: run one device count here')
  ap.add_argument('--paper_table', action='store_true',
                  help='print the analytic GiB/device table for the paper sizes and exit')
  a = ap.parse_args()
  if a.paper_table:
    print(paper_table())
    return
  n1s = [int(v) for v in a.n1.split(',')]
  if a.one:
    rows = one(a.one, n1s, a.d, a.batch, a.k, a.steps, a.mem_budget_gib)
    print('ROWS ' + json.dumps(rows))
    return
  rows = []
  load0 = os.getloadavg()
  for n in [int(v) for v in a.devices.split(',')]:
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=' '.join([
        os.environ.get('XLA_FLAGS', ''), f'--xla_force_host_platform_device_count={n}']).strip())
    cmd = [sys.executable, '-m', 'benchmarks.scaling', '--one', str(n), '--n1', a.n1,
           '--d', str(a.d), '--batch', str(a.batch), '--k', str(a.k), '--steps', str(a.steps),
           '--mem_budget_gib', str(a.mem_budget_gib)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if res.returncode:
      sys.exit(f'{" ".join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}')
    rows += json.loads([l for l in res.stdout.splitlines() if l.startswith('ROWS ')][-1][5:])
  result = {'command': ' '.join(['python -m benchmarks.scaling'] + sys.argv[1:]),
            'loadavg_start': load0, 'loadavg_end': os.getloadavg(), 'cpus': os.cpu_count(),
            'mesh': '1 x N (data x model)', 'rows': rows}
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, f'{a.name}.json'), 'w') as f:
    json.dump(result, f, indent=1)
  md = table(rows)
  with open(os.path.join(a.out, f'{a.name}.md'), 'w') as f:
    f.write(f"`{result['command']}`; load average {load0[0]:.1f} -> {os.getloadavg()[0]:.1f} on "
            f"{os.cpu_count()} CPUs; mesh 1 x N; batch {a.batch}, k {a.k}.\n\n{md}\n")
  print(md)


if __name__ == '__main__':
  main()
