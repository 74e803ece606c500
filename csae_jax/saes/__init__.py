"""SAE architectures: one module each, same interface (train_codes / infer_codes /
update_threshold); shared params, encoder and decoder in `common`."""

from types import ModuleType

from csae_jax.saes import batch_topk, topk

ARCHS: dict[str, ModuleType] = {m.name: m for m in (batch_topk, topk)}


def get_arch(name: str) -> ModuleType:
  if name not in ARCHS:
    raise ValueError(f'unknown SAE arch {name!r}; choose one of {sorted(ARCHS)}')
  return ARCHS[name]
