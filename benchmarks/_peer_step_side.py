"""Peer side of `benchmarks/train_throughput.py`: times a peer's own training step, inside its venv.

    .venv_saelens/bin/python benchmarks/_peer_step_side.py --lib saelens --arch batchtopk ...
    .venv_sparsify/bin/python benchmarks/_peer_step_side.py --lib sparsify --arch topk ...

SAELens: its `SAETrainer.step` (training forward pass with AuxK, dead-latent counter, backward,
grad clip, Adam, LR schedule). sparsify: the step of its `Trainer` written out (it has no public
one-step call): `SparseCoder.forward` with a dead mask (fused encoder: dense forward, sparse
backward), fvu + auxk_alpha * auxk, backward, decoder-parallel gradient removal, clip, Adam,
unit-norm decoder. --dead 1 (default): AuxK on in both (every latent counts as dead, as in ours);
--dead 0: no latent is dead, so AuxK is skipped; --dead_frac f: the first f n latents held dead. Prints one JSON line: seconds per step,
first-step seconds, peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time


# --retain_host_memory is read before torch loads (then again by main's parser, its child)
_PRE = argparse.ArgumentParser(add_help=False)
_PRE.add_argument('--retain_host_memory', type=int, default=0, help='1: glibc keeps freed '
                  'memory (csae_jax/hostmem.py), as our step runs')


def _retain_host_memory_first():
  """--retain_host_memory 1: the same glibc settings as ours (csae_jax/hostmem.py, stdlib
  only), applied before torch starts its threads, so the peer's step is timed both ways."""
  if _PRE.parse_known_args()[0].retain_host_memory:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from csae_jax import hostmem  # pylint: disable=g-import-not-at-top
    return hostmem.retain_freed_memory()
  return None


_RETAINED = _retain_host_memory_first()

import torch  # noqa: E402  (after the allocator's settings)


def saelens_step(a, x):
  import sae_lens  # pylint: disable=g-import-not-at-top
  from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
  from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
  from sae_lens.config import LoggingConfig, SAETrainerConfig
  from sae_lens.training.sae_trainer import SAETrainer
  common = dict(d_in=a.d, d_sae=a.n, k=a.k, dtype='float32', device='cpu',
                normalize_activations='none')
  sae = (TopKTrainingSAE(TopKTrainingSAEConfig(**common)) if a.arch == 'topk'
         else BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common)))
  steps = a.steps + 1
  cfg = SAETrainerConfig(
      total_training_samples=steps * a.batch, train_batch_size_samples=a.batch, lr=1e-4,
      lr_end=1e-4, lr_scheduler_name='constant', lr_warm_up_steps=0, lr_decay_steps=0,
      adam_beta1=0.9, adam_beta2=0.999, device='cpu', autocast=False,
      # --dead 1: every latent that did not fire last step is dead (AuxK on); 0: none is (the
      # window is longer than the run)
      dead_feature_window=0 if a.dead else 10**9,
      feature_sampling_window=steps, n_checkpoints=0, checkpoint_path=None,
      save_final_checkpoint=False, logger=LoggingConfig(log_to_wandb=False))
  trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter([x] * steps))
  if a.dead_frac <= 0:
    return lambda: trainer.step(x), sae_lens.__version__
  trainer.cfg.dead_feature_window = 10**9
  m = round(a.dead_frac * a.n)

  def step():  # the first m latents held dead (its counter is reset before every step)
    trainer.n_forward_passes_since_fired.zero_()
    trainer.n_forward_passes_since_fired[:m] = 2 * 10**9
    return trainer.step(x)
  return step, sae_lens.__version__


def sparsify_step(a, x):
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  from sparsify import SparseCoder, SparseCoderConfig
  if a.arch != 'topk':
    raise ValueError('sparsify trains TopK only (no BatchTopK); pass --arch topk')
  sae = SparseCoder(a.d, SparseCoderConfig(num_latents=a.n, k=a.k))
  opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
  dead = torch.ones(a.n, dtype=torch.bool) if a.dead else None
  if a.dead_frac > 0:
    dead = torch.arange(a.n) < round(a.dead_frac * a.n)

  def step():
    out = sae(x, dead_mask=dead)
    loss = out.fvu + (1 / 32) * out.auxk_loss
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    sae.set_decoder_norm_to_unit_norm()
    return loss
  return step, md.version('eai-sparsify')


def main():
  p = argparse.ArgumentParser(parents=[_PRE])
  p.add_argument('--lib', choices=('saelens', 'sparsify'), required=True)
  p.add_argument('--arch', choices=('topk', 'batchtopk'), required=True)
  for name in ('d', 'n', 'k', 'batch', 'steps'):
    p.add_argument(f'--{name}', type=int, required=True)
  p.add_argument('--threads', type=int, default=2)
  p.add_argument('--dead', type=int, default=1)
  p.add_argument('--dead_frac', type=float, default=0.0, help='> 0: this fraction of the latents '
                 'held dead (overrides --dead)')
  a = p.parse_args()
  torch.set_num_threads(a.threads)
  torch.manual_seed(0)
  x = torch.randn(a.batch, a.d) / a.d ** 0.5
  step, version = (saelens_step if a.lib == 'saelens' else sparsify_step)(a, x)
  t0 = time.perf_counter()
  step()  # first step: allocations, lazy init
  first_s = time.perf_counter() - t0
  step_s = []
  for _ in range(a.steps):  # the median step: one slow step on a shared machine moves no ratio
    t0 = time.perf_counter()
    step()
    step_s.append(time.perf_counter() - t0)
  s = statistics.median(step_s)
  print(json.dumps({'lib': a.lib, 'version': version, 'torch': torch.__version__, 'arch': a.arch,
                    's_per_step': s, 'steps_s': step_s, 'first_step_s': first_s,
                    'threads': torch.get_num_threads(), 'host_memory': _RETAINED,
                    'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == '__main__':
  main()
