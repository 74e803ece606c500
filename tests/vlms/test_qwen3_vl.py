"""Parity of the full Qwen3-VL port (vision -> merge -> M-RoPE positions -> decoder with
deepstack -> logits, greedy generation) with transformers' `Qwen3VLForConditionalGeneration` on
tiny random checkpoints saved to disk, plus a `jax.eval_shape` build of the 4B config."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from csae_jax.vlms import qwen3_vl as q
from tests.vlms.conftest import IMAGE_TOKEN_ID, VISION_END_ID, VISION_START_ID
from tests.vlms.conftest import make_tiny_qwen3_vl, process_images, tiny_images
from tests.vlms.conftest import torch_vision_outputs

TOL = 1e-4


def _prompt(grid, merge=2, seed=0, text_len=(3, 2, 4)):
  """Token ids as the processor lays them out: text, <vision_start> image pads <vision_end>
  per image, text; text tokens drawn below the special ids."""
  rng = np.random.default_rng(seed)
  ids = list(rng.integers(0, 99, text_len[0]))
  for i, (t, h, w) in enumerate(np.asarray(grid)):
    ids += [VISION_START_ID] + [IMAGE_TOKEN_ID] * int(t * h * w // merge ** 2) + [VISION_END_ID]
    ids += list(rng.integers(0, 99, text_len[1 + (i > 0)]))
  return np.asarray(ids, np.int64)[None]


def _hf_kwargs(ids, pixels, grid):
  return dict(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels),
              image_grid_thw=torch.from_numpy(grid),
              mm_token_type_ids=torch.from_numpy((ids == IMAGE_TOKEN_ID).astype(np.int64)),
              attention_mask=torch.ones(ids.shape, dtype=torch.long))


@pytest.mark.parametrize('overrides,sizes', [
    # tied, GQA 2, deepstack after vision blocks 0 and 2, two images of different sizes
    (dict(), ((45, 77), (61, 35))),
    # untied, GQA 1, deepstack off, 3 text layers, one image
    (dict(tie_word_embeddings=False, num_key_value_heads=4, deepstack_visual_indexes=(),
          num_hidden_layers=3), ((40, 56),)),
    # GQA 4, head_dim 16 with a longer interleave, one deepstack tap
    (dict(num_key_value_heads=1, head_dim=16, mrope_section=(3, 3, 2),
          deepstack_visual_indexes=(1,)), ((33, 47), (50, 20))),
])
def test_forward_matches_transformers(tmp_path, overrides, sizes):
  torch_model, config = make_tiny_qwen3_vl(str(tmp_path), **overrides)
  model = q.Qwen3VL.from_pretrained(str(tmp_path))
  pixels, grid = process_images(config, tiny_images(sizes))
  ids = _prompt(grid)
  kw = _hf_kwargs(ids, pixels, grid)
  layer_outs = []
  hooks = [l.register_forward_hook(lambda m, a, o: layer_outs.append(o.numpy().copy()))
           for l in torch_model.model.language_model.layers]
  with torch.no_grad():
    ref = torch_model(**kw, output_hidden_states=True)
    pos_ref, delta_ref = torch_model.model.get_rope_index(
        kw['input_ids'], kw['mm_token_type_ids'], kw['image_grid_thw'])
  for h in hooks:
    h.remove()
  vis_ref = torch_vision_outputs(torch_model, pixels, grid)

  pos, delta = q.get_rope_index(ids, grid, image_token_id=IMAGE_TOKEN_ID, spatial_merge_size=2)
  np.testing.assert_array_equal(pos, pos_ref.numpy())
  np.testing.assert_array_equal(delta, delta_ref.numpy()[:, 0])
  assert len(set(pos[1, 0].tolist())) > 1  # image tokens really got 2-D positions

  out = model.forward(ids, pixels, grid)
  np.testing.assert_allclose(out['vision/merger'], vis_ref['vision/merger'], atol=TOL)
  np.testing.assert_allclose(out['text/embed'], ref.hidden_states[0].numpy(), atol=TOL)
  vis = ids == IMAGE_TOKEN_ID
  n_ds = len(config.vision_config.deepstack_visual_indexes)
  assert len(layer_outs) == config.text_config.num_hidden_layers
  for i, expect in enumerate(layer_outs):
    if i < n_ds:  # HF records the layer output before the deepstack addition
      expect[vis] += vis_ref[f'vision/deepstack_{i}']
    np.testing.assert_allclose(out[f'text/layer_{i}'], expect, atol=TOL, err_msg=f'layer {i}')
  np.testing.assert_allclose(out['text/final_norm'], ref.hidden_states[-1].numpy(), atol=TOL)
  np.testing.assert_allclose(out['logits'], ref.logits.numpy(), atol=TOL)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('qwen3_vl'))
  # Untied: with tied O(1) random embeddings one token wins every step; these vary.
  torch_model, config = make_tiny_qwen3_vl(folder, seed=2, tie_word_embeddings=False)
  return torch_model, config, q.Qwen3VL.from_pretrained(folder), folder


def _hf_generate(torch_model, kw, n, logits=False, **extra):
  with torch.no_grad():
    out = torch_model.generate(**kw, max_new_tokens=n, do_sample=False, pad_token_id=127,
                               output_logits=True, return_dict_in_generate=True, **extra)
  tokens = out.sequences[:, kw['input_ids'].shape[1]:].numpy()
  return (tokens, torch.stack(out.logits, 1).numpy()) if logits else tokens


def test_generate_matches_transformers_two_images(tiny):
  torch_model, config, model, _ = tiny
  pixels, grid = process_images(config, tiny_images(((45, 77), (61, 35))))
  ids = _prompt(grid)
  ref, ref_logits = _hf_generate(torch_model, _hf_kwargs(ids, pixels, grid), 8, logits=True,
                                 eos_token_id=None)
  got, logits = model.generate(ids, pixels, grid, 8, return_logits=True)
  np.testing.assert_array_equal(got, ref)
  # Every decode step's logits, not only the argmax (tiny models often repeat one token).
  np.testing.assert_allclose(logits, ref_logits, atol=TOL)
  # An end token stops the row: HF and the port emit it and stop.
  eos = int(ref[0, 3])
  stop = int(np.argmax(ref[0] == eos)) + 1
  assert stop >= 3  # the decode loop ran before stopping
  got = model.generate(ids, pixels, grid, 8, eos_token_id=[eos, 126])
  np.testing.assert_array_equal(got, ref[:, :stop])


def test_generate_batch_of_two_prompts(tiny):
  """Two rows, one image each (same size, different pixels): per-row positions and deltas."""
  torch_model, config, model, _ = tiny
  pix_a, grid_a = process_images(config, tiny_images(((40, 40),), seed=1))
  pix_b, grid_b = process_images(config, tiny_images(((40, 40),), seed=2))
  ids = np.concatenate([_prompt(grid_a, seed=1), _prompt(grid_b, seed=2)])
  pixels, grid = np.concatenate([pix_a, pix_b]), np.concatenate([grid_a, grid_b])
  ref, ref_logits = _hf_generate(torch_model, _hf_kwargs(ids, pixels, grid), 8, logits=True,
                                 eos_token_id=None)
  got, logits = model.generate(ids, pixels, grid, 8, return_logits=True)
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_allclose(logits, ref_logits, atol=TOL)
  assert (got[0] != got[1]).any()
  # Row 0 ends early and is padded while row 1 goes on (HF pads with pad_token_id too).
  eos = int(got[0, 2])
  assert eos not in got[1, :6]
  ref = _hf_generate(torch_model, _hf_kwargs(ids, pixels, grid), 6, eos_token_id=eos)
  got = model.generate(ids, pixels, grid, 6, eos_token_id=eos, pad_token_id=127)
  np.testing.assert_array_equal(got, ref)
  assert (got[0, 3:] == 127).all()


def test_edits_steer_prefill_and_decode_like_torch_hooks(tiny):
  """A vision-block edit (prefill only) and a text-layer edit (every step) give HF's tokens
  when HF applies the same functions with forward hooks."""
  torch_model, config, model, _ = tiny
  pixels, grid = process_images(config, tiny_images(((45, 77),)))
  ids = _prompt(grid)
  steer = np.random.default_rng(0).normal(size=32).astype(np.float32) * 3
  f_vis = lambda h: h * 0.5  # noqa: E731
  f_txt = lambda h: h + steer  # noqa: E731  (additive: commutes with the deepstack add)
  lm = torch_model.model.language_model
  hooks = [torch_model.model.visual.blocks[1].register_forward_hook(
               lambda m, a, o: o * 0.5, prepend=True),
           lm.layers[0].register_forward_hook(
               lambda m, a, o: o + torch.from_numpy(steer), prepend=True)]
  try:
    ref, ref_logits = _hf_generate(torch_model, _hf_kwargs(ids, pixels, grid), 8, logits=True,
                                   eos_token_id=None)
  finally:
    for h in hooks:
      h.remove()
  clean, clean_logits = model.generate(ids, pixels, grid, 8, return_logits=True)
  got, logits = model.generate(ids, pixels, grid, 8, return_logits=True,
                               edits={'vision/block_1': f_vis, 'text/layer_0': f_txt})
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_allclose(logits, ref_logits, atol=TOL)
  assert np.abs(logits - clean_logits).max() > 0.1  # the edits changed every step's logits


def test_sites_and_input_errors(tiny):
  _, config, model, _ = tiny
  pixels, grid = process_images(config, tiny_images(((45, 77),)))
  ids = _prompt(grid)
  out = model.forward(ids, pixels, grid, sites={'vision/block_1'})
  assert set(out) == {'vision/block_1'}  # no text model run
  full = model.forward(ids, pixels, grid, sites={'vision/block_1', 'text/layer_1', 'logits'})
  np.testing.assert_array_equal(full['vision/block_1'], out['vision/block_1'])
  with pytest.raises(ValueError, match='image tokens'):
    model.forward(np.delete(ids, np.flatnonzero(ids[0] == IMAGE_TOKEN_ID)[0], axis=1),
                  pixels, grid)
  with pytest.raises(ValueError, match='unknown site'):
    model.forward(ids, pixels, grid, edits={'text/layer_9': lambda h: h})  # 2 layers only
  with pytest.raises(ValueError, match='unknown site'):
    model.generate(ids, pixels, grid, 2, edits={'text/layers_0': lambda h: h})
  with pytest.raises(ValueError, match='config.json'):
    q.Qwen3VL.from_pretrained('/nonexistent/folder')


def test_sharded_load_gives_the_same_outputs(tiny):
  """Parameters placed on a 2 x 4 mesh (hf.load's rule): the same logits."""
  _, config, model, folder = tiny
  sharded = q.Qwen3VL.from_pretrained(folder, mesh=jax.make_mesh((2, 4), ('data', 'model')))
  kernel = sharded.language_model.layers[0].mlp.up_proj.kernel[...]
  assert len(kernel.sharding.device_set) == 8
  pixels, grid = process_images(config, tiny_images(((45, 77),)))
  ids = _prompt(grid)
  want = model.forward(ids, pixels, grid, sites={'logits'})['logits']
  got = sharded.forward(ids, pixels, grid, sites={'logits'})['logits']
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL)


def test_4b_config_eval_shape_parameter_count():
  """The 4B port built abstractly: same parameter count as transformers' model on the meta
  device, ~4.44B as published, and the name map covers exactly HF's tensors."""
  abstract = nnx.eval_shape(lambda: q.Qwen3VL(q.QWEN3_VL_4B_CONFIG, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  n_port = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  with torch.device('meta'):
    ref = transformers.Qwen3VLForConditionalGeneration(
        transformers.Qwen3VLConfig(**q.QWEN3_VL_4B_CONFIG))
  n_ref = sum(p.numel() for p in ref.parameters())  # the tied head counted once
  assert n_port == n_ref
  # Published: 4.44B parameters (hub safetensors metadata of Qwen/Qwen3-VL-4B-Instruct).
  assert abs(n_port / 1e9 - 4.44) < 0.005, n_port
  cfg = abstract.cfg
  names = q.hf_name_map(cfg)
  assert set(names) == set(ref.state_dict()) - {'lm_head.weight'}  # tied: no head of our own
  paths = {tuple(p) for p, _ in nnx.to_flat_state(params)}
  assert {path for path, _ in names.values()} == paths
