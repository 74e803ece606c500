"""8 fake CPU devices for every test (sharded code paths run as on a pod slice), and a short
collective timeout so a deadlock fails fast instead of hanging the suite."""

import os

os.environ['XLA_FLAGS'] = ' '.join([
    os.environ.get('XLA_FLAGS', ''),
    '--xla_force_host_platform_device_count=8',
    '--xla_cpu_collective_call_terminate_timeout_seconds=10',
]).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import pytest  # noqa: E402


@pytest.fixture(scope='session')
def n_devices() -> int:
  return len(jax.devices())


@pytest.fixture(scope='session')
def cli_reference(tmp_path_factory):
  """The tiny CLI pipeline run once, 1 process with 2 devices: (workdir, copy of its export)."""
  from tests import cli_runs  # pylint: disable=g-import-not-at-top
  return cli_runs.reference(tmp_path_factory.mktemp('cli_reference'))
