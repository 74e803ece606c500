"""Greedy decoding as one `lax.while_loop`, shared by the ports' `generate`.

Why one loop inside jit: a Python loop over a jitted one-token step dispatches the whole
parameter pytree every step (measured 2.4x slower on the Qwen3-VL 4B config, see qwen3_vl.py);
inside one while_loop the parameters are bound once and every step has the same shapes.

A port supplies `step(token_b, slot, cache) -> (logits [B, V], cache)`: embed one token per row,
run the decoder with the KV cache at sequence slot `slot`, return the last position's logits.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Step = Callable[[jax.Array, jax.Array, object], tuple[jax.Array, object]]


def eos_and_pad(eos_token_id: Optional[int | Sequence[int]], pad_token_id: Optional[int]
                ) -> tuple[tuple[int, ...], int]:
  """(eos ids as a hashable tuple, pad id: pad_token_id, else the first eos, else 0)."""
  eos = () if eos_token_id is None else tuple(int(e) for e in np.atleast_1d(eos_token_id))
  pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
  return eos, int(pad)


def greedy(step: Step, first_logits_bv: jax.Array, cache, prompt_len: int, *, max_new: int,
           eos: tuple[int, ...], pad: int, keep_logits: bool):
  """Traceable greedy loop. Returns (tokens [B, max_new] (pad after a row's eos), logits
  [B, max_new, V] or None, number of steps done); stops once every row has emitted an eos."""
  b, v = first_logits_bv.shape
  eos_arr = jnp.asarray(eos, jnp.int32)
  is_eos = lambda t: jnp.isin(t, eos_arr) if eos else jnp.zeros_like(t, bool)  # noqa: E731
  first = jnp.argmax(first_logits_bv, axis=-1).astype(jnp.int32)
  buf = jnp.full((b, max_new), pad, jnp.int32).at[:, 0].set(first)
  # The logits buffer exists only when asked for (vocab x steps can be large).
  lbuf = (jnp.zeros((b, max_new, v), first_logits_bv.dtype).at[:, 0].set(first_logits_bv)
          if keep_logits else None)

  def cond(carry):
    i, _, _, _, _, done = carry
    return (i < max_new) & ~jnp.all(done)

  def body(carry):
    i, tok, cache, buf, lbuf, done = carry
    logits, cache = step(tok, prompt_len + i - 1, cache)  # slot of the token being fed
    nxt = jnp.where(done, pad, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    buf = jax.lax.dynamic_update_slice(buf, nxt[:, None], (0, i))
    if lbuf is not None:
      lbuf = jax.lax.dynamic_update_slice(lbuf, logits[:, None], (0, i, 0))
    return i + 1, nxt, cache, buf, lbuf, done | is_eos(nxt)

  carry = (jnp.int32(1), first, cache, buf, lbuf, is_eos(first))
  i, _, _, buf, lbuf, _ = jax.lax.while_loop(cond, body, carry)
  return buf, lbuf, i


def finish(tokens, logits, n, return_logits: bool):
  """Host-side trim of `greedy`'s buffers to the steps done."""
  n = int(n)
  tokens = np.asarray(tokens)[:, :n]
  return (tokens, np.asarray(logits)[:, :n]) if return_logits else tokens
