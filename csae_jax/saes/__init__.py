"""SAE architectures: one module each, filling the same `base.Arch` interface; shared params,
encoder and decoder in `common`, the training objective in `objective`."""

from csae_jax.saes import base, batch_topk, jumprelu, matryoshka, relu_l1, topk

ARCHS: dict[str, base.Arch] = {m.ARCH.name: m.ARCH
                               for m in (batch_topk, topk, relu_l1, jumprelu, matryoshka)}


def get_arch(name: str) -> base.Arch:
  if name not in ARCHS:
    raise ValueError(f'unknown SAE arch {name!r}; choose one of {sorted(ARCHS)}')
  return ARCHS[name]
