"""Group interventions on the activation at a named site, from an exported level-1 SAE.

An `Intervention` is a pure, jit-compatible function of the site's activation x [..., T, D]
(vision sites [N, D], text sites [B, S, D]) and a pytree: its arrays (the SAE, the member mask,
the values) are traced leaves and its mode / arch / k are static metadata, so a port that splits
edits with `csae_jax.vlms.edits` compiles once for every concept, arm and sign of one mode.

With f = the SAE's codes of x under its **inference rule** (`recon.encode`: the exported
threshold for BatchTopK / Matryoshka, per-row top-k for TopK, per-latent thresholds for JumpReLU)
and f' = f with the members' codes moved to the clamp value v (f'_m = f_m + strength (v_m - f_m)):

    clamp        x' = f' W_dec + b_dec            (the paper's: the reconstruction replaces x)
    clamp_error  x' = x + (f' - f) W_dec          (keeps the SAE's error term x - x_hat)
    ablate       x' = x - strength f[m] W_dec[m]  (f'_m = 0, error kept: removes exactly the
                                                   members' contribution at strength 1)
    add          x' = x + strength v direction    (direction: unit sum of the members' rows, or
                                                   any given direction such as a level-2 row)

The authors' hook encodes with the dense ReLU code (every positive pre-activation, no
threshold); csae_jax uses the inference rule the SAE was trained and evaluated with, so the
codes that are clamped are the codes the SAE actually uses. At strength 0, `clamp_error`,
`ablate` and `add` are the identity; `clamp` is then the plain reconstruction.

Positions: all tokens by default; or a boolean mask over the tokens of one item (`n_tokens`
long: an image's patch rows for vision sites, images concatenated along the rows; the prompt
for text sites). A text site's decode steps ([B, 1, D], generated tokens) are left unchanged
when positions are given: the chosen positions are prompt positions.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from csae_jax import export
from csae_jax.evals import recon

MODES = ('clamp', 'clamp_error', 'add', 'ablate')


@dataclasses.dataclass(frozen=True)
class SAE:
  """An exported level-1 SAE in input space (`export/level1_sae.npz`)."""
  params: dict
  threshold: float
  arch: str
  k: int

  @property
  def n_latents(self) -> int:
    return int(self.params['w_dec'].shape[0])

  @property
  def d(self) -> int:
    return int(self.params['w_dec'].shape[1])


def load_sae(path: str) -> SAE:
  """`level1_sae.npz` (or an export folder holding it) as an `SAE` with jnp arrays."""
  if os.path.isdir(path):
    path = os.path.join(path, 'level1_sae.npz')
  if not os.path.exists(path):
    raise ValueError(f'no exported SAE at {path!r}; point the steering config at a CSAE run\'s '
                     f'export/ folder (it holds level1_sae.npz)')
  try:
    params, threshold, arch, k = export.load_sae(path)
  except KeyError as e:
    raise ValueError(f'{path!r} is not an exported SAE: missing key {e}; re-export it with '
                     f'csae_jax.export.write') from e
  return SAE({key: jnp.asarray(v, jnp.float32) for key, v in params.items()}, threshold, arch, k)


def encode(sae: SAE, x_td: Float[Array, 't d']) -> Float[Array, 't n']:
  """The SAE's inference codes (the same rule as evaluation, `recon.encode`)."""
  return recon.encode(sae.params, x_td, jnp.float32(sae.threshold), arch=sae.arch, k=sae.k)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=['params', 'threshold', 'member_n', 'value_n', 'direction_d',
                                'strength', 'token_mask_t'],
                   meta_fields=['mode', 'arch', 'k'])
