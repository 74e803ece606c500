"""Load a local Hugging Face checkpoint folder into a Flax NNX module, torch-free.

Why a generic loader: every port (Qwen3-VL vision tower, Qwen3 text model, later others) is "a
module + a name map"; reading shards, casting, tying, checking and placing parameters on the
mesh is the same code for all of them, and its errors must be equally clear.

The contract (ports write the name map, this module does the rest):

  NameMap = dict[str, tuple[tuple[str | int, ...], Callable[[np.ndarray], np.ndarray]]]
      HF tensor name -> (path of an `nnx.Param` in `nnx.state(module)`, transform).
      The transform maps the checkpoint's numpy array to the port's layout (e.g. `w.T` for a
      torch Linear [out, in] -> NNX kernel [in, out], a reshape for a Conv3d); it must return
      exactly the Param's shape. Ports export `hf_name_map(cfg, prefix, ..., root=())` and a
      full model merges theirs with `{**a, **b}` (prefix = where HF keeps the sub-model,
      e.g. 'model.visual.', root = where the port keeps it, e.g. ('visual',)).

  load(folder, model, name_map, *, dtype=None, mesh=None, ignore=(), tied=None,
       sharding=None) -> nnx.Module
      folder: a local snapshot with config.json and either model.safetensors or
        model.safetensors.index.json + its shards. Nothing is downloaded.
      model: an abstract module (`nnx.eval_shape(lambda: Port(cfg, rngs=nnx.Rngs(0)))`, the
        cheap way: no random init of billions of weights), a concrete module, or a zero-argument
        factory (then it is eval_shape'd here). Every `nnx.Param` must be filled by the map.
      dtype: dtype of the loaded floating parameters (None: each Param's declared dtype).
      mesh: a `jax.sharding.Mesh`; parameters are created with `jax.make_array_from_callback`
        under the shardings of `default_sharding` (or `sharding(path, shape) -> Sharding`), so
        only one checkpoint tensor is ever on the host, never the whole model. None: one device.
      ignore: fnmatch patterns of checkpoint names to skip on purpose (e.g. 'model.visual.*' for
        a text-only port).
      tied: {target hf name: source hf name} used when the target is absent. None: if config.json
        ties word embeddings (top level or text_config), a mapped '*lm_head.weight' absent from
        the checkpoint takes the mapped '*embed_tokens.weight', and a stored 'lm_head.weight'
        that the map does not want (a port that reuses the embedding) is skipped.
      rename: checkpoint layouts, as (stored prefix, canonical prefix) pairs: a stored name is
        renamed by the longest matching prefix before anything else sees it, so one name map
        (written in the canonical layout) reads every layout a model is published in (hub
        snapshots `language_model.model.*`, transformers 5 module trees `model.language_model.*`).
        Two stored names that rename to one canonical name raise (a mixed-up folder).
      Raises ValueError (naming the file / tensor / path and the fix) for: a missing folder,
      config.json, weights, index or shard; checkpoint tensors neither mapped nor ignored; mapped
      names the checkpoint lacks; Params no name fills (or map paths that are not Params); and
      shape mismatches.

  load_arrays(model, tensors, name_map, *, ...) -> nnx.Module
      The same from an in-memory {name: np.ndarray} (tests, conversions).

Sharding rule (`default_sharding`): parameters with >= 2 dims put their *last* axis (the output
dim of an NNX kernel [in, out]) on the mesh's 'model' axis when divisible, else their first axis
when divisible, else replicate; 1-D parameters (norms, biases) are replicated. The 'data' axis is
left to activations. It is simple on purpose: tensor-parallel layouts belong to a later issue.
The shardings use the mesh with Auto axis types (`auto_axes`): the ports rely on XLA's sharding
propagation, and a `jax.make_mesh` mesh (Explicit by default) would make their reshapes fail.
"""

from __future__ import annotations

import fnmatch
import json
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding
from safetensors import safe_open

