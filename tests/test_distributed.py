"""csae_jax.distributed: which arguments join a cluster."""

import jax

from csae_jax import distributed


def test_num_processes_1_runs_alone_even_on_a_detected_cluster(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *a, **k: calls.append(a))
  distributed.initialize(None, 1, None)  # a sharded sweep's per-host run: no cluster joined
  assert calls == []
  distributed.initialize(None, None, None)  # the plain command: JAX's cluster detection runs
  distributed.initialize('127.0.0.1:1234', 2, 1)
  assert calls == [(), ('127.0.0.1:1234', 2, 1)]