@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashable by identity, arrays inside
class Intervention:
  """x -> x' at one site (module docstring). Build with `make`; call on [..., T, D]."""
  mode: str
  arch: str
  k: int
  params: dict
  threshold: jax.Array
  member_n: jax.Array          # [n] 1 for the steered latents, 0 elsewhere
  value_n: jax.Array           # [n] clamp value per latent (only members matter)
  direction_d: jax.Array       # [d] unit direction of `add`
  strength: jax.Array          # scalar
  token_mask_t: Optional[jax.Array]  # [n_tokens] bool, or None: every token

  def steer_tokens(self, x_td: Float[Array, 't d']) -> Float[Array, 't d']:
    """The intervention on rows of tokens, every row steered (float32 inside)."""
    x = x_td.astype(jnp.float32)
    if self.mode == 'add':
      return x + self.strength * self.value_n[0] * self.direction_d
    p = self.params
    codes_tn = recon.encode(p, x, self.threshold, arch=self.arch, k=self.k)
    target_n = self.value_n if self.mode != 'ablate' else jnp.zeros_like(self.value_n)
    delta_tn = self.member_n * self.strength * (target_n - codes_tn)
    if self.mode == 'clamp':
      return (codes_tn + delta_tn) @ p['w_dec'] + p['b_dec']
    return x + delta_tn @ p['w_dec']  # clamp_error, ablate

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim < 2:
      raise ValueError(f'a site activation is [..., tokens, d]; got shape {x.shape}')
    d = x.shape[-1]
    if d != self.direction_d.shape[0]:
      raise ValueError(f'the SAE has d = {self.direction_d.shape[0]} but the site activation '
                       f'has d = {d}: steer the site the SAE was trained on')
    steered = self.steer_tokens(x.reshape(-1, d)).reshape(x.shape).astype(x.dtype)
    if self.token_mask_t is None:
      return steered
    n_tok, length = self.token_mask_t.shape[0], x.shape[-2]
    if length == n_tok:
      mask = self.token_mask_t
    elif x.ndim == 2 and length % n_tok == 0:  # vision: the images' rows, one after another
      mask = jnp.tile(self.token_mask_t, length // n_tok)
    elif x.ndim == 3 and length == 1:  # a decode step: generated tokens are not chosen positions
      return x
    else:
      raise ValueError(f'positions cover {n_tok} tokens but the site has {length} along its '
                       f'token axis (shape {x.shape})')
    return jnp.where(mask[:, None], steered, x)


def member_mask(n_latents: int, members: Sequence[int]) -> np.ndarray:
  ids = np.asarray(list(members), np.int64)
  if ids.size == 0:
    raise ValueError('an intervention needs at least one member (level-1 feature id)')
  if ids.min() < 0 or ids.max() >= n_latents:
    raise ValueError(f'member ids must be in [0, {n_latents}) for this SAE; got '
                     f'{sorted(set(ids[(ids < 0) | (ids >= n_latents)].tolist()))[:5]}')
  m = np.zeros(n_latents, np.float32)
  m[ids] = 1.0
  return m


def members_direction(sae: SAE, members: Sequence[int]) -> np.ndarray:
  """Unit sum of the members' decoder rows (the default direction of `add`)."""
  w = np.asarray(sae.params['w_dec'])[np.asarray(list(members), np.int64)].sum(0)
  norm = float(np.linalg.norm(w))
  if norm < 1e-12:
    raise ValueError('the members\' decoder rows sum to zero: give `add` a direction')
  return (w / norm).astype(np.float32)


def token_mask(positions: Optional[Sequence[int] | np.ndarray], n_tokens: int
               ) -> Optional[np.ndarray]:
  """[n_tokens] bool from token indices (or a bool mask); None keeps every token."""
  if positions is None:
    return None
  pos = np.asarray(positions)
  if pos.dtype == bool:
    if pos.shape != (n_tokens,):
      raise ValueError(f'a position mask must have {n_tokens} entries, got {pos.shape}')
    return pos
  pos = pos.astype(np.int64).reshape(-1)
  if pos.size == 0 or pos.min() < 0 or pos.max() >= n_tokens:
    raise ValueError(f'positions must be token indices in [0, {n_tokens}); got {pos.tolist()[:8]}')
  mask = np.zeros(n_tokens, bool)
  mask[pos] = True
  return mask


def make(sae: SAE, members: Sequence[int], *, mode: str = 'clamp', value: float | np.ndarray = 0.0,
         strength: float = 1.0, positions: Optional[Sequence[int] | np.ndarray] = None,
         n_tokens: int = 0, direction: Optional[np.ndarray] = None) -> Intervention:
  """An intervention on `members` (level-1 ids). value: the clamp value (scalar, or one per
  member; signed: +v inserts, -v suppresses; for `add` the scalar amount). positions: token
  indices (or a mask) among `n_tokens` tokens per item; None: all tokens."""
  if mode not in MODES:
    raise ValueError(f'steering mode {mode!r}; choose one of {list(MODES)}')
  mask_n = member_mask(sae.n_latents, members)
  vals = np.asarray(value, np.float32)
  value_n = np.zeros(sae.n_latents, np.float32)
  if vals.ndim == 0:
    value_n[:] = vals
  elif vals.shape == (len(members),):
    value_n[np.asarray(list(members), np.int64)] = vals
  else:
    raise ValueError(f'value must be a scalar or one per member ({len(members)}), got shape '
                     f'{vals.shape}')
  if direction is None:
    direction = members_direction(sae, members)
  direction = np.asarray(direction, np.float32).reshape(-1)
  if direction.shape != (sae.d,):
    raise ValueError(f'direction must have d = {sae.d} entries, got {direction.shape}')
  direction = direction / max(float(np.linalg.norm(direction)), 1e-12)
  if mode == 'add' and vals.ndim:
    raise ValueError('`add` takes one scalar value (the signed amount along the direction)')
  mask_t = None if positions is None else jnp.asarray(token_mask(positions, n_tokens))
  # arch and k are static (the compilation key): name rules that are the same rule alike, so
  # a Matryoshka and a BatchTopK SAE of the same shapes share one program (k matters to TopK
  # alone).
  arch = 'batch_topk' if sae.arch == 'matryoshka' else sae.arch
  return Intervention(mode=mode, arch=arch, k=sae.k if arch == 'topk' else 0, params=sae.params,
                      threshold=jnp.float32(sae.threshold), member_n=jnp.asarray(mask_n),
                      value_n=jnp.asarray(value_n), direction_d=jnp.asarray(direction),
                      strength=jnp.float32(strength), token_mask_t=mask_t)
