"""Edits of named sites as jit arguments: plain functions are static, pytree edits are traced.

A port's jitted forward / prefill / decode take the edits dict as part of their compilation key.
A plain Python function can only be static (it hashes by identity, so reuse the same object to
reuse a compilation). An edit that is a *pytree* (a registered dataclass with a `__call__`, or a
`jax.tree_util.Partial(f, *arrays)`) is split here into its structure (static: the function
and any metadata, compared by equality) and its array leaves (traced): steering many concepts,
values and member sets of the same shapes then compiles once. `csae_jax.steering` builds its
interventions this way; every port that calls `split` / `merge` gets that for free.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

Edits = Mapping[str, Callable[[jax.Array], jax.Array]]
# (name, plain function or pytree structure, is_pytree), sorted by name: hashable for jit.
StaticEdits = tuple[tuple[str, Any, bool], ...]


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, bool, complex))


def split(edits: Optional[Edits]) -> tuple[StaticEdits, tuple[list, ...]]:
  """(static part for jit's static arguments, traced leaves: one list per pytree edit)."""
  static, leaves = [], []
  for name, fn in sorted((edits or {}).items(), key=lambda kv: kv[0]):
    if not callable(fn):
      raise ValueError(f'edits[{name!r}] is {type(fn).__name__}, not a function of the '
                       'activation')
    flat, treedef = jax.tree_util.tree_flatten(fn)
    if jax.tree_util.treedef_is_leaf(treedef) and flat and flat[0] is fn:
      static.append((name, fn, False))  # a plain function: part of the compilation key
      continue
    bad = [type(x).__name__ for x in flat if not _is_array(x)]
    if bad:
      raise ValueError(f'edits[{name!r}] is a pytree with non-array leaves ({sorted(set(bad))}); '
                       'mark such fields static (metadata) or pass a plain function')
    static.append((name, treedef, True))
    leaves.append(flat)
  return tuple(static), tuple(leaves)


def merge(static: StaticEdits, leaves: tuple[list, ...]) -> dict[str, Callable]:
  """The edits dict again, inside the traced function (pytree edits rebuilt from tracers)."""
  out, it = {}, iter(leaves)
  for name, fn_or_def, is_tree in static:
    out[name] = jax.tree_util.tree_unflatten(fn_or_def, next(it)) if is_tree else fn_or_def
  return out


def jit_args(edits: Optional[Edits], sites=None) -> tuple[StaticEdits, tuple[list, ...], Any]:
  """(static edits, traced edit leaves, sites as a sorted tuple or None): what a port's jitted
  forward takes for `edits=` and `sites=` (shared by every port)."""
  static, leaves = split(edits)
  return static, leaves, (None if sites is None else tuple(sorted(set(sites))))
