"""The architecture interface. Every SAE module fills an `Arch`; what it leaves out falls back to
the defaults here (k-sparse rule at inference, plain reconstruction, no sparsity penalty)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax.numpy as jnp

from csae_jax.saes import common


class Arch(NamedTuple):
  name: str
  # Decoder rows renormalised to unit norm after every step (with the parallel gradient removed).
  unit_decoder: bool
  # train_codes(params, acts_bn, k, valid_b, hyper) -> codes_bn (k may be traced)
  train_codes: Callable[..., Any]
  # infer_codes(params, acts_bn, k, threshold) -> codes_bn: the rule an exported SAE applies
  infer_codes: Callable[..., Any]
  # extra_params(n, sae_config) -> dict of per-latent parameters beyond w_enc/b_enc/w_dec/b_dec
  extra_params: Callable[..., dict] = lambda n, h: {}
  # sparsity_loss(params, acts_bn, codes_bn, hyper, step, valid_b) -> scalar
  sparsity_loss: Callable[..., Any] = lambda p, a, c, h, s, v: jnp.zeros(())
  # recon_loss(params, codes_bn, target_bd, valid_b, hyper) -> scalar, or None: plain MSE
  recon_loss: Callable[..., Any] | None = None
  # update_threshold(threshold, codes_bn, decay, enabled) -> threshold (learned at inference)
  update_threshold: Callable[..., Any] = lambda t, c, d, e: t


def masked_mean(v_b, valid_b):
  if valid_b is None:
    return jnp.mean(v_b)
  w = valid_b.astype(v_b.dtype)
  return jnp.sum(v_b * w) / jnp.maximum(jnp.sum(w), 1.0)


def mse(params: common.Params, codes_bn, target_bd, valid_b) -> Any:
  err_b = jnp.sum((common.decode(params, codes_bn) - target_bd) ** 2, -1)
  return masked_mean(err_b, valid_b)


def warmup(step, steps: int):
  """Linear 0 -> 1 over `steps` (sparsity-coefficient warmup); 1 when steps == 0."""
  if steps <= 0:
    return jnp.ones(())
  return jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