Path = tuple[Union[str, int], ...]
Transform = Callable[[np.ndarray], np.ndarray]
NameMap = Mapping[str, tuple[Path, Transform]]
ShardingFn = Callable[[Path, jax.ShapeDtypeStruct], Sharding]

SINGLE_FILE = 'model.safetensors'
# Checkpoint layouts of HF's *ForConditionalGeneration VLMs (Gemma-3, LLaVA): hub snapshots
# (transformers 4.x: `vision_tower.vision_model.*`, `language_model.model.*`,
# `language_model.lm_head.*`, `multi_modal_projector.*`) and transformers 5 saves
# (`vision_tower.*`, ...) renamed into the transformers 5 module tree the ports' maps use.
VLM_LAYOUTS = (('vision_tower.vision_model.', 'model.vision_tower.'),
               ('model.vision_tower.vision_model.', 'model.vision_tower.'),
               ('vision_tower.', 'model.vision_tower.'),
               ('multi_modal_projector.', 'model.multi_modal_projector.'),
               ('language_model.model.', 'model.language_model.'),
               ('language_model.lm_head.', 'lm_head.'))
INDEX_FILE = 'model.safetensors.index.json'


def identity(w: np.ndarray) -> np.ndarray:
  return w


def transpose(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> NNX kernel [in, out]."""
  return w.T


def read_config(folder: str) -> dict[str, Any]:
  """config.json of a local checkpoint folder."""
  if not os.path.isdir(folder):
    raise ValueError(f'checkpoint folder {folder!r} does not exist; pass the local snapshot '
                     'folder (with config.json and *.safetensors)')
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise ValueError(f'{path!r} is missing; the checkpoint folder needs the config.json saved '
                     'with the weights')
  with open(path) as f:
    return json.load(f)


def tensor_files(folder: str) -> dict[str, str]:
  """Checkpoint tensor name -> the safetensors file that holds it (index or single file)."""
  index = os.path.join(folder, INDEX_FILE)
  single = os.path.join(folder, SINGLE_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get('weight_map')
    if not isinstance(weight_map, dict):
      raise ValueError(f'{index!r} has no "weight_map" dict; re-save the checkpoint')
    files = {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
    for shard in sorted(set(files.values())):
      if not os.path.isfile(shard):
        raise ValueError(f'shard {shard!r} named in {index!r} is missing; copy the complete '
                         'snapshot (all model-*.safetensors files)')
    return files
  if os.path.isfile(single):
    with safe_open(single, framework='numpy') as f:
      return {name: single for name in f.keys()}
  raise ValueError(f'{folder!r} has neither {SINGLE_FILE} nor {INDEX_FILE}; save the model '
                   'with safe_serialization=True or point at the right folder')


def ties_embeddings(config: Mapping[str, Any]) -> bool:
  """Whether a config.json dict ties the lm head to the word embeddings."""
  text = config.get('text_config') or {}
  return bool(config.get('tie_word_embeddings', text.get('tie_word_embeddings', False)))


def auto_axes(mesh: Mesh) -> Mesh:
  """The same devices and names with Auto axis types (`jax.make_mesh` defaults to Explicit).

  The ports are written for GSPMD propagation: under Explicit axes a reshape of a sharded
  activation needs an `out_sharding`, which model code should not have to spell out.
  """
  return Mesh(mesh.devices, mesh.axis_names,
              axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))


def default_sharding(mesh: Mesh, axis: str = 'model') -> ShardingFn:
  """The documented rule (module docstring) as a `sharding(path, shape) -> NamedSharding`."""
  mesh = auto_axes(mesh)
  n = dict(mesh.shape).get(axis, 1)

  def rule(path: Path, leaf: jax.ShapeDtypeStruct) -> Sharding:
    del path
    spec: list[Optional[str]] = [None] * len(leaf.shape)
    if n > 1 and len(leaf.shape) >= 2:
      for dim in (len(leaf.shape) - 1, 0):
        if leaf.shape[dim] % n == 0:
          spec[dim] = axis
          break
    return NamedSharding(mesh, PartitionSpec(*spec))

  return rule


def _abstract(model: Any) -> nnx.Module:
  if isinstance(model, nnx.Module):
    return model
  if callable(model):
    return nnx.eval_shape(model)
  raise ValueError(f'model must be an nnx.Module or a zero-argument factory, got {type(model)}')


def _fmt(names: Iterable[Any], limit: int = 8) -> str:
  names = sorted(map(str, names))
  more = f' ... (+{len(names) - limit} more)' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more


def _plan(model: nnx.Module, available: Sequence[str], name_map: NameMap, ignore: Sequence[str],
          tied: Mapping[str, str], skip_tied_head: bool):
  """Checks names both ways; returns (graphdef, flat state, {Param path: variable},
  {hf name: (source name, Param path)})."""
  graphdef, state = nnx.split(model)
  flat = nnx.to_flat_state(state)
  params = {path: v for path, v in flat if isinstance(v, nnx.Param)}
  others = [path for path, v in flat if not isinstance(v, nnx.Param)
            and isinstance(v.get_value(), jax.ShapeDtypeStruct)]
  if others:
    raise ValueError(f'the abstract module has non-parameter state {_fmt(others)} that no '
                     'checkpoint fills; pass a concrete module instead')
  avail = set(available)
  plan = {}
  for name, (path, _) in name_map.items():
    path = tuple(path)
    if path not in params:
      raise ValueError(f'name map sends {name!r} to {path}, which is not a Param of '
                       f'{type(model).__name__}; fix the port\'s hf_name_map')
    source = name if name in avail else tied.get(name)
    if source is None or source not in avail:
      raise ValueError(f'checkpoint lacks tensor {name!r} (for {path}); the folder holds a '
                       'different model or an incomplete snapshot (check config.json, '
                       'tie_word_embeddings and the shards)')
    plan[name] = (source, path)
  wanted = set(name_map) | {src for src, _ in plan.values()}
  unknown = [n for n in avail - wanted
             if not any(fnmatch.fnmatchcase(n, pat) for pat in ignore)
             and not (skip_tied_head and n.endswith('lm_head.weight'))]
  if unknown:
    raise ValueError(f'checkpoint tensors not in the name map: {_fmt(unknown)}; the config does '
                     'not match the weights, or add them to the port\'s map or to ignore=')
  filled = {path for _, path in plan.values()}
  missing = [p for p in params if p not in filled]
  if missing:
    raise ValueError(f'no checkpoint tensor fills {_fmt(missing)}; the port\'s name map is '
                     'incomplete for this config')
  return graphdef, flat, params, plan


def _materialize(model: nnx.Module, names: Sequence[str], fetch: Callable[[Iterable[str]],
                 Iterator[tuple[str, np.ndarray]]], name_map: NameMap, *, dtype, mesh,
                 ignore, tied, skip_tied_head, sharding: Optional[ShardingFn]) -> nnx.Module:
  """Fills every Param one tensor at a time, each created directly with its target sharding."""
  graphdef, flat, params, plan = _plan(_abstract(model), names, name_map, ignore, tied,
                                       skip_tied_head)
  if sharding is None:
    if mesh is None:
      # this process's first device (jax.devices()[0] is process 0's in a multi-process run,
      # where each process of a harvest loads its own copy)
      one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      sharding = lambda path, leaf: one  # noqa: E731
    else:
      sharding = default_sharding(mesh)
  by_source: dict[str, list[str]] = {}
  for name, (source, _) in plan.items():
    by_source.setdefault(source, []).append(name)
  for source, host in fetch(by_source):
    for name in by_source[source]:
      path = plan[name][1]
      var = params[path]
      leaf = var.get_value()
      want = jax.ShapeDtypeStruct(leaf.shape, dtype if (
          dtype is not None and jnp.issubdtype(leaf.dtype, jnp.floating)) else leaf.dtype)
      value = np.asarray(name_map[name][1](host))
      if value.shape != tuple(want.shape):
        raise ValueError(f'tensor {name!r} -> {path}: the port expects shape {tuple(want.shape)}, '
                         f'the checkpoint (after the map\'s transform) gives {value.shape}; check '
                         'that config.json matches the weights (hidden sizes, heads, patch size)')
      value = value.astype(want.dtype, copy=False)
      arr = jax.make_array_from_callback(want.shape, sharding(path, want),
                                         lambda idx, v=value: v[idx])
      var.set_value(arr)
      del value, arr
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load(folder: str, model: Any, name_map: NameMap, *, dtype=None, mesh: Optional[Mesh] = None,
         ignore: Sequence[str] = (), tied: Optional[Mapping[str, str]] = None,
         sharding: Optional[ShardingFn] = None,
         rename: Sequence[tuple[str, str]] = ()) -> nnx.Module:
  """Loads a local HF safetensors checkpoint into `model` (see the module docstring)."""
  config = read_config(folder)
  stored = tensor_files(folder)
  files = {new: (stored[old], old) for new, old in canonical_names(stored, rename).items()}
  is_tied = ties_embeddings(config)
  if tied is None:
    tied = _auto_tie(name_map) if is_tied else {}

  def fetch(wanted: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
    by_file: dict[str, list[str]] = {}
    for name in wanted:
      by_file.setdefault(files[name][0], []).append(name)
    for path in sorted(by_file):  # each shard opened once; its tensors read one at a time
      with safe_open(path, framework='numpy') as f:
        for name in by_file[path]:
          yield name, f.get_tensor(files[name][1])

  return _materialize(model, list(files), fetch, name_map, dtype=dtype, mesh=mesh, ignore=ignore,
                      tied=tied, skip_tied_head=is_tied and 'lm_head.weight' not in name_map,
                      sharding=sharding)


def load_arrays(model: Any, tensors: Mapping[str, np.ndarray], name_map: NameMap, *,
                dtype=None, mesh: Optional[Mesh] = None, ignore: Sequence[str] = (),
                tied: Optional[Mapping[str, str]] = None,
                sharding: Optional[ShardingFn] = None,
                rename: Sequence[tuple[str, str]] = ()) -> nnx.Module:
  """`load` from an in-memory {hf name: array} (e.g. a torch state_dict turned to numpy)."""
  tensors = {new: tensors[old] for new, old in canonical_names(tensors, rename).items()}

  def fetch(wanted: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
    for name in wanted:
      yield name, np.asarray(tensors[name])

  return _materialize(model, list(tensors), fetch, name_map, dtype=dtype, mesh=mesh,
                      ignore=ignore, tied=dict(tied or {}), skip_tied_head=False,
                      sharding=sharding)


def canonical_names(names: Iterable[str], rename: Sequence[tuple[str, str]] = ()
                    ) -> dict[str, str]:
  """{canonical name: stored name} under `rename`'s (stored prefix, canonical prefix) pairs."""
  rules = sorted(rename, key=lambda r: -len(r[0]))
  out: dict[str, str] = {}
  for name in names:
    new = next((to + name[len(src):] for src, to in rules if name.startswith(src)), name)
    if new in out:
      raise ValueError(f'checkpoint tensors {out[new]!r} and {name!r} both mean {new!r} (two '
                       'layouts mixed in one folder); keep one snapshot per folder')
    out[new] = name
  return out


def _auto_tie(name_map: NameMap) -> dict[str, str]:
  heads = [n for n in name_map if n.endswith('lm_head.weight')]
  embeds = [n for n in name_map if n.endswith('embed_tokens.weight')]
  return {h: embeds[0] for h in heads} if len(embeds) == 1 else {}
