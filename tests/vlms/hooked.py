"""transformers' greedy `generate` with forward hooks standing in for a port's edits: the
reference of "identical greedy tokens with edits" (the ports' parity tests share it)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch


def generate(torch_model, kw: dict, n: int,
             hooks: Sequence[tuple[torch.nn.Module, Callable]], **extra
             ) -> tuple[np.ndarray, np.ndarray]:
  """(new tokens [B, n], per-step logits [B, n, V]) of HF's greedy decoding while each
  (module, fn) replaces the module's output o by fn(o), in the prefill and every decode step."""
  # Prepended: transformers 5 records `hidden_states` (LLaVA and Gemma-3 read their image
  # features from them) with forward hooks it installs once, on a model's first forward. An edit
  # appended after those runs after the recording and is silently lost once the model has run.
  handles = [module.register_forward_hook(lambda m, a, o, fn=fn: fn(o), prepend=True)
             for module, fn in hooks]
  try:
    with torch.no_grad():
      out = torch_model.generate(**kw, max_new_tokens=n, do_sample=False, pad_token_id=0,
                                 eos_token_id=None, output_logits=True,
                                 return_dict_in_generate=True, **extra)
  finally:
    for h in handles:
      h.remove()
  return (out.sequences[:, kw['input_ids'].shape[1]:].numpy(),
          torch.stack(out.logits, 1).numpy())
