"""Parity of the Qwen3-VL decoder port with transformers' `Qwen3VLTextModel` (float32), and the
properties generation and steering rely on: the KV cache reproduces the full forward, an edit
propagates exactly as a manual re-computation predicts, sites stop the forward early."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from csae_jax.vlms import hf
from csae_jax.vlms import qwen3_vl_text as qt

TOL = 1e-4


def _hf_text(n_layers=3, heads=4, kv_heads=2, head_dim=8, section=(2, 1, 1), bias=False,
             seed=0):
  torch.manual_seed(seed)
  cfg = transformers.Qwen3VLTextConfig(
      hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers,
      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
      vocab_size=101, attention_bias=bias,
      rope_parameters=dict(rope_type='default', rope_theta=10000., mrope_section=list(section)))
  return transformers.Qwen3VLTextModel(cfg).eval()


def _port(hf_model, *, tied=True) -> qt.Qwen3VLText:
  """The port with the torch model's weights, through `hf_name_map` and `hf.load_arrays` (a
  Qwen3VLTextModel has no prefix and no lm_head)."""
  cfg = qt.TextConfig.from_hf({**hf_model.config.to_dict(), 'tie_word_embeddings': tied})
  tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  if not tied:  # an untied head needs weights of its own
    tensors['lm_head.weight'] = np.random.default_rng(0).normal(
        size=(cfg.vocab_size, cfg.hidden_size)).astype(np.float32)
  names = qt.hf_name_map(cfg, prefix='', lm_head='lm_head.weight')
  return hf.load_arrays(lambda: qt.Qwen3VLText(cfg, rngs=nnx.Rngs(1)), tensors, names)


def _positions(b, s, seed=0):
  """Distinct, non-monotone t/h/w positions so that any axis mix-up shows."""
  g = np.random.default_rng(seed)
  return g.integers(0, 40, size=(3, 1, s)).repeat(b, axis=1)


@pytest.mark.parametrize('kw,n_deepstack', [
    (dict(heads=4, kv_heads=4, head_dim=16, section=(3, 3, 2)), 0),  # MHA, longer interleave
    (dict(heads=4, kv_heads=2), 2),                                   # GQA 2, deepstack 2 of 3
    (dict(heads=4, kv_heads=1, bias=True), 1),                        # GQA 4, biases
])
def test_layers_match_transformers(kw, n_deepstack):
  ref_model = _hf_text(**kw)
  model = _port(ref_model)
  b, s = 2, 9
  ids = torch.randint(0, 101, (b, s), generator=torch.Generator().manual_seed(3))
  pos = torch.as_tensor(_positions(b, s))
  vis = torch.zeros(b, s, dtype=torch.bool)
  vis[0, 2:5] = True
  vis[1, 6] = True
  feats = [torch.randn(int(vis.sum()), 32) for _ in range(n_deepstack)]
  layer_outs = []
  hooks = [l.register_forward_hook(lambda m, a, o: layer_outs.append(o)) for l in ref_model.layers]
  with torch.no_grad():
    ref = ref_model(input_ids=ids, position_ids=pos, visual_pos_masks=vis if feats else None,
             deepstack_visual_embeds=feats or None, output_hidden_states=True)
  for h in hooks:
    h.remove()

  acts, _ = model(model.embed(jnp.asarray(ids.numpy())), jnp.asarray(pos.numpy()),
                  visual_idx=jnp.asarray(np.flatnonzero(vis.numpy())),
                  deepstack=tuple(jnp.asarray(f.numpy()) for f in feats))
  np.testing.assert_allclose(acts['text/embed'], ref.hidden_states[0].numpy(), atol=TOL)
  for i, out in enumerate(layer_outs):
    expect = out.clone()
    if i < n_deepstack:  # HF records the layer output before the deepstack addition
      expect[vis] += feats[i]
    np.testing.assert_allclose(acts[f'text/layer_{i}'], expect.numpy(), atol=TOL,
                               err_msg=f'layer {i}')
  np.testing.assert_allclose(acts['text/final_norm'], ref.last_hidden_state.numpy(), atol=TOL)
  assert acts['logits'].shape == (b, s, 101)


def test_mrope_tables_match_transformers_4b_layout():
  """The interleaved cos/sin of the 4B rope layout (head_dim 128, [24, 20, 20], theta 5e6)."""
  hf_cfg = transformers.Qwen3VLTextConfig(
      hidden_size=256, num_attention_heads=2, num_key_value_heads=2, head_dim=128,
      rope_parameters=dict(rope_type='default', rope_theta=5e6, mrope_section=[24, 20, 20]))
  rot = transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLTextRotaryEmbedding(hf_cfg)
  pos = _positions(1, 64, seed=1)
  cos_ref, sin_ref = rot(torch.zeros(1, dtype=torch.float32), torch.as_tensor(pos))
  cos, sin = qt.mrope_cos_sin(jnp.asarray(pos), qt.TextConfig.from_hf(hf_cfg.to_dict()))
  np.testing.assert_allclose(cos, cos_ref.numpy(), atol=TOL)
  np.testing.assert_allclose(sin, sin_ref.numpy(), atol=TOL)
  axis = qt.mrope_axis_per_freq((24, 20, 20), 64)
  assert np.bincount(axis).tolist() == [24, 20, 20]


def test_kv_cache_reproduces_full_forward():
  model = _port(_hf_text(kv_heads=2), tied=True)
  b, s, extra = 2, 6, 3
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 101, (b, s + extra)))
  pos = jnp.asarray(_positions(b, s + extra))
  full, _ = model(model.embed(ids), pos)
  cache = model.init_cache(b, s + extra + 2)
  pre, cache = model(model.embed(ids[:, :s]), pos[:, :, :s], cache=cache, cache_index=0)
  np.testing.assert_allclose(pre['logits'], full['logits'][:, :s], atol=TOL)
  for t in range(s, s + extra):
    step, cache = model(model.embed(ids[:, t:t + 1]), pos[:, :, t:t + 1], cache=cache,
                        cache_index=jnp.int32(t))
    for name in ('text/layer_0', 'text/layer_2', 'logits'):
      np.testing.assert_allclose(step[name][:, 0], full[name][:, t], atol=TOL, err_msg=name)


def test_edit_at_layer0_propagates_as_recomputed():
  model = _port(_hf_text(), tied=False)
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 101, (1, 7)))
  pos = jnp.asarray(_positions(1, 7))
  edit = lambda h: 2.0 * h + 0.5  # noqa: E731
  clean, _ = model(model.embed(ids), pos)
  edited, _ = model(model.embed(ids), pos, edits={'text/layer_0': edit})
  np.testing.assert_array_equal(edited['text/embed'], clean['text/embed'])
  np.testing.assert_allclose(edited['text/layer_0'], edit(clean['text/layer_0']), atol=1e-6)
  # Manual re-computation: the remaining layers applied to the edited stream.
  cos, sin = qt.mrope_cos_sin(pos, model.cfg)
  h = edit(clean['text/layer_0'])
  for i in (1, 2):
    h, _ = model.layers[i](h, cos, sin)
    np.testing.assert_allclose(edited[f'text/layer_{i}'], h, atol=TOL)
  np.testing.assert_allclose(edited['logits'], model.logits(model.norm(h)), atol=TOL)
  assert np.abs(edited['logits'] - clean['logits']).max() > 1e-2  # the edit mattered


def test_sites_select_and_stop_early():
  model = _port(_hf_text(), tied=True)
  ids = jnp.asarray(np.random.default_rng(2).integers(0, 101, (1, 5)))
  pos = jnp.asarray(_positions(1, 5))
  full, _ = model(model.embed(ids), pos)
  # An edit after the last requested site cannot matter: those layers are not run.
  part, _ = model(model.embed(ids), pos, sites={'text/layer_1'},
                  edits={'text/layer_2': lambda h: h * np.nan})
  assert set(part) == {'text/layer_1'}
  np.testing.assert_array_equal(part['text/layer_1'], full['text/layer_1'])


def test_config_from_hub_and_v5_dicts_agree_and_validate():
  hub = {'tie_word_embeddings': True, 'text_config': {
      'vocab_size': 50, 'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 2,
      'num_attention_heads': 4, 'num_key_value_heads': 2, 'head_dim': 8, 'rope_theta': 1e6,
      'rope_scaling': {'rope_type': 'default', 'mrope_section': [2, 1, 1],
                       'mrope_interleaved': True}}}
  v5 = {'tie_word_embeddings': True, 'text_config': {
      **{k: v for k, v in hub['text_config'].items() if k not in ('rope_theta', 'rope_scaling')},
      'rope_parameters': {'rope_type': 'default', 'rope_theta': 1e6, 'mrope_section': [2, 1, 1]}}}
  a, b = qt.TextConfig.from_hf(hub), qt.TextConfig.from_hf(v5)
  assert a == b and a.tie_word_embeddings and a.rope_theta == 1e6 and a.mrope_section == (2, 1, 1)
  bad = {**hub['text_config'], 'rope_scaling': {'rope_type': 'default', 'mrope_section': [2, 2, 1]}}
  with pytest.raises(ValueError, match='mrope_section'):
    qt.TextConfig.from_hf(bad)
  with pytest.raises(ValueError, match='rope_type'):
    qt.TextConfig.from_hf({**hub['text_config'], 'rope_scaling': {'rope_type': 'yarn'}})
  with pytest.raises(ValueError, match='num_key_value_heads'):
    qt.TextConfig.from_hf({**v5['text_config'], 'num_key_value_heads': 3})
