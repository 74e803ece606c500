"""JumpReLU SAE (Rajamanoharan et al. 2024): f = z * H(z - theta), one learned threshold per
latent, trained through straight-through estimators of the step's derivative.

H has zero derivative almost everywhere; the STE replaces d/dtheta by a rectangle kernel of
width `bandwidth` around the threshold (pseudo-derivatives of the paper, eqs. 11-12):
    d/dtheta [z H(z - theta)] ~ -(theta / eps) K((z - theta) / eps)
    d/dtheta [H(z - theta)]   ~ -(1 / eps)     K((z - theta) / eps)
theta = exp(log_threshold) stays positive; thresholds live in float32 whatever the compute dtype.
Sparsity: an L0 penalty l0_coeff * L0, or with target_l0 > 0 the loss
l0_coeff * (L0 / target_l0 - 1)^2 that steers the average L0 to the target.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from csae_jax.saes import base



def _rectangle(u):
  return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jump(z_bn, theta_n, bandwidth: float):
  """z * H(z - theta)."""
  return z_bn * (z_bn > theta_n)


def _jump_fwd(z_bn, theta_n, bandwidth):
  return jump(z_bn, theta_n, bandwidth), (z_bn, theta_n)


def _jump_bwd(bandwidth, res, g_bn):
  z_bn, theta_n = res
  dz = g_bn * (z_bn > theta_n)
  dtheta = -(theta_n / bandwidth) * _rectangle((z_bn - theta_n) / bandwidth) * g_bn
  return dz, jnp.sum(dtheta, axis=0)


jump.defvjp(_jump_fwd, _jump_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside(z_bn, theta_n, bandwidth: float):
  """H(z - theta), for the L0 count."""
  return (z_bn > theta_n).astype(z_bn.dtype)


def _heaviside_fwd(z_bn, theta_n, bandwidth):
  return heaviside(z_bn, theta_n, bandwidth), (z_bn, theta_n)


def _heaviside_bwd(bandwidth, res, g_bn):
  z_bn, theta_n = res
  dtheta = -(1.0 / bandwidth) * _rectangle((z_bn - theta_n) / bandwidth) * g_bn
  return jnp.zeros_like(z_bn), jnp.sum(dtheta, axis=0)


heaviside.defvjp(_heaviside_fwd, _heaviside_bwd)


def theta(params):
  return jnp.exp(params['log_threshold'].astype(jnp.float32))


def sparsity_loss(params, acts_bn, codes_bn, h, step, valid_b):
  l0 = base.masked_mean(jnp.sum(heaviside(acts_bn, theta(params), h.bandwidth), -1), valid_b)
  coeff = h.l0_coeff * base.warmup(step, h.sparsity_warmup_steps)
  if h.target_l0 > 0:
    return coeff * (l0 / h.target_l0 - 1.0) ** 2
  return coeff * l0


ARCH = base.Arch(
    name='jumprelu', unit_decoder=True,
    train_codes=lambda p, acts, k, valid, h: jump(acts, theta(p), h.bandwidth),
    infer_codes=lambda p, acts, k, thr: acts * (acts > theta(p)),
    extra_params=lambda n, cfg: {'log_threshold': jnp.full(
        (n,), jnp.log(cfg.jumprelu_init_threshold), jnp.float32)},
    sparsity_loss=sparsity_loss)
