"""`jax.eval_shape` builds of the published Gemma-3-4B-IT and LLaVA-1.5-7B/13B configs: the
port's parameter count equals transformers' model on the meta device (nothing allocated), and
the name maps cover exactly HF's tensors."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from csae_jax.vlms import gemma3, llava

CASES = {
    'gemma-3-4b-it': (gemma3.Gemma3, gemma3.GEMMA3_4B_CONFIG, gemma3.hf_name_map,
                      transformers.Gemma3ForConditionalGeneration, transformers.Gemma3Config),
    'llava-1.5-7b': (llava.Llava, llava.LLAVA_15_7B_CONFIG, llava.hf_name_map,
                     transformers.LlavaForConditionalGeneration, transformers.LlavaConfig),
    'llava-1.5-13b': (llava.Llava, llava.LLAVA_15_13B_CONFIG, llava.hf_name_map,
                      transformers.LlavaForConditionalGeneration, transformers.LlavaConfig),
}
# The counts these configs give (README, "Gemma-3 and LLaVA ports"); the hub model cards round
# them to 4.3B, 7.06B and 13.4B.
EXPECTED = {'gemma-3-4b-it': 4_300_079_472, 'llava-1.5-7b': 7_063_427_072,
            'llava-1.5-13b': 13_351_494_656}


@pytest.mark.parametrize('name', sorted(CASES))
def test_eval_shape_parameter_count(name):
  port, config, name_map, hf_cls, hf_cfg = CASES[name]
  abstract = nnx.eval_shape(lambda: port(config, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  n_port = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  with torch.device('meta'):
    ref = hf_cls(hf_cfg(**config))
  n_ref = sum(p.numel() for p in ref.parameters())  # a tied head counted once
  assert n_port == n_ref
  assert n_port == EXPECTED[name]
  names = name_map(abstract.cfg)
  tied = {'lm_head.weight'} if abstract.language_model.lm_head is None else set()
  assert set(names) == set(ref.state_dict()) - tied
  paths = {tuple(p) for p, _ in nnx.to_flat_state(params)}
  assert {path for path, _ in names.values()} == paths
