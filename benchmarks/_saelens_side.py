"""SAELens side of `benchmarks/peer_quality.py`; runs inside the SAELens virtual environment.

Trains one SAELens TopK or BatchTopK training SAE with SAELens's own `SAETrainer` (its loss,
AuxK, dead-latent counter, Adam, LR schedule, grad clipping and BatchTopK threshold) on exactly
the batches the csae_jax run sees: the main script passes the activation shards, the unit-norm
scale and the `[steps, batch]` row ids of every training batch (`ArraySource.global_indices`).

Afterwards it converts the SAE with SAELens's own inference export (`save_inference_model`:
decoder norms folded in; BatchTopK becomes a JumpReLU SAE with its learned threshold), loads it
back with `SAE.load_from_disk`, evaluates it on the held-out rows with SAELens's inference
`encode`/`decode`, and writes the folded weights (`weights.npz`) and metrics (`metrics.json`) so
the main script can evaluate both libraries with one numpy function.

Not imported by anything; the main script runs it as
    .venv_saelens/bin/python benchmarks/_saelens_side.py --arch topk --work DIR ...
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

import numpy as np
import torch


def parse():
  p = argparse.ArgumentParser()
  p.add_argument('--arch', choices=('topk', 'batchtopk'), required=True)
  p.add_argument('--work', required=True, help='dir with data/, train_ids.npy, eval.npy, meta.json')
  p.add_argument('--out', required=True, help='output dir for weights.npz and metrics.json')
  p.add_argument('--n_latents', type=int, required=True)
  p.add_argument('--k', type=int, required=True)
  p.add_argument('--lr', type=float, required=True)
  p.add_argument('--warmup_steps', type=int, required=True)
  p.add_argument('--decay_steps', type=int, required=True)
  p.add_argument('--dead_feature_window', type=int, required=True,
                 help='steps without firing after which SAELens counts a latent dead (AuxK)')
  p.add_argument('--threads', type=int, default=2)
  p.add_argument('--seed', type=int, default=0)
  return p.parse_args()


class Batches:
  """Iterator of the exact training batches: rows `ids[step]` of the shards, times `scale`."""

  def __init__(self, data_dir: str, ids_sb: np.ndarray, scale: float):
    # Same file order as csae_jax's ArraySource: sorted names, rows concatenated.
    paths = sorted(glob.glob(os.path.join(data_dir, '*.npy')))
    self.rows_nd = np.concatenate([np.load(p, mmap_mode='r') for p in paths])
    self.ids_sb, self.scale, self.step = ids_sb, np.float32(scale), 0

  def __iter__(self):
    return self

  def __next__(self) -> torch.Tensor:
    if self.step >= len(self.ids_sb):
      raise StopIteration
    x_bd = self.rows_nd[self.ids_sb[self.step]].astype(np.float32) * self.scale
    self.step += 1
    return torch.from_numpy(x_bd)


@torch.no_grad()
def evaluate(sae, x_nd: np.ndarray, batch: int = 4096) -> dict:
  """FVU = sum ||x - x_hat||^2 / sum ||x - mean||^2, L0, never-firing latents (SAELens inference)."""
  sq_err, n, l0 = 0.0, 0, 0.0
  fires = torch.zeros(sae.cfg.d_sae, dtype=torch.int64)
  for lo in range(0, len(x_nd), batch):
    x = torch.from_numpy(np.ascontiguousarray(x_nd[lo:lo + batch]))
    acts = sae.encode(x)
    x_hat = sae.decode(acts)
    sq_err += float(((x_hat - x) ** 2).double().sum())
    l0 += float((acts > 0).sum())
    fires += (acts > 0).sum(0)
    n += len(x)
  x64 = x_nd.astype(np.float64)
  total_var = float(((x64 - x64.mean(0)) ** 2).sum())
  return {'fvu': sq_err / total_var, 'l0': l0 / n, 'dead_frac': float((fires == 0).float().mean()),
          'n_rows': n}


def main():
  a = parse()
  torch.set_num_threads(a.threads)
  torch.manual_seed(a.seed)
  import sae_lens  # pylint: disable=g-import-not-at-top
  from sae_lens import SAE, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig  # noqa: F401
  from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
  from sae_lens.config import LoggingConfig, SAETrainerConfig
  from sae_lens.training.sae_trainer import SAETrainer

  meta = json.load(open(os.path.join(a.work, 'meta.json')))
  ids_sb = np.load(os.path.join(a.work, 'train_ids.npy'))
  steps, batch = ids_sb.shape
  data = Batches(os.path.join(a.work, 'data'), ids_sb, meta['scale'])
  d = data.rows_nd.shape[1]

  # Library defaults except what the comparison fixes: sizes, k, and normalize_activations
  # 'none' because both libraries get the same pre-scaled (unit mean squared norm) inputs.
  common = dict(d_in=d, d_sae=a.n_latents, k=a.k, dtype='float32', device='cpu',
                normalize_activations='none')
  if a.arch == 'topk':
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(**common))
  else:
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
  trainer_cfg = SAETrainerConfig(
      total_training_samples=steps * batch, train_batch_size_samples=batch, lr=a.lr, lr_end=a.lr,
      lr_scheduler_name='constant', lr_warm_up_steps=a.warmup_steps, lr_decay_steps=a.decay_steps,
      adam_beta1=0.9, adam_beta2=0.999, device='cpu', autocast=False,
      dead_feature_window=a.dead_feature_window, feature_sampling_window=max(steps, 1),
      n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
      logger=LoggingConfig(log_to_wandb=False))
  trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=data)
  print(f'[saelens {a.arch}] sae_lens {sae_lens.__version__}, torch {torch.__version__}, '
        f'{torch.get_num_threads()} threads, {steps} steps x {batch}', flush=True)
  t0 = time.perf_counter()
  trainer.fit()
  wall = time.perf_counter() - t0
  dead_train = int(trainer.dead_neurons.sum())
  print(f'[saelens {a.arch}] trained in {wall:.1f}s; trainer dead counter: {dead_train}',
        flush=True)

  # SAELens's own inference export: folds decoder norms (rescale_acts_by_decoder_norm) into the
  # weights; BatchTopK is saved as a JumpReLU SAE whose threshold is the learned topk threshold.
  os.makedirs(a.out, exist_ok=True)
  inf_dir = os.path.join(a.out, 'inference_sae')
  sae.save_inference_model(inf_dir)
  inf = SAE.load_from_disk(inf_dir, device='cpu')
  inf.eval()
  x_eval = np.load(os.path.join(a.work, 'eval.npy'))
  ev = evaluate(inf, x_eval)
  sd = {k: v.detach().cpu().numpy() for k, v in inf.state_dict().items()}
  arrays = {'w_enc': sd['W_enc'], 'b_enc': sd['b_enc'], 'w_dec': sd['W_dec'], 'b_dec': sd['b_dec']}
  if 'threshold' in sd:
    arrays['threshold'] = sd['threshold']
  np.savez(os.path.join(a.out, 'weights.npz'), **arrays)
  out = {'library': 'sae_lens', 'sae_lens_version': sae_lens.__version__,
         'torch_version': torch.__version__, 'arch': a.arch, 'inference_class': type(inf).__name__,
         'wall_s': wall, 'steps': steps, 'batch_size': batch, 'lr': a.lr,
         'dead_feature_window': a.dead_feature_window,
         'trainer_dead_latents': dead_train, 'trainer_dead_frac': dead_train / a.n_latents,
         'own_eval': ev, 'config': {k: (v if isinstance(v, (int, float, str, bool, type(None)))
                                        else str(v)) for k, v in vars(sae.cfg).items()}}
  if 'threshold' in sd:
    out['threshold'] = float(np.mean(sd['threshold']))
  with open(os.path.join(a.out, 'metrics.json'), 'w') as f:
    json.dump(out, f, indent=1)
  print(f'[saelens {a.arch}] held-out (SAELens inference): fvu {ev["fvu"]:.4f} l0 {ev["l0"]:.2f} '
        f'dead {ev["dead_frac"]:.4f}', flush=True)


if __name__ == '__main__':
  main()
