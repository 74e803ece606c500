"""Parity of the LLaVA-1.5 port (CLIP ViT tower, feature layer -2 without CLS, MLP projector,
Llama decoder, greedy generation) with transformers' LlavaForConditionalGeneration on tiny random
checkpoints saved to disk (transformers 5 save, sharded save, hub key layout)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from csae_jax.vlms import hf, llava
from tests.vlms import hooked
from tests.vlms import tiny_llava as tl

TOL = 1e-4


def _close(got, want, what, tol=TOL):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, f'{what}: shape {got.shape} != {want.shape}'
  err = float(np.max(np.abs(got - want)))
  assert err <= tol, f'{what}: max abs diff {err:.3g} > {tol}'


def _pixels(config, n, seed=0):
  rng = np.random.default_rng(seed)
  images = [rng.integers(0, 256, (30 + 9 * i, 50 - 7 * i, 3), dtype=np.uint8) for i in range(n)]
  return np.asarray(tl.image_processor(config)(images=images, return_tensors='np')
                    ['pixel_values'], np.float32)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('llava'))
  torch_model, config = tl.make_tiny_llava(folder, seed=3)
  return torch_model, config, llava.Llava.from_pretrained(folder), folder


def test_forward_matches_transformers(tiny):
  torch_model, config, model, _ = tiny
  pixels = _pixels(config, 2)
  ids = tl.prompt(2, 16)
  outs = []
  hooks = [l.register_forward_hook(lambda m, a, o: outs.append(o.numpy().copy()))
           for l in torch_model.model.language_model.layers]
  with torch.no_grad():
    vo = torch_model.model.vision_tower(pixel_values=torch.from_numpy(pixels),
                                        output_hidden_states=True)
    feats = torch_model.model.get_image_features(pixel_values=torch.from_numpy(pixels))
    ref = torch_model(**tl.hf_inputs(ids, pixels))
  for h in hooks:
    h.remove()
  out = model.forward(ids, pixels)
  _close(out['vision/embed'], vo.hidden_states[0].numpy(), 'vision/embed')
  for i in range(config.vision_config.num_hidden_layers):
    _close(out[f'vision/block_{i}'], vo.hidden_states[i + 1].numpy(), f'vision/block_{i}')
  assert out['vision/projector'].shape == (2, 16, 32)  # 'default': CLS dropped
  _close(out['vision/projector'], np.stack([f.numpy() for f in feats.pooler_output]),
         'vision/projector')
  for i, want in enumerate(outs):
    _close(out[f'text/layer_{i}'], want, f'text/layer_{i}')
  _close(out['logits'], ref.logits.numpy(), 'logits')
  # the text never needs the last vision layer (feature layer -2): editing it changes nothing
  edited = model.forward(ids, pixels, sites=['logits'],
                         edits={'vision/block_2': lambda x: x * 0.0})
  np.testing.assert_array_equal(edited['logits'], out['logits'])
  with pytest.raises(ValueError, match='image tokens'):
    model.forward(tl.prompt(1, 15), pixels[:1])


def test_generate_matches_transformers(tiny):
  torch_model, config, model, _ = tiny
  pixels = _pixels(config, 1, seed=1)
  ids = tl.prompt(1, 16)
  with torch.no_grad():
    out = torch_model.generate(**tl.hf_inputs(ids, pixels), max_new_tokens=8, do_sample=False,
                               pad_token_id=0, eos_token_id=None, output_logits=True,
                               return_dict_in_generate=True)
  ref = out.sequences[:, ids.shape[1]:].numpy()
  got, logits = model.generate(ids, pixels, None, 8, return_logits=True)
  np.testing.assert_array_equal(got, ref)
  _close(logits, torch.stack(out.logits, 1).numpy(), 'generate logits')


def test_generate_with_edits_matches_torch_hooks(tiny):
  """An edit of the feature layer (vision/block_1, prefill only) and of a text layer (prefill
  and every decode step) give transformers' tokens and logits under the same forward hooks."""
  torch_model, config, model, _ = tiny
  pixels = _pixels(config, 1, seed=2)
  ids = tl.prompt(1, 16)
  steer = np.random.default_rng(0).normal(size=32).astype(np.float32) * 3
  tm = torch_model.model
  ref, ref_logits = hooked.generate(torch_model, tl.hf_inputs(ids, pixels), 8, [
      (tm.vision_tower.encoder.layers[1], lambda o: o * 0.5),
      (tm.language_model.layers[0], lambda o: o + torch.from_numpy(steer))])
  _, clean = model.generate(ids, pixels, None, 8, return_logits=True)
  got, logits = model.generate(ids, pixels, None, 8, return_logits=True, edits={
      'vision/block_1': lambda h: h * 0.5, 'text/layer_0': lambda h: h + steer})
  np.testing.assert_array_equal(got, ref)
  _close(logits, ref_logits, 'edited generate logits')
  assert np.abs(logits - clean).max() > 0.1  # the edits changed every step's logits


def test_full_strategy_and_layouts(tmp_path):
  """'full' keeps CLS (17 tokens); sharded saves and the hub layout load the same weights."""
  single, sharded, hub = (str(tmp_path / n) for n in ('single', 'sharded', 'hub'))
  torch_model, config = tl.make_tiny_llava(single, vision_feature_select_strategy='full')
  tl.make_tiny_llava(sharded, max_shard_size=20_000, vision_feature_select_strategy='full')
  os.makedirs(hub)
  tensors = load_file(os.path.join(single, hf.SINGLE_FILE))
  save_file({k.replace('vision_tower.', 'vision_tower.vision_model.', 1): v
             for k, v in tensors.items()}, os.path.join(hub, hf.SINGLE_FILE))
  with open(os.path.join(single, 'config.json')) as f:
    cfg = json.load(f)
  with open(os.path.join(hub, 'config.json'), 'w') as f:
    json.dump(cfg, f)
  pixels = _pixels(config, 1)
  ids = tl.prompt(1, 17)
  with torch.no_grad():
    ref = torch_model(**tl.hf_inputs(ids, pixels)).logits.numpy()
  want = llava.Llava.from_pretrained(single).forward(ids, pixels)['logits']
  _close(want, ref, 'logits (full strategy)')
  for folder in (sharded, hub):
    np.testing.assert_array_equal(llava.Llava.from_pretrained(folder).forward(ids, pixels)
                                  ['logits'], want, err_msg=folder)
