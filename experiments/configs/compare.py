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

The default data is the built-in hierarchy with co-occurring parents (scene_size 2,
scene_cooccur 0.5: concepts come together in images). Variants, '_'-joined: `:small` (CI / Colab
quick run), `:independent` (parents independent, the pipeline's default data), `:control`
(purely statistical hierarchy: children share no direction with their parent, a = 0, no parent
emission), e.g. `:small_control`. The sweep over scene_cooccur is
experiments/sweeps/scene_cooccur.py.

It takes every key of experiments/configs/csae.py (data.path, level1.*, level2.*, train.*,
joint.*, mesh.*), plus the `compare` group below. On your own activations:

    python -m experiments.run --config=experiments/configs/compare.py \
        --config.data.path=WD_HARVEST/activations/vision_block_23 \
        --config.compare.embeddings=EMB.npy --config.compare.taxonomy=COARSE.json --workdir=WD

or, instead of a provided EMB.npy, the reference embeddings computed by a vision port over the
same images the harvest read (cached in WD/embeddings/ for the next run):

    python -m experiments.run --config=experiments/configs/compare.py \
        --config.data.path=WD_HARVEST/activations/vision_block_23 \
        --config.compare.embedding_model=qwen3-vl --config.compare.embedding_model_path=DIR \
        --config.compare.embedding_site=vision/merger --config.compare.embedding_pool=mean \
        --workdir=WD
"""

import ml_collections

from experiments.configs import csae


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  # A variant is '' or '_'-joined tokens, e.g. 'small_control'.
  tokens = [t for t in (arg or '').split('_') if t]
  known = ('small', 'independent', 'control')
  if any(t not in known for t in tokens) or len(set(tokens)) != len(tokens):
    raise ValueError(f'unknown config variant {arg!r}; use "" or "_"-joined tokens of {known}, '
                     f'e.g. "small", "control", "small_control", "independent"')
  c = csae.get_config('small' if 'small' in tokens else None)
  c.mode = 'compare'
  # The comparison's data: concepts co-occur in scenes (pairs of parents, the second copying the
  # first's state half the time), as objects and their context do in images. With independent
  # parents (`:independent`) co-activation of a flat n2 SAE with a child is exactly its
  # parent, so co-activation ties the true grouping's HMS and no method can beat it there;
  # co-occurrence is what separates grouping by geometry from grouping by co-firing (README).
  c.data.synthetic.scene_size = 2
  c.data.synthetic.scene_cooccur = 0.0 if 'independent' in tokens else 0.5
  if 'control' in tokens:
    c.data.synthetic.child_parent_cos = 0.0
    c.data.synthetic.parent_emission = 0.0

  m = c.compare = ml_collections.ConfigDict()
  # Method families to run (comma-separated): csae, joint, stop_gradient, flat, matryoshka,
  # stacked, clustering, oracle (synthetic only). The shared level 1 (CSAE staged's) is always
  # trained.
  m.methods = 'csae,joint,stop_gradient,flat,matryoshka,stacked,clustering,reference,oracle'
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
  # Real data only, instead of `embeddings`: a vision port of csae_jax.vlms.registry run over the
  # harvest's own images (row i = image id i), cached in WD/embeddings/. '' = none.
  m.embedding_model = ''
  m.embedding_model_path = ''  # its local checkpoint folder (nothing is downloaded)
  # the site embedded; '' = the port's (Qwen3-VL: vision/merger; siglip / clip: vision/embedding,
  # their get_image_features)
  m.embedding_site = ''
  m.embedding_pool = 'mean'    # one vector per image: 'mean' of its tokens, or 'cls' (if any)
  # Real data only. JSON {fine label: coarse label} for the labels in the harvest's images.json:
  # taxonomy consistency of each concept's children vs the null.
  m.taxonomy = ''
  if 'small' in tokens:
    m.n_perm = 50
    m.alphas = '1.0'
  return c
