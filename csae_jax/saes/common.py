"""Pieces every SAE shares: parameters, encoder pre-activations, decoder, row geometry.

Params are a plain dict pytree so that `vmap` over stacked params (sweeps), orbax and shardings
see ordinary arrays:
    w_enc [d, n]   encoder,            logical axes ('embed', 'latent')
    b_enc [n]      encoder bias,       ('latent',)
    w_dec [n, d]   decoder, unit rows, ('latent', 'embed')
    b_dec [d]      decoder bias,       ('embed',)
    log_threshold [n]  (jumprelu only) per-latent log threshold, ('latent',)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

Params = dict[str, jax.Array]

LOGICAL_AXES = {'w_enc': ('embed', 'latent'), 'b_enc': ('latent',),
                'w_dec': ('latent', 'embed'), 'b_dec': ('embed',), 'log_threshold': ('latent',)}



def normalize_rows(w_nd: Float[Array, 'n d']) -> Float[Array, 'n d']:
  return w_nd / jnp.maximum(jnp.linalg.norm(w_nd, axis=-1, keepdims=True), 1e-12)


def init_params(key: jax.Array, d: int, n: int, *,
                rows_nd: Float[Array, 'm d'] | None = None) -> Params:
  """Unit-norm decoder rows (random, or the given data rows cycled), encoder = decoder^T.

  Encoder = decoder transpose is the initialisation the reference recipe and the TopK
  literature use: every latent starts as a matched filter for its own decoder direction.
  """
  w_nd = jax.random.normal(key, (n, d), jnp.float32)
  if rows_nd is not None:
    # Data init: latent i starts at the given row i mod m (plus a little noise to break ties).
    take = jnp.arange(n) % rows_nd.shape[0]
    w_nd = jnp.asarray(rows_nd)[take] + 0.01 * w_nd / jnp.sqrt(d)
  w_nd = normalize_rows(w_nd)
  return {'w_enc': w_nd.T, 'b_enc': jnp.zeros((n,), jnp.float32),
          'w_dec': w_nd, 'b_dec': jnp.zeros((d,), jnp.float32)}


def pre_acts(params: Params, x_bd: Float[Array, 'b d']) -> Float[Array, 'b n']:
  """ReLU(W_enc^T (x - b_dec) + b_enc): the non-negative scores the sparsifiers select from."""
  return jax.nn.relu((x_bd - params['b_dec']) @ params['w_enc'] + params['b_enc'])


def decode(params: Params, codes_bn: Float[Array, 'b n']) -> Float[Array, 'b d']:
  return codes_bn @ params['w_dec'] + params['b_dec']


def remove_parallel_grad(g_nd: Float[Array, 'n d'], w_nd: Float[Array, 'n d']) -> Float[Array, 'n d']:
  """Drops the gradient component along each (unit) decoder row: with rows renormalised after
  every step, that component only changes the norm, which Adam would otherwise fight."""
  return g_nd - jnp.sum(g_nd * w_nd, axis=-1, keepdims=True) * w_nd


def geometric_median(x_nd: Float[Array, 'n d'], *, weights_n: Float[Array, 'n'] | None = None,
                     iters: int = 64, eps: float = 1e-6) -> Float[Array, 'd']:
  """Weiszfeld's algorithm (the robust centre the reference recipe uses for b_dec)."""
  w_n = jnp.ones(x_nd.shape[0], x_nd.dtype) if weights_n is None else weights_n
  med = jnp.sum(w_n[:, None] * x_nd, 0) / jnp.maximum(jnp.sum(w_n), eps)

  def body(_, med_d):
    inv_n = w_n / jnp.maximum(jnp.linalg.norm(x_nd - med_d, axis=-1), eps)
    return jnp.sum(inv_n[:, None] * x_nd, 0) / jnp.maximum(jnp.sum(inv_n), eps)

  return jax.lax.fori_loop(0, iters, body, med)


def _latent_axis(name: str) -> int | None:
  if name not in LOGICAL_AXES:
    raise ValueError(f'SAE parameter {name!r} has no logical axes in common.LOGICAL_AXES; add '
                     f'them there so that stacks of SAEs of different sizes can be padded')
  axes = LOGICAL_AXES[name]
  return axes.index('latent') if 'latent' in axes else None


def pad_latents(params: Params, n: int) -> Params:
  """The SAE with zero latents appended up to n (padding: never fires when masked, see
  objective.SAEHyper.n_valid), so SAEs of different sizes stack for one vmapped step."""
  out = {}
  for name, v in params.items():
    ax = _latent_axis(name)
    if ax is None or v.shape[ax] == n:
      out[name] = v
      continue
    widths = [(0, 0)] * v.ndim
    widths[ax] = (0, n - v.shape[ax])
    out[name] = jnp.pad(v, widths)
  return out


def take_latents(params: Params, n: int) -> Params:
  """The first n latents (undoes pad_latents)."""
  out = {}
  for name, v in params.items():
    ax = _latent_axis(name)
    out[name] = v if ax is None else jax.lax.slice_in_dim(v, 0, n, axis=ax)
  return out
