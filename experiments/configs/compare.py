"""CSAE against its baselines on the same activations, n1, n2 and budget (the paper's comparison).

    python -m experiments.run --config=experiments/configs/compare.py --workdir=WD

trains, on the built-in synthetic hierarchy (or `--config.data.path=DIR`, your activations):
  csae                      CSAE staged: level 2 on the frozen level-1 decoder rows (= meta-SAE)
  csae_joint_alpha<a>       CSAE joint (the paper's objective, no stop-gradient), per compare.alphas
  csae_partial / _bilateral the paper's stop-gradient ablations at compare.ablation_alpha
  flat_coactivation         flat SAEs at n1 and n2; parent = the n2 feature co-firing most
  matryoshka_conditional    Matryoshka BatchTopK [n2, n1 - n2]; parent = argmax P(inner | outer)
  matryoshka_cosine         the same SAE; parent = the inner feature with the closest decoder row
  stacked                   an SAE on the level-1 codes; parent = argmax of the decoder column
  agglomerative / spectral / kmeans   clustering of the level-1 decoder rows into n2 groups
  oracle                    synthetic only: the same level-1 features grouped by their true parent
                            (the ceiling: a method scoring like it cannot be beaten on that score)
and writes WD/<method>/export/ (the CSAE export format, scored the same way), WD/compare.json,
WD/compare.md (the table), WD/compare_hms.png and WD/compare_recon.png.

Variants: `:small` (CI / Colab quick run), `:control` (purely statistical hierarchy: children
share no direction with their parent, a = 0, no parent emission), `:small_control`, `:scenes`
(parents co-occur in pairs, scene_cooccur = 0.9, as concepts do in images; the sweep over it is
experiments/sweeps/scene_cooccur.py).

It takes every key of experiments/configs/csae.py (data.path, level1.*, level2.*, train.*,
joint.*, mesh.*), plus the `compare` group below. On your own activations:

    python -m experiments.run --config=experiments/configs/compare.py \
        --config.data.path=WD_HARVEST/activations/vision_block_23 \
        --config.compare.embeddings=EMB.npy --config.compare.taxonomy=COARSE.json --workdir=WD
"""

import ml_collections

from experiments.configs import csae


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants = {None: (None, ''), '': (None, ''), 'small': ('small', ''),
              'control': (None, 'control'), 'small_control': ('small', 'control'),
              'scenes': (None, 'scenes')}
  if arg not in variants:
    raise ValueError(f'unknown config variant {arg!r}; known: "small", "control", '
                     f'"small_control", "scenes"')
  base, data = variants[arg]
  c = csae.get_config(base)
  c.mode = 'compare'
  if data == 'control':
    c.data.synthetic.child_parent_cos = 0.0
    c.data.synthetic.parent_emission = 0.0
  elif data == 'scenes':
    c.data.synthetic.scene_size = 2
    c.data.synthetic.scene_cooccur = 0.9

  m = c.compare = ml_collections.ConfigDict()
  # Method families to run (comma-separated): csae, joint, stop_gradient, flat, matryoshka,
  # stacked, clustering, oracle (synthetic only). The shared level 1 (CSAE staged's) is always
  # trained.
  m.methods = 'csae,joint,stop_gradient,flat,matryoshka,stacked,clustering,oracle'
  # Train seeds: one comparison each (WD/seed_<s>/) and a mean +- std table. '' = train.seed.
  m.seeds = ''
  # Joint CSAE (no stop-gradient) at each of these alphas (the paper: 1.0).
  m.alphas = '1.0,0.1'
  # Alpha of the partial and bilateral stop-gradient runs (where the stop-gradient matters).
  m.ablation_alpha = 1.0
  # k of the flat n2 SAE and of the stacked SAE; 0 = level1.k (same sparsity as level 1).
  m.baseline_k = 0
  # HMS / taxonomy nulls: this many size-matched random partitions of the same features.
  m.n_perm = 200
  m.null_seed = 0
  # Real data only. Reference embedding per image: a [n_images, e] .npy whose row i belongs to
  # image id i of the activations' index.npz (e.g. DINO CLS vectors; the paper uses DINOv3).
  # Synthetic data uses the true active-parent indicator of each sample instead.
  m.embeddings = ''
  # Real data only. JSON {fine label: coarse label} for the labels in the harvest's images.json:
  # taxonomy consistency of each concept's children vs the null.
  m.taxonomy = ''
  if base == 'small':
    m.n_perm = 50
    m.alphas = '1.0'
  return c
