"""Parity of the Gemma-3 port (SigLIP tower, projector, decoder with sliding/global layers and
bidirectional image blocks, greedy generation) with transformers' Gemma3ForConditionalGeneration
on tiny random checkpoints saved to disk (single file, sharded, and the hub's key layout)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from csae_jax.vlms import gemma3 as g
from csae_jax.vlms import hf
from tests.vlms import hooked
from tests.vlms import tiny_gemma3 as tg

TOL = 1e-4


def _close(got, want, what, tol=TOL):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, f'{what}: shape {got.shape} != {want.shape}'
  err = float(np.max(np.abs(got - want)))
  scale = float(np.max(np.abs(want)))
  assert err <= tol, f'{what}: max abs diff {err:.3g} > {tol} (values up to {scale:.3g})'


def _images(n, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (30 + 9 * i, 50 - 7 * i, 3), dtype=np.uint8) for i in range(n)]


def _pixels(config, n, seed=0):
  out = tg.image_processor(config)(images=_images(n, seed), return_tensors='np')
  return np.asarray(out['pixel_values'], np.float32)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('gemma3'))
  torch_model, config = tg.make_tiny_gemma3(folder, seed=1, tie_word_embeddings=False)
  return torch_model, config, g.Gemma3.from_pretrained(folder), folder


def _torch_layers(torch_model, kw):
  outs = []
  hooks = [l.register_forward_hook(lambda m, a, o: outs.append(o.numpy().copy()))
           for l in torch_model.model.language_model.layers]
  try:
    with torch.no_grad():
      ref = torch_model(**kw)
  finally:
    for h in hooks:
      h.remove()
  return ref, outs


def test_vision_tower_and_projector_match(tiny):
  torch_model, config, model, _ = tiny
  pixels = _pixels(config, 3)
  with torch.no_grad():
    vo = torch_model.model.vision_tower(pixel_values=torch.from_numpy(pixels),
                                        output_hidden_states=True)
    proj = torch_model.model.multi_modal_projector(vo.last_hidden_state).numpy()
  out = model.vision_forward(pixels)
  n = config.vision_config.num_hidden_layers
  assert len(vo.hidden_states) == n + 1
  _close(out['vision/patch_embed'], vo.hidden_states[0].numpy(), 'patch_embed')
  for i in range(n):
    _close(out[f'vision/block_{i}'], vo.hidden_states[i + 1].numpy(), f'vision/block_{i}')
  _close(out['vision/post_layernorm'], vo.last_hidden_state.numpy(), 'post_layernorm')
  assert out['vision/projector'].shape == (3, 4, config.text_config.hidden_size)
  _close(out['vision/projector'], proj, 'vision/projector')
  # asking for block 0 only stops the tower there, with the same values
  only = model.vision_forward(pixels, sites=['vision/block_0'])
  assert set(only) == {'vision/block_0'}
  np.testing.assert_array_equal(only['vision/block_0'], out['vision/block_0'])


@pytest.mark.parametrize('text,n_images', [
    (dict(), 2),  # GQA 2, window 5 < prompt length 24, scalar 12 != head_dim 16 != 32 / 4
    (dict(num_key_value_heads=1, num_hidden_layers=4, sliding_window=3), 1),  # GQA 4
])
def test_forward_matches_transformers(tmp_path, text, n_images):
  torch_model, config = tg.make_tiny_gemma3(str(tmp_path), text=text)
  model = g.Gemma3.from_pretrained(str(tmp_path))
  pixels = _pixels(config, n_images)
  ids = tg.prompt(n_images, config.mm_tokens_per_image)
  assert ids.shape[1] > config.text_config.sliding_window
  ref, layer_outs = _torch_layers(torch_model, tg.hf_inputs(ids, pixels))
  out = model.forward(ids, pixels)
  assert len(layer_outs) == config.text_config.num_hidden_layers
  for i, want in enumerate(layer_outs):
    _close(out[f'text/layer_{i}'], want, f'text/layer_{i}')
  _close(out['logits'], ref.logits.numpy(), 'logits')
  # the image block really is bidirectional: HF without token_type_ids (causal) differs
  kw = tg.hf_inputs(ids, pixels)
  del kw['token_type_ids']
  with torch.no_grad():
    causal = torch_model(**kw).logits.numpy()
  assert np.max(np.abs(causal - ref.logits.numpy())) > 1e-2


def test_text_only_prompt_and_edits(tiny):
  torch_model, _, model, _ = tiny
  ids = tg.prompt(0, 4, text_len=(9, 0, 0))
  with torch.no_grad():
    ref = torch_model(input_ids=torch.from_numpy(ids)).logits.numpy()
  _close(model.forward(ids, sites=['logits'])['logits'], ref, 'text-only logits')
  # an edit of a text site changes what later layers see, not the site's own earlier value
  pixels = _pixels(tiny[1], 1)
  ids = tg.prompt(1, 4)
  base = model.forward(ids, pixels)
  zero = lambda x: x * 0.0  # noqa: E731
  edited = model.forward(ids, pixels, edits={'text/layer_0': zero})
  assert np.all(np.asarray(edited['text/layer_0']) == 0)
  np.testing.assert_array_equal(edited['vision/projector'], base['vision/projector'])
  assert np.max(np.abs(np.asarray(edited['logits']) - np.asarray(base['logits']))) > 1e-3
  with pytest.raises(ValueError, match='unknown site'):
    model.forward(ids, pixels, sites=['text/layer_9'])
  with pytest.raises(ValueError, match='image tokens'):
    model.forward(ids, np.concatenate([pixels, pixels]))
  with pytest.raises(ValueError, match=r'\[batch, 3, 32, 32\]'):
    model.forward(ids, pixels[:, :, :16])


def _hf_generate(torch_model, kw, n, **extra):
  with torch.no_grad():
    out = torch_model.generate(**kw, max_new_tokens=n, do_sample=False, pad_token_id=0,
                               output_logits=True, return_dict_in_generate=True, **extra)
  return (out.sequences[:, kw['input_ids'].shape[1]:].numpy(),
          torch.stack(out.logits, 1).numpy())


def test_generate_matches_transformers(tiny):
  """Prompt 17 + 10 new tokens with window 5: decode steps must drop keys out of the window."""
  torch_model, config, model, _ = tiny
  pixels = _pixels(config, 2)
  ids = tg.prompt(2, config.mm_tokens_per_image)
  ref, ref_logits = _hf_generate(torch_model, tg.hf_inputs(ids, pixels), 10, eos_token_id=None)
  got, logits = model.generate(ids, pixels, None, 10, return_logits=True)
  np.testing.assert_array_equal(got, ref)
  _close(logits, ref_logits, 'generate logits')
  assert len(set(ref[0].tolist())) > 2  # not one repeated token
  eos = int(ref[0, 3])
  stop = int(np.argmax(ref[0] == eos)) + 1
  got = model.generate(ids, pixels, None, 10, eos_token_id=eos)
  np.testing.assert_array_equal(got, ref[:, :stop])


def test_generate_with_edits_matches_torch_hooks(tiny):
  """A vision-block edit (prefill only) and a text-layer edit (prefill and every decode step,
  past the sliding window) give transformers' tokens and logits when it applies the same
  functions with forward hooks."""
  torch_model, config, model, _ = tiny
  pixels = _pixels(config, 1, seed=2)
  ids = tg.prompt(1, config.mm_tokens_per_image)
  steer = np.random.default_rng(0).normal(size=config.text_config.hidden_size).astype(
      np.float32) * 3
  tm = torch_model.model
  ref, ref_logits = hooked.generate(torch_model, tg.hf_inputs(ids, pixels), 8, [
      (tm.vision_tower.encoder.layers[1], lambda o: o * 0.5),
      (tm.language_model.layers[0], lambda o: o + torch.from_numpy(steer))])
  _, clean = model.generate(ids, pixels, None, 8, return_logits=True)
  got, logits = model.generate(ids, pixels, None, 8, return_logits=True, edits={
      'vision/block_1': lambda h: h * 0.5, 'text/layer_0': lambda h: h + steer})
  np.testing.assert_array_equal(got, ref)
  _close(logits, ref_logits, 'edited generate logits')
  assert np.abs(logits - clean).max() > 0.1  # the edits changed every step's logits


def test_layouts_single_sharded_and_hub(tmp_path):
  """transformers 5 saves, sharded saves and the hub's key layout load the same weights."""
  single, sharded, hub = (str(tmp_path / n) for n in ('single', 'sharded', 'hub'))
  torch_model, config = tg.make_tiny_gemma3(single)
  tg.make_tiny_gemma3(sharded, max_shard_size=20_000)
  with open(os.path.join(sharded, hf.INDEX_FILE)) as f:
    assert len(set(json.load(f)['weight_map'].values())) > 1
  tensors = load_file(os.path.join(single, hf.SINGLE_FILE))
  assert any(k.startswith('vision_tower.encoder.') for k in tensors)  # the 5.x save layout
  os.makedirs(hub)
  hub_names = {k.replace('vision_tower.', 'vision_tower.vision_model.', 1): v
               for k, v in tensors.items()}
  save_file(hub_names, os.path.join(hub, hf.SINGLE_FILE))
  with open(os.path.join(single, 'config.json')) as f:
    cfg = json.load(f)
  with open(os.path.join(hub, 'config.json'), 'w') as f:
    json.dump(cfg, f)
  # the module-tree layout (a state_dict as it is in memory)
  tree = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  assert any(k.startswith('model.language_model.') for k in tree)
  pixels = _pixels(config, 1)
  ids = tg.prompt(1, config.mm_tokens_per_image)
  want = np.asarray(g.Gemma3.from_pretrained(single).forward(ids, pixels)['logits'])
  for folder in (sharded, hub):
    got = g.Gemma3.from_pretrained(folder).forward(ids, pixels)['logits']
    np.testing.assert_array_equal(got, want, err_msg=folder)
  gcfg = g.Gemma3Config.from_hf(cfg)
  # (a state_dict lists the tied head; a saved folder does not)
  model = hf.load_arrays(lambda: g.Gemma3(gcfg), tree, g.hf_name_map(gcfg), rename=g.LAYOUTS,
                         ignore=('lm_head.weight',))
  np.testing.assert_array_equal(model.forward(ids, pixels)['logits'], want)
  # a mixed folder (two layouts of one tensor) is refused with both names
  both = dict(tensors)
  both['language_model.model.norm.weight'] = tensors['language_model.model.norm.weight']
  both['model.language_model.norm.weight'] = tensors['language_model.model.norm.weight']
  with pytest.raises(ValueError, match='both mean'):
    hf.load_arrays(lambda: g.Gemma3(gcfg), both, g.hf_name_map(gcfg), rename=g.LAYOUTS)
