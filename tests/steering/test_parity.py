"""Acceptance: the steering run's captions equal transformers' greedy generation with the same
clamp applied by a forward hook on the vision block (float32), token for token, for every arm
and sign, at several blocks, in both clamp modes, with TopK / BatchTopK / JumpReLU /
Matryoshka SAEs.

The reference is written here from the export's arrays alone (torch, no csae_jax code): the
inference rule, the clamp, the HF processor's pixels and HF's `generate`.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from csae_jax.steering import protocol
from csae_jax.vlms import preprocess, qwen3_vl
from tests.steering.conftest import IMAGE_SIZE, write_random_export
from tests.vlms import conftest as vlm

EOS = 105  # <|im_end|> of the tiny tokenizer


def torch_codes(sae: dict, x: torch.Tensor) -> torch.Tensor:
  pre = torch.relu((x - sae['b_dec']) @ sae['w_enc'] + sae['b_enc'])
  arch = str(sae['arch'])
  if arch in ('batch_topk', 'matryoshka'):
    return torch.where(pre > float(sae['threshold']), pre, torch.zeros_like(pre))
  if arch == 'topk':
    kth = torch.topk(pre, int(sae['k']), dim=-1).values[:, -1:]
    return torch.where((pre >= kth) & (pre > 0), pre, torch.zeros_like(pre))
  if arch == 'jumprelu':
    return torch.where(pre > torch.exp(sae['log_threshold']), pre, torch.zeros_like(pre))
  raise AssertionError(arch)


def clamp_hook(sae: dict, members: list[int], value: float, mode: str):
  def hook(module, args, out):
    x = out.float()
    f = torch_codes(sae, x)
    f2 = f.clone()
    f2[:, members] = value
    if mode == 'clamp':
      return f2 @ sae['w_dec'] + sae['b_dec']
    return x + (f2 - f) @ sae['w_dec']
  return hook


def load_torch_sae(export_dir: str) -> dict:
  with np.load(os.path.join(export_dir, 'level1_sae.npz')) as z:
    return {k: (torch.from_numpy(z[k].astype(np.float32)) if z[k].dtype.kind == 'f' and z[k].ndim
                else z[k]) for k in z.files}


def reference_tokens(setup, records, block: int, sae: dict | None, n_new: int) -> list[list[int]]:
  model, config = setup['torch_model'], setup['config']
  pre = preprocess.Qwen3VLPreprocessor(setup['folder'], image_size=IMAGE_SIZE)
  pixels, grid = pre.images([Image.open(os.path.join(setup['image_dir'], r['image']))
                             for r in records])
  ids = np.tile(pre.prompt_ids(grid[:1], records[0].get('prompt') or
                               'Describe what is in this image in one short sentence.'),
                (len(records), 1))
  r0 = records[0]
  handle = None
  if r0['arm'] != 'none':
    handle = model.model.visual.blocks[block].register_forward_hook(
        clamp_hook(sae, r0['members'], r0['value'], r0['mode']), prepend=True)
  try:
    with torch.no_grad():
      out = model.generate(
          input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels),
          image_grid_thw=torch.from_numpy(grid),
          mm_token_type_ids=torch.from_numpy((ids == vlm.IMAGE_TOKEN_ID).astype(np.int64)),
          attention_mask=torch.ones(ids.shape, dtype=torch.long), max_new_tokens=n_new,
          do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
  finally:
    if handle is not None:
      handle.remove()
  gen = out[:, ids.shape[1]:].numpy()
  res = []
  for row in gen:
    row = row.tolist()
    res.append(row[:row.index(EOS) + 1] if EOS in row else row)
  return res


CASES = [('vision/block_0', 'clamp', 'batch_topk'), ('vision/block_0', 'clamp_error', 'jumprelu'),
         ('vision/block_2', 'clamp', 'topk'), ('vision/block_2', 'clamp_error', 'batch_topk')]


@pytest.mark.parametrize('site,mode,arch', CASES)
def test_steered_captions_equal_transformers_with_a_hook(steer_setup, tmp_path, site, mode, arch):
  s = steer_setup
  rows = s['rows'][site]
  csae = write_random_export(str(tmp_path / 'csae'), rows, arch=arch, seed=1)
  mat = write_random_export(str(tmp_path / 'mat'), rows, arch='matryoshka', seed=2, hierarchy={
      'schema_version': 1, 'unassigned': [], 'alive': list(range(24)),
      'concepts': [{'id': 0, 'members': [5, 9], 'weights': [1.0, 1.0]},
                   {'id': 1, 'members': [12, 13, 20], 'weights': [1.0] * 3}]})
  n_new = 6
  cfg = dict(model='qwen3-vl', model_path=s['folder'], images=s['image_dir'], export=csae,
             harvest=s['site_dirs'][site], matryoshka_export=mat, site=site, concepts='0,1',
             images_per_concept=4, mode=mode, max_new_tokens=n_new, batch_size=4,
             suppress_on='all')
  n_compiled = qwen3_vl._prefill._cache_size()
  n_decode = qwen3_vl._decode._cache_size()
  result = protocol.run(cfg, str(tmp_path / 'wd'))
  # none + one program per SAE rule: every concept, arm and sign reuses it (the Matryoshka
  # SAE has BatchTopK's rule and shapes); the decode loop (text only) compiles once
  assert qwen3_vl._prefill._cache_size() - n_compiled <= 2 + (arch != 'batch_topk')
  assert qwen3_vl._decode._cache_size() - n_decode <= 1
  with open(tmp_path / 'wd' / 'steer' / 'captions.jsonl') as f:
    records = [json.loads(line) for line in f]
  groups: dict[tuple, list[dict]] = {}
  for r in records:
    groups.setdefault((r['arm'], r['concept'], r['sign']), []).append(r)
  arms = {k[0] for k in groups}
  assert arms == {'none', 'random', 'single', 'matryoshka', 'concept'}
  assert {k[2] for k in groups} == {None, '+', '-'}
  assert len(groups) == 1 + 2 * 4 * 2
  assert all(len(g) == 4 for k, g in groups.items() if k[0] != 'none')
  assert len(groups[('none', None, None)]) == len({r['image'] for r in records})  # each once
  block = int(site.rsplit('_', 1)[1])
  saes = {'csae': load_torch_sae(csae), 'matryoshka': load_torch_sae(mat)}
  changed = 0
  base = {r['image']: r['tokens'] for r in groups[('none', None, None)]}
  for key, recs in groups.items():
    sae = saes[recs[0]['source']] if recs[0]['source'] else None
    want = reference_tokens(s, recs, block, sae, n_new)
    got = [r['tokens'] for r in recs]
    assert got == want, (key, got, want)
    changed += sum(g != base[r['image']] for g, r in zip(got, recs))
    if key[0] != 'none':
      assert recs[0]['value'] == pytest.approx((1 if key[2] == '+' else -1) * abs(
          recs[0]['value'])) and recs[0]['value'] != 0
  assert changed >= 8  # the clamps changed many captions: the comparison has teeth
  assert set(result['arms']) == arms and result['arms']['none']['similarity'] == 1.0
  for arm in arms - {'none'}:  # every caption judged: 2 concepts x 4 images; removal counted
    assert result['arms'][arm]['n_insert'] == 8  # where the unsteered caption showed it
    assert result['arms'][arm]['n_suppress'] <= 8
  assert (tmp_path / 'wd' / 'steer' / 'results.md').read_text().count('|') > 20
