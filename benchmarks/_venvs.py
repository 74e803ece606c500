"""Peer libraries in their own virtual environments (benchmarks/.venv_<name>), created on first use.

torch==2.13.0 is installed first (the CPU wheel on local disk; a bare `torch` pulls a CUDA build),
then the peer with torch pinned by a constraints file so the resolver cannot swap it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_PIN = 'torch==2.13.0'


def log(msg: str) -> None:
  print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)


def venv_dir(name: str) -> str:
  return os.path.join(HERE, f'.venv_{name}')


def venv_python(name: str) -> str:
  return os.path.join(venv_dir(name), 'bin', 'python')


def ensure_venv(name: str, pin: str, module: str) -> dict:
  """Creates benchmarks/.venv_<name> with torch and `pin` if it cannot import them yet.
  Returns {'torch': version, module: version} of what the venv holds."""
  venv, py = venv_dir(name), venv_python(name)
  probe = [py, '-c', f'import json, torch, importlib.metadata as md; print(json.dumps('
           f'{{"torch": torch.__version__, "{module}": md.version("{pin.split("==")[0]}")}}))']
  if os.path.exists(py):
    r = subprocess.run(probe, capture_output=True, text=True)
    if r.returncode == 0:
      return json.loads(r.stdout.strip().splitlines()[-1])
    log(f'{venv} exists but cannot import torch/{module}; reinstalling into it')
  else:
    log(f'creating {venv} (python -m venv, {TORCH_PIN}, {pin}); about 1-2 min')
    subprocess.run([sys.executable, '-m', 'venv', venv], check=True)
  pip = [py, '-m', 'pip', 'install', '--quiet']
  subprocess.run(pip + [TORCH_PIN], check=True)
  constraints = os.path.join(venv, 'constraints.txt')
  with open(constraints, 'w') as f:
    f.write(TORCH_PIN + '\n')
  subprocess.run(pip + ['-c', constraints, pin], check=True)
  subprocess.run([py, '-c', f'import {module}'], check=True)
  versions = json.loads(subprocess.run(probe, capture_output=True, text=True,
                                       check=True).stdout.strip().splitlines()[-1])
  if not versions['torch'].startswith('2.13.0'):
    raise RuntimeError(f'{venv} got torch {versions["torch"]}, expected 2.13.0 (CPU)')
  return versions
