"""Read throughput of the activation stream (`sources.arrays.ArraySource`) against the disk.

    python -m benchmarks.stream_read --gb=4 --out=/tmp/stream     # ~1 min on this machine

Writes `--gb` of random float16 activation shards (`write_shards`, d = `--d`), then, in this one
process and on the same files:
  disk sequential   the shards read front to back in 64 MiB `readinto` calls: the disk's
                    sequential speed, the ceiling of any reader;
  stream cold       `ArraySource.batch(step)` for consecutive steps (shuffled rows from every
                    shard, scaled, float32 out), GB/s of stored bytes read;
  stream warm       the same steps again, the shards now in the page cache: the reader's own
                    cost (gather + convert + scale) without the disk;
  madv_random       the cold pass again with MADV_RANDOM (no read-ahead) on the maps: fewer
                    bytes per batch, one I/O per row;
  overlap           steps of a stand-in device step (a sleep as long as a cached read) with
                    the read in line, then through the loop's background reader;
  order only        the batch's row ids alone (`global_indices`), vectorised Feistel, and the
                    grain `index_shuffle` it replaced (per-row Python), when grain is installed.
"Cold" means the files' pages were dropped from the page cache first (fsync, then
posix_fadvise DONTNEED), so a store larger than RAM reads like this. The stream reads
shuffled rows, so its cold speed is bounded by the disk's random-read rate (a d = 1024 float16 row
is 2 KiB, half a page) rather than by the sequential speed. Writes
<out>/stream_read.json and .md.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from csae_jax.sources import arrays  # pylint: disable=g-import-not-at-top

GB = 1e9


def drop_cache(paths: list[str]) -> None:
  for p in paths:
    fd = os.open(p, os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def sequential_read(paths: list[str]) -> tuple[float, int]:
  buf = bytearray(64 << 20)
  n = 0
  t0 = time.perf_counter()
  for p in paths:
    with open(p, 'rb', buffering=0) as f:
      while True:
        got = f.readinto(buf)
        if not got:
          break
        n += got
  return time.perf_counter() - t0, n


def stream_read(src: arrays.ArraySource, steps: int, start: int = 0) -> float:
  t0 = time.perf_counter()
  for s in range(start, start + steps):
    src.batch(s)
  return time.perf_counter() - t0


def overlap(src: arrays.ArraySource, steps: int, start: int, step_s: float) -> dict:
  """The training loop's background reader (`loop.prefetch`) against reading in line, with a
  stand-in step of `step_s` seconds (a sleep: the device works while the host waits). On
  cached rows, so the comparison is the overlap, not the disk."""
  from csae_jax.train import loop  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  for s in range(start, start + steps):
    src.batch(s)
    time.sleep(step_s)
  inline = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in loop.prefetch(src.batch, range(start, start + steps)):
    time.sleep(step_s)
  background = time.perf_counter() - t0
  return {'overlap_step_ms': 1e3 * step_s, 'inline_ms_per_step': 1e3 * inline / steps,
          'prefetch_ms_per_step': 1e3 * background / steps}


def order_only(src: arrays.ArraySource, steps: int) -> dict:
  t0 = time.perf_counter()
  for s in range(steps):
    src.global_indices(s)
  out = {'feistel_ms_per_batch': 1e3 * (time.perf_counter() - t0) / steps}
  try:
    import grain  # pylint: disable=g-import-not-at-top
  except ImportError:
    return out
  ds = grain.MapDataset.range(src.n_train).shuffle(seed=1).repeat(None).batch(src.batch_size)
  n = max(1, steps // 4)
  t0 = time.perf_counter()
  for s in range(n):
    ds[s]
  out['grain_index_shuffle_ms_per_batch'] = 1e3 * (time.perf_counter() - t0) / n
  out['speedup'] = out['grain_index_shuffle_ms_per_batch'] / out['feistel_ms_per_batch']
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--out', required=True, help='folder for the shards and the results')
  p.add_argument('--gb', type=float, default=4.0, help='stored bytes to write')
  p.add_argument('--d', type=int, default=1024)
  p.add_argument('--rows_per_shard', type=int, default=262144)
  p.add_argument('--batch_size', type=int, default=4096)
  p.add_argument('--stream_gb', type=float, default=1.0, help='bytes the stream reads per pass')
  args = p.parse_args(argv)
  data = os.path.join(args.out, 'shards')
  row_bytes = 2 * args.d
  n_rows = int(args.gb * GB // row_bytes)
  have = arrays.discover(data) if os.path.isdir(data) and os.listdir(data) else []
  if sum(f.n_rows for f in have) != n_rows or any(f.d != args.d for f in have):
    rng = np.random.default_rng(0)
    chunks = (rng.standard_normal((min(65536, n_rows - lo), args.d), np.float32)
              for lo in range(0, n_rows, 65536))
    arrays.write_shards(data, chunks, rows_per_shard=args.rows_per_shard, dtype=np.float16)
  paths = [f.path for f in arrays.discover(data)]
  stored = sum(os.path.getsize(q) for q in paths)

  drop_cache(paths)
  t_seq, n_seq = sequential_read(paths)
  src = arrays.ArraySource(data, batch_size=args.batch_size, seed=0, holdout_rows=0, scale=1.0)
  steps = max(1, int(args.stream_gb * GB // (args.batch_size * row_bytes)))
  drop_cache(paths)
  t_cold = stream_read(src, steps)
  t_warm = stream_read(src, steps)  # the same rows, now cached
  for mm in src._maps:  # pylint: disable=protected-access
    mm._mmap.madvise(mmap.MADV_RANDOM)  # no read-ahead: one page per faulted row, for the ratio
  drop_cache(paths)
  t_random = stream_read(src, steps, start=steps)  # other rows: none cached below the VM
  read = steps * args.batch_size * row_bytes
  result = {
      'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores',
      'stored_gb': stored / GB, 'files': len(paths), 'd': args.d, 'dtype': 'float16',
      'batch_size': args.batch_size, 'stream_steps': steps, 'stream_gb': read / GB,
      'disk_sequential_gb_s': n_seq / GB / t_seq,
      'stream_cold_gb_s': read / GB / t_cold, 'stream_warm_gb_s': read / GB / t_warm,
      'stream_cold_madv_random_gb_s': read / GB / t_random,
      'stream_cold_rows_s': steps * args.batch_size / t_cold,
      'stream_warm_rows_s': steps * args.batch_size / t_warm,
      **order_only(src, max(8, steps)),
      **overlap(src, steps, 0, t_warm / steps),  # a step as long as a cached read
  }
  result['cold_vs_sequential'] = result['stream_cold_gb_s'] / result['disk_sequential_gb_s']
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'stream_read.json'), 'w') as f:
    json.dump(result, f, indent=1)
  md = ['| measure | value |', '|---|---|'] + [
      f'| {k} | {v:.3g} |' if isinstance(v, float) else f'| {k} | {v} |'
      for k, v in result.items()]
  with open(os.path.join(args.out, 'stream_read.md'), 'w') as f:
    f.write('\n'.join(md) + '\n')
  print('\n'.join(md))


if __name__ == '__main__':
  main()
