"""The level-1 step as `python -m experiments.run` runs it: the stage's own clock, both host-memory settings.

    python -m benchmarks.run_step_clock --config first --reps 3

Runs the real command line (`experiments.run`, staged CSAE, BatchTopK level 1 at the sizes of
benchmarks/train_throughput.py's --config) on exported random rows, for --steps LO,HI level-1
steps, and reads the level-1 stage's elapsed time at its last step from WD/level1/history.jsonl.
(HI - LO) / (HI - LO steps) is then the seconds per step with compilation, the first steps and
the stage's setup cancelled. The run is stopped once level 1 has logged its last step: level 2,
the evaluation and the report (minutes) do not bear on the step and their noise would hide it.
Each repetition runs both `--retain_host_memory` (the default) and `--noretain_host_memory`,
interleaved, so the two settings see the same minutes of a shared machine. Writes
benchmarks/results/run_step_clock_<config>_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import _venvs, train_throughput  # noqa: E402

MODES = {'retained host memory (default)': [], 'glibc defaults (--noretain_host_memory)':
         ['--noretain_host_memory']}


def write_rows(path: str, rows: int, d: int, parts: int = 2) -> None:
  """Random activations (about unit row norm) as exported float32 shards."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from csae_jax.sources import arrays  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  chunks = (rng.standard_normal((rows // parts, d), dtype=np.float32) / np.sqrt(d)
            for _ in range(parts))
  arrays.write_shards(path, chunks, rows_per_shard=rows // parts)


def stage_clock(data: str, workdir: str, sizes: tuple, steps: int, extra: list[str],
                timeout: float) -> float:
  """Level-1 elapsed seconds at its last step of one `experiments.run` (stopped right after)."""
  d, n, k, batch = sizes
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, '-m', 'experiments.run', f'--workdir={workdir}',
         f'--config.data.path={data}', '--config.level1.arch=batch_topk',
         f'--config.level1.n_latents={n}', f'--config.level1.k={k}',
         f'--config.train.batch_size={batch}', f'--config.train.steps={steps}',
         '--config.train.warmup_steps=1', '--config.level2.steps=10',
         '--config.level2.restarts=1', f'--config.data.eval_rows={batch}'] + extra
  history = os.path.join(workdir, 'level1', 'history.jsonl')
  with tempfile.TemporaryFile('w+') as log:
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    t0 = time.time()
    try:
      while True:
        time.sleep(0.5)
        if os.path.exists(history):
          with open(history) as f:
            rows = [json.loads(line) for line in f if line.strip()]
          if rows and rows[-1]['step'] == steps:
            return rows[-1]['elapsed_s']
        if p.poll() is not None:
          log.seek(0)
          tail = log.read()[-2000:]
          raise RuntimeError(f'experiments.run exited {p.returncode} before level 1 logged step '
                             f'{steps}:\n{tail}')
        if time.time() - t0 > timeout:
          raise RuntimeError(f'level 1 did not reach step {steps} in {timeout:.0f} s')
    finally:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def markdown(res: dict) -> str:
  d, n, k, batch = res['sizes']
  lo, hi = res['steps']
  lines = [f'`python -m experiments.run`, BatchTopK level 1, d {d}, n {n}, k {k}, batch {batch}, '
           f'on {res["rows"]} random rows; the level-1 stage\'s elapsed time at step {lo} and '
           f'{hi} ({res["reps"]} interleaved repetitions, {res["device"]}, {os.cpu_count()} '
           f'cores); seconds per step = (t{hi} - t{lo}) / {hi - lo}.', '',
           f'| host memory | t{lo} s | t{hi} s | s / step (each) | s / step (median) |',
           '|---|---|---|---|---|']
  for mode, r in res['modes'].items():
    lines.append(f"| {mode} | {', '.join(f'{v:.2f}' for v in r['t_lo'])} | "
                 f"{', '.join(f'{v:.2f}' for v in r['t_hi'])} | "
                 f"{', '.join(f'{v:.3f}' for v in r['s_per_step'])} | "
                 f"{r['s_per_step_median']:.3f} |")
  return '\n'.join(lines) + '\n'


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', choices=sorted(train_throughput.CONFIGS), default='first')
  ap.add_argument('--steps', default='4,20', help='LO,HI level-1 steps')
  ap.add_argument('--reps', type=int, default=3)
  ap.add_argument('--rows', type=int, default=81920, help='random rows exported as the data')
  ap.add_argument('--timeout', type=float, default=900, help='seconds per run')
  ap.add_argument('--out', default=os.path.join(HERE, 'results'))
  args = ap.parse_args()
  lo, hi = (int(v) for v in args.steps.split(','))
  if not 0 < lo < hi:
    raise SystemExit(f'--steps={args.steps}: need 0 < LO < HI')
  sizes = train_throughput.CONFIGS[args.config]
  tmp = tempfile.mkdtemp(prefix='run_step_clock_')
  try:
    data = os.path.join(tmp, 'data')
    write_rows(data, args.rows, sizes[0])
    modes = {m: {'t_lo': [], 't_hi': []} for m in MODES}
    for rep in range(args.reps):
      for mode, extra in MODES.items():
        for key, steps in (('t_lo', lo), ('t_hi', hi)):
          t = stage_clock(data, os.path.join(tmp, 'wd'), sizes, steps, extra, args.timeout)
          modes[mode][key].append(round(t, 3))
          _venvs.log(f'rep {rep} {mode}: level 1 at step {steps} after {t:.2f} s')
    for r in modes.values():
      r['s_per_step'] = [round((b - a) / (hi - lo), 4) for a, b in zip(r['t_lo'], r['t_hi'])]
      r['s_per_step_median'] = statistics.median(r['s_per_step'])
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  from benchmarks import _results  # pylint: disable=g-import-not-at-top  (imports jax)
  res = {**_results.device(), 'config': args.config, 'sizes': list(sizes), 'rows': args.rows,
         'steps': [lo, hi], 'reps': args.reps, 'modes': modes}
  _results.save(res, args.out, f'run_step_clock_{args.config}', markdown(res))


if __name__ == '__main__':
  main()
