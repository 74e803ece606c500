"""Where the device benchmarks write: <out>/<name>_<device>.json (cpu, or the card's name)."""

import json
import os

import jax


def device() -> dict:
  dev = jax.devices()[0]
  return {'device': dev.device_kind, 'platform': dev.platform, 'n_devices': len(jax.devices())}


def save(result: dict, out: str, name: str, markdown: str | None = None) -> str:
  """Prints `result` and writes it as JSON; with `markdown`, also that table beside it (.md),
  printed last. Returns the JSON's path."""
  print(json.dumps(result, indent=1))
  dev = jax.devices()[0]
  tag = dev.platform if dev.platform == 'cpu' else dev.device_kind.replace(' ', '_')
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, f'{name}_{tag}.json')
  with open(path, 'w') as f:
    json.dump(result, f, indent=1)
  if markdown is not None:
    with open(path[:-len('.json')] + '.md', 'w') as f:
      f.write(markdown)
    print(markdown)
  return path
