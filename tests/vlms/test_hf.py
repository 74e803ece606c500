"""The generic HF safetensors loader: sharded index, ties, dtype, errors, mesh placement."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from safetensors.numpy import save_file

from csae_jax.vlms import hf
from csae_jax.vlms import qwen3_vl_vision as qv
from tests.vlms.conftest import make_tiny_qwen3_vl, process_images, read_index, tiny_images

NOT_VISION = ('model.language_model.*', 'lm_head.weight')


def _vision(config, **cfg_changes):
  cfg = dataclasses.replace(qv.VisionConfig.from_hf(config.vision_config.to_dict()),
                            **cfg_changes)
  return nnx.eval_shape(lambda: qv.Qwen3VLVision(cfg)), qv.hf_name_map(cfg, 'model.visual.')


def _leaves(model) -> dict:
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """The same tiny model saved as one file and as 19 shards with an index."""
  single = str(tmp_path_factory.mktemp('single'))
  sharded = str(tmp_path_factory.mktemp('sharded'))
  _, config = make_tiny_qwen3_vl(single)
  make_tiny_qwen3_vl(sharded, max_shard_size=20_000)
  return single, sharded, config


def test_sharded_index_folder_loads_the_same_weights(saved):
  single, sharded, config = saved
  assert len(set(read_index(sharded).values())) > 1
  assert not os.path.exists(os.path.join(sharded, hf.SINGLE_FILE))
  abstract, names = _vision(config)
  a = _leaves(hf.load(single, abstract, names, ignore=NOT_VISION))
  b = _leaves(hf.load(sharded, abstract, names, ignore=NOT_VISION))
  assert a.keys() == b.keys() and len(a) == len(names)
  for path in a:
    np.testing.assert_array_equal(a[path], b[path])
  # The Conv3d -> Linear transform really is the flattened, transposed weight.
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(os.path.join(single, hf.SINGLE_FILE), 'numpy') as f:
    conv = f.get_tensor('model.visual.patch_embed.proj.weight')
  np.testing.assert_array_equal(a[('patch_embed', 'kernel')], conv.reshape(len(conv), -1).T)


def test_dtype_cast(saved):
  single, _, config = saved
  abstract, names = _vision(config)
  model = hf.load(single, abstract, names, ignore=NOT_VISION, dtype=jnp.bfloat16)
  dtypes = {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(model))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}


def test_folder_errors(saved, tmp_path):
  single, sharded, config = saved
  abstract, names = _vision(config)
  with pytest.raises(ValueError, match='does not exist'):
    hf.load(str(tmp_path / 'nope'), abstract, names)
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(ValueError, match='config.json'):
    hf.load(str(empty), abstract, names)
  shutil.copy(os.path.join(single, 'config.json'), empty / 'config.json')
  with pytest.raises(ValueError, match='model.safetensors'):
    hf.load(str(empty), abstract, names)
  broken = tmp_path / 'broken'
  shutil.copytree(sharded, broken)
  shard = sorted(set(read_index(str(broken)).values()))[3]
  os.remove(broken / shard)
  with pytest.raises(ValueError, match=shard):
    hf.load(str(broken), abstract, names, ignore=NOT_VISION)


def test_name_errors(saved):
  single, _, config = saved
  abstract, names = _vision(config)
  with pytest.raises(ValueError, match=r'not in the name map: model.language_model.embed_tokens'):
    hf.load(single, abstract, names)  # the text tensors are neither mapped nor ignored
  extra = {**names, 'model.visual.blocks.0.attn.extra': names['model.visual.pos_embed.weight']}
  with pytest.raises(ValueError, match='lacks tensor .model.visual.blocks.0.attn.extra'):
    hf.load(single, abstract, extra, ignore=NOT_VISION)
  fewer = {k: v for k, v in names.items() if k != 'model.visual.merger.linear_fc1.bias'}
  with pytest.raises(ValueError, match=r'name map: model.visual.merger.linear_fc1.bias;'):
    hf.load(single, abstract, fewer, ignore=NOT_VISION)
  with pytest.raises(ValueError, match=r"'merger', 'linear_fc1', 'bias'"):
    hf.load(single, abstract, fewer, ignore=(*NOT_VISION, 'model.visual.merger.linear_fc1.bias'))
  wrong = {**names, 'model.visual.pos_embed.weight': (('pos_embed', 'nope'), hf.identity)}
  with pytest.raises(ValueError, match='not a Param'):
    hf.load(single, abstract, wrong, ignore=NOT_VISION)


def test_shape_mismatch_names_tensor_and_shapes(saved):
  single, _, config = saved
  abstract, names = _vision(config, intermediate_size=48)  # config.json says 64
  with pytest.raises(ValueError, match=r'mlp.linear_fc1.weight.*\(32, 48\).*\(32, 64\)'):
    hf.load(single, abstract, names, ignore=NOT_VISION)


class _TinyLM(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(11, 4, rngs=rngs)
    self.lm_head = nnx.Linear(4, 11, use_bias=False, rngs=rngs)


def _lm_folder(path, *, tie: bool, with_head: bool) -> str:
  os.makedirs(path)
  rng = np.random.default_rng(0)
  tensors = {'model.embed_tokens.weight': rng.normal(size=(11, 4)).astype(np.float32)}
  if with_head:
    tensors['lm_head.weight'] = rng.normal(size=(11, 4)).astype(np.float32)
  save_file(tensors, os.path.join(path, hf.SINGLE_FILE))
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump({'text_config': {'tie_word_embeddings': tie}}, f)
  return path


def test_tied_embeddings(tmp_path):
  names = {'model.embed_tokens.weight': (('embed', 'embedding'), hf.identity),
           'lm_head.weight': (('lm_head', 'kernel'), hf.transpose)}
  tied = _lm_folder(str(tmp_path / 'tied'), tie=True, with_head=False)
  model = hf.load(tied, lambda: _TinyLM(nnx.Rngs(0)), names)  # a factory works too
  np.testing.assert_array_equal(np.asarray(model.lm_head.kernel[...]),
                                np.asarray(model.embed.embedding[...]).T)
  untied = _lm_folder(str(tmp_path / 'untied'), tie=False, with_head=False)
  with pytest.raises(ValueError, match="lacks tensor 'lm_head.weight'"):
    hf.load(untied, lambda: _TinyLM(nnx.Rngs(0)), names)
  # A tied port without an lm_head (it reuses the embedding) skips a stored lm_head.weight.
  stored = _lm_folder(str(tmp_path / 'stored'), tie=True, with_head=True)
  embed_only = nnx.eval_shape(lambda: nnx.Embed(11, 4, rngs=nnx.Rngs(0)))
  model = hf.load(stored, embed_only, {'model.embed_tokens.weight': (('embedding',),
                                                                      hf.identity)})
  assert model.embedding[...].shape == (11, 4)


def test_load_arrays_in_memory():
  rng = np.random.default_rng(1)
  tensors = {'e': rng.normal(size=(11, 4)).astype(np.float32),
             'h': rng.normal(size=(11, 4)).astype(np.float32)}
  names = {'e': (('embed', 'embedding'), hf.identity), 'h': (('lm_head', 'kernel'), hf.transpose)}
  model = hf.load_arrays(_TinyLM(nnx.Rngs(0)), tensors, names)
  np.testing.assert_array_equal(np.asarray(model.lm_head.kernel[...]), tensors['h'].T)


def test_mesh_placement_shards_big_weights_and_keeps_outputs(saved):
  single, sharded, config = saved
  mesh = jax.make_mesh((2, 4), ('data', 'model'))  # Explicit axes: the loader makes them Auto
  abstract, names = _vision(config)
  ref = hf.load(single, abstract, names, ignore=NOT_VISION)
  model = hf.load(sharded, abstract, names, ignore=NOT_VISION, mesh=mesh)
  qkv = model.blocks[0].attn.qkv.kernel[...]  # [32, 96]
  assert qkv.sharding.spec == PartitionSpec(None, 'model')
  assert {s.data.shape for s in qkv.addressable_shards} == {(32, 24)}
  assert len(qkv.sharding.device_set) == 8
  assert model.blocks[0].norm1.scale[...].sharding.spec == PartitionSpec(None)
  # The documented fallback: last axis not divisible by 4 -> first axis.
  rule = hf.default_sharding(mesh)
  assert rule((), jax.ShapeDtypeStruct((8, 6), jnp.float32)).spec == PartitionSpec('model', None)
  assert rule((), jax.ShapeDtypeStruct((3, 6), jnp.float32)).spec == PartitionSpec(None, None)
  pixels, grid = process_images(config, tiny_images())
  want = ref.run(pixels, grid)
  got = model.run(pixels, grid)
  for name in want:
    assert float(jnp.max(jnp.abs(got[name] - want[name]))) <= 1e-5, name
