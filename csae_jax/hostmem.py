"""Keep freed host memory in the process: no fresh pages for every step's buffers (glibc).

XLA CPU allocates each execution's temporary buffer (a step's gradients, the encoder's
[B, n] output: 0.9 GB at d 2560, n 20000, batch 1024) with malloc from its worker threads.
glibc serves requests that large with mmap and returns them with munmap on free, and threads
other than the main one allocate from arenas that cannot grow past 64 MB, so every step
maps ~0.9 GB of new pages and the kernel faults in and zeroes each 4 KB page on first touch:
measured 219,000 page faults a step at that size, and the step takes 0.85 s instead of 0.49 s
on a 2-core CPU (benchmarks/train_throughput.py times it both ways).

`retain_freed_memory` sets, with glibc's own `mallopt` (documented knobs, no preload):
  M_ARENA_MAX 1        every thread allocates from the main arena, which can grow (brk);
  M_MMAP_MAX 0         no request is served by mmap, so a freed buffer stays in the heap;
  M_TRIM_THRESHOLD -1  the heap's free top is never handed back ("-1 disables trimming").
The next step's buffers then reuse the same resident pages. The cost: resident memory never
shrinks and can exceed the old peak where freed chunks do not fit later requests (peak RSS
1.7 -> 2.3 GiB for the step at d 1024, n 16384, batch 4096), and threads share one arena's
lock (XLA's workers allocate few, large buffers). Accelerator memory is not touched.

It must run before JAX starts its backend: threads that have already allocated keep their
arena. `python -m experiments.run` calls it first thing (`--retain_host_memory`, default on);
a notebook or script calls it before its first jax.devices() or array. Elsewhere (not Linux,
or a libc other than glibc, e.g. musl) it changes nothing and says so; under a preloaded
allocator (tcmalloc, jemalloc) glibc's settings are simply unused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys

# glibc's <malloc.h> parameter numbers
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

_SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
_state: dict = {}


def backend_started() -> bool:
  """Whether JAX has started a backend in this process (its worker threads exist)."""
  xb = sys.modules.get('jax._src.xla_bridge')
  return bool(xb is not None and getattr(xb, '_backends', None))


def retain_freed_memory() -> dict:
  """Applies the settings above once per process. Returns {'applied': bool, 'reason': str,
  'late': bool}; 'late': True when JAX's backend had already started (its threads keep their own arenas, so
  the largest buffers may still be mapped fresh)."""
  if _state:
    return dict(_state)
  _state['late'] = backend_started()
  if sys.platform != 'linux' or platform.libc_ver()[0] != 'glibc':
    _state.update(applied=False, reason=f'not glibc ({sys.platform}, {platform.libc_ver()[0]!r}): '
                  'the allocator is left as it is')
    return dict(_state)
  libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  libc.mallopt.restype = ctypes.c_int
  failed = [param for param, value in _SETTINGS if libc.mallopt(param, value) != 1]
  if failed:
    _state.update(applied=False, reason=f'mallopt refused parameters {failed}')
  else:
    _state.update(applied=True, reason='glibc: one arena, no mmap, no trim')
  return dict(_state)
