"""csae_jax.hostmem: with glibc keeping freed memory, a jitted step stops faulting in fresh pages.

Each case runs in a fresh process (the settings must precede JAX's backend) and counts the minor
page faults of four calls of a jitted function whose temporary buffers are tens of MB, after two
warm-up calls: without the settings XLA CPU maps those buffers anew on every call."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROBE = textwrap.dedent('''
    import json, resource, sys
    state = None
    if sys.argv[1] in ('early', 'late'):
      if sys.argv[1] == 'late':
        import jax; jax.numpy.ones(2).block_until_ready()
      from csae_jax import hostmem
      state = hostmem.retain_freed_memory()
      assert hostmem.retain_freed_memory() == state  # once per process
    import jax, jax.numpy as jnp
    x = jnp.ones((1024, 8192), jnp.float32)  # 32 MiB
    f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T) @ x) + jnp.sum(jnp.cumsum(x, 0) * 2))
    temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
    for _ in range(2):
      f(x).block_until_ready()
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
      f(x).block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 4
    print(json.dumps({'faults_per_call': faults, 'temp_pages': temp / 4096, 'state': state}))
''')


def probe(mode: str) -> dict:
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)  # one device, as a plain run
  r = subprocess.run([sys.executable, '-c', PROBE, mode], capture_output=True, text=True,
                     env=env, cwd=ROOT, timeout=300, check=True)
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_retained_memory_stops_the_page_faults_of_every_step():
  off, on = probe('off'), probe('early')
  if platform.libc_ver()[0] != 'glibc':  # elsewhere the allocator is left as it is, and says so
    assert not on['state']['applied'] and 'not glibc' in on['state']['reason'], on
    return
  assert on['state'] == {'applied': True, 'reason': 'glibc: one arena, no mmap, no trim',
                         'late': False}
  # without: every call faults in at least its temporary buffers afresh
  assert off['faults_per_call'] >= 0.5 * off['temp_pages'], off
  # with: the freed pages are reused (a few faults for small, new allocations remain)
  assert on['faults_per_call'] <= 0.1 * off['faults_per_call'], (on, off)


def test_applied_after_the_backend_started_says_it_is_late():
  late = probe('late')
  assert late['state']['late'], late
  assert late['state']['applied'] == (platform.libc_ver()[0] == 'glibc'), late


def test_not_glibc_leaves_the_allocator_alone(monkeypatch):
  from csae_jax import hostmem  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(hostmem, '_state', {})
  monkeypatch.setattr(hostmem.platform, 'libc_ver', lambda: ('', ''))
  monkeypatch.setattr(hostmem.ctypes, 'CDLL', lambda *a: pytest.fail('mallopt was called'))
  state = hostmem.retain_freed_memory()
  assert not state['applied'] and 'not glibc' in state['reason'], state
