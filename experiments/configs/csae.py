"""The CSAE pipeline: level-1 SAE on activations, level-2 SAE on its decoder rows.

Default (built-in synthetic hierarchy, the whole pipeline, a few minutes on 2 CPU cores):

    python -m experiments.run

Your own exported activations (a directory of `[n_i, d]` .npy / .safetensors files):

    python -m experiments.run --config=experiments/configs/csae.py \
        --config.data.path=DIR_OF_NPY_FILES --workdir=WD

Other useful overrides:

    --config.mode=joint                        # the paper's joint objective L1 + alpha * L2
    --config.level1.recipe=reference           # the paper's exact level-1 recipe (no AuxK, k annealing)
    --config.level1.n_latents=20000 --config.level1.k=6 --config.level2.n_latents=10000
    --config.train.steps=50000 --config.train.batch_size=1024 --config.train.lr=1e-4
    --config=experiments/configs/csae.py:small  # the CI / Colab quick variant

Every field is documented below; `csae_jax.config.from_config_dict` validates them (unknown keys
and ill-typed values fail with a message naming the key). A value of 0 for a size means "auto":
resolved from the data (see `csae_jax.config.resolve`) and recorded in the run's manifest.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # 'staged': level 1 trains and checkpoints, then level 2 trains on its frozen decoder rows
  # (the design card; a meta-SAE). 'joint': one objective L1 + alpha * L2 (the paper's method).
  # 'sweep': a grid of level-1 SAEs (see `sweep` below), no level 2.
  c.mode = 'staged'
  # Reuse nothing from a workdir whose checkpoints were made with another config: the run
  # refuses unless this is True, in which case the stale stage directories are deleted.
  c.overwrite = False
  # Seed stability, a signal for data without ground truth: train the same pipeline with
  # train.seed + 1 in WD/stability/ and report how much of the hierarchy it reproduces
  # (stability/feature_match, stability/concept_ari in metrics.json and the summary). Doubles
  # the run time.
  c.stability = False

  c.data = ml_collections.ConfigDict()
  # Directory (or single file) of exported activations, `[n_tokens, d]` .npy (float32/float16)
  # or .safetensors (one 2-D tensor each). Empty: the built-in synthetic hierarchy below.
  c.data.path = ''
  # Rows held out from training for evaluation; -1 = min(N // 10, 16384).
  c.data.holdout_rows = -1
  # Rows of held-out data used for metrics (FVU, L0, alive features).
  c.data.eval_rows = 32768

  # The synthetic hierarchical-concept source (used when data.path is empty).
  s = c.data.synthetic = ml_collections.ConfigDict()
  s.d = 128                # activation dimension
  s.n_parents = 16         # K parent concepts
  s.n_children = 4         # C children per parent (K * C child features in all)
  s.n_children_max = 0     # > n_children: unequal branching, C_i uniform in [n_children, this]
  s.child_parent_cos = 0.6  # a: child = normalize(a * parent + sqrt(1 - a^2) * u), u _|_ parent
  s.parent_corr = 0.0      # cosine between the parents of each pair (0, 1), (2, 3), ...
  s.p_parent = 0.2         # probability that a parent is active in a sample ('bernoulli')
  # number of active parents per sample: 'bernoulli' (each with p_parent), 'poisson' (Poisson
  # (mean_active), chosen uniformly) or 'fixed' (exactly mean_active); 0 = n_parents * p_parent
  s.active_count = 'bernoulli'
  s.mean_active = 0.0
  s.parent_emission = 0.0  # probability that an active parent also emits its own direction
  s.log_mag_mean = 0.0     # magnitudes ~ LogNormal(mean, std)
  s.log_mag_std = 0.25
  s.noise_std = 0.02       # Gaussian noise std per coordinate
  s.noise_std_max = 0.0    # > noise_std: anisotropic, per-coordinate std spread up to this
  s.seed = 1234            # seed of the ground-truth dictionary (data seed = train.seed)
  s.scene_size = 1         # scenes: consecutive groups of this many parents that co-occur
  s.scene_cooccur = 0.0    # P(a scene member copies its scene leader's on/off state)

  def sae(arch, n_latents, k):
    g = ml_collections.ConfigDict()
    g.arch = arch  # 'batch_topk' | 'topk' | 'relu_l1' | 'jumprelu' | 'matryoshka'
    g.n_latents = n_latents    # dictionary size; 0 = auto
    g.k = k                    # active latents per input (BatchTopK: on average); 0 = auto
    # 'default': AuxK dead-latent loss, no k annealing (recovers more of the ground truth);
    # 'reference': the paper's recipe (k annealed from d over the first 10%, no dead-latent loss).
    # The fields below set to None take the recipe's value; set them to override one piece.
    g.recipe = 'default'
    g.auxk_weight = config_dict.placeholder(float)     # AuxK loss weight (default 1/32)
    g.k_aux = 0                                        # dead latents used by AuxK; 0 = d/2
    g.dead_tokens = config_dict.placeholder(int)       # dead = not fired for this many inputs
    g.k_anneal_frac = config_dict.placeholder(float)   # anneal k from d to k over this fraction
    g.b_dec_init = 'geometric_median'                  # 'geometric_median' | 'mean' | 'zeros'
    # 'random' | 'data' (rows of the 1st batch) | 'kmeans++' (k-means++ seeds of the 1st batch);
    # None: level 1 random, level 2 kmeans++ (default recipe).
    g.decoder_init = config_dict.placeholder(str)
    # Inference threshold (BatchTopK): EMA(decay) of the batch's minimum positive activation,
    # updated from this step on (the reference: step 1000, decay 0.999). None: start at 10% of
    # the steps; decay 0.999, or faster when the remaining steps are too few for the EMA to
    # forget its first values (horizon <= 1/5 of them).
    g.threshold_decay = config_dict.placeholder(float)
    g.threshold_start = config_dict.placeholder(int)
    # relu_l1: weight of sum_i f_i ||d_i||, for unit-mean-squared-norm inputs (measured on the
    # synthetic data: 0.03 -> L0 25, 0.1 -> L0 5.3, 0.3 -> L0 3.8 with FVU 0.11)
    g.l1_coeff = 0.1
    g.sparsity_warmup_frac = 0.05   # relu_l1 / jumprelu: coefficient warmup over this fraction
    # jumprelu: width of the straight-through rectangle kernel and the initial threshold, in the
    # units of unit-mean-squared-norm inputs (Gemma Scope's 1e-3 assumes norm sqrt(d) inputs
    # and far longer runs: measured, thresholds then never leave their start here)
    g.jumprelu_bandwidth = 0.05
    g.jumprelu_init_threshold = 0.1
    g.l0_coeff = 1.0                # jumprelu: weight of the L0 (or target-L0) loss
    g.target_l0 = -1.0              # jumprelu: -1 = steer L0 to k; 0 = plain L0 penalty
    g.matryoshka_groups = ''        # matryoshka: group sizes "a,b,..." summing to n; '' = halves
    # k-sparse level 1: L1 on the selected codes, relative to a typical code (shrinks it by about
    # code_l1 / 2). It breaks the tie between a child and (its co-firing parent + a residual),
    # which code equally well under a top-k budget. None: the recipe's (default 0.075,
    # reference 0; level 2 and the other archs 0). Chosen on the robustness suite (README).
    g.code_l1 = config_dict.placeholder(float)
    return g

  # Level 1: the SAE on activations. TopK, not the paper's BatchTopK: given a k above the true
  # number of active features (a user does not know it), BatchTopK spends the slack on
  # splitting each child into its parent's direction plus an orthogonal residual (both exact, the
  # split one uses its average budget) and on noise, so the children CSAE groups are lost;
  # TopK's per-input budget makes inputs with many active concepts need the children themselves.
  # Measured on the issue-10 hierarchy (n1 512, k 4, 8k steps): children recovered 0.61 vs 1.00;
  # on the robustness suite (benchmarks/robustness.py, README) see the level-1 table.
  c.level1 = sae('topk', 0, 0)
  # Alive = fires on at least this fraction of the held-out inputs. Near-dead atoms (a handful of
  # firings) are not features; left in, they pile into one concept (PAPER.md's pitfall).
  c.level1.alive_min_density = 1e-4
  # Level 2: the SAE on level-1 decoder rows (one training example per alive level-1 feature).
  # TopK, not the paper's BatchTopK: with k2 = 1 every feature gets exactly one parent, whereas
  # BatchTopK over the rows lets some rows take two latents and others none. Measured on the
  # synthetic data, same level 1: lower level-2 loss in 11 of 12 runs, default ARI 0.914 vs
  # 0.886 (3 seeds; README). --config.level2.arch=batch_topk gives the paper's choice.
  c.level2 = sae('topk', 0, 1)
  c.level2.steps = 3000         # staged mode: optimiser steps over the rows (many epochs)
  # Staged mode: train this many level-2 SAEs from different seeds in one vmapped step and keep
  # the one with the lowest reconstruction loss on the rows (like k-means' n_init: a k=1 SAE on
  # a few thousand rows has local minima, and the lowest loss is the best grouping, measured).
  c.level2.restarts = 8
  c.level2.batch_size = 0       # rows per step; 0 = all alive rows (full batch) up to 4096
  c.level2.lr = 1e-3            # staged mode learning rate
  # parent(j) = argmax_r ReLU(W_enc2 (w_j - b_dec2) + b_enc2)_r when that max exceeds this.
  c.level2.assign_threshold = 1e-3
  # From the level-2 SAE to concepts (csae_jax/cascade/concepts.py). A level-2 SAE's loss always
  # drops when a latent splits, so n_latents above the true number of concepts cuts concepts
  # into fragments, and n_latents at it loses concepts to stray rows (and puts correlated
  # concepts in one latent). So the SAE trains oversplit x n_latents latents (0: half the rows,
  # the default); fragments whose members are as similar across as within (ratio >=
  # merge_ratio) are merged, and those down to merge_floor unless their within similarity is
  # merge_z standard errors above the cross (measurably distinct; config.py); rows move to the
  # concept their members are most similar to (refine; members no closer to their concept than unrelated directions
  # leave it); at most n_latents concepts are kept, the most coherent. The exported
  # level-2 SAE then has one latent per concept. merge_ratio = 0, refine = False, oversplit = 1:
  # the paper's rule alone (the trained SAE's argmax). Chosen on benchmarks/robustness.py.
  c.level2.oversplit = 0.0  # 0: half the rows
  c.level2.merge_ratio = 0.7
  c.level2.merge_z = 3.0
  c.level2.merge_floor = 0.5
  c.level2.refine = True

  c.train = ml_collections.ConfigDict()
  c.train.steps = 4000           # level-1 (and joint) optimiser steps
  c.train.batch_size = 1024      # inputs per step (global, over all hosts and devices)
  # Peak Adam learning rate. 0 = auto: 2e-4 * sqrt(2^14 / n1), sparsify's rule (2.3e-3 at
  # n1 = 128, 1.1e-3 at 512, 1.8e-4 at 20k; the paper: 1e-4 at n1 = 20k); chosen on
  # benchmarks/robustness.py against a constant 2e-3 (README).
  c.train.lr = 0.0
  c.train.seed = 0               # data order, initialisation
  c.train.warmup_steps = 100     # linear LR warmup
  c.train.decay_start = 0.8      # linear decay to 0 from this fraction of training
  # 'linear_decay' (reference: warmup, constant, linear decay from decay_start) | 'cosine' |
  # 'constant' (all after the warmup); level 2 uses the same kind
  c.train.lr_schedule = 'linear_decay'
  # 'bfloat16': encoder/decoder matmuls in bf16 (TPU/GPU speed); params, optimiser state,
  # thresholds and losses stay float32
  c.train.compute_dtype = 'float32'
  # The k-sparse level-1 step (saes/sparse.py): only the encoder GEMM is dense; decode, backward
  # and statistics touch the k * batch selected pairs. None = auto: on for TopK / BatchTopK with a
  # fixed k in staged mode on an unsharded latent axis, else off; True forces it (matryoshka too),
  # False keeps the dense step. `python -m benchmarks.train_throughput` measures both.
  c.train.sparse_decode = config_dict.placeholder(bool)
  c.train.grad_clip = 1.0        # global gradient-norm clip
  c.train.log_every = 25         # metrics / progress cadence (also bounds async dispatch)
  c.train.checkpoint_every = 500  # orbax save cadence (steps); the last step is always saved
  c.train.keep_checkpoints = 2   # keep-N per stage

  c.joint = ml_collections.ConfigDict()
  # Weight of the level-2 loss. The paper uses 1.0; on the synthetic hierarchy alpha = 1 pulls
  # siblings together and halves child recovery (README, joint sweep); 0.1 keeps level 1 intact.
  c.joint.alpha = 0.1
  c.joint.level2_start = 2000    # step at which level 2 starts (b_dec2 = geometric median)
  # 'none': L2's gradient reaches the level-1 decoder (the paper); 'partial': not through the
  # level-2 encoder input; 'bilateral': neither through the input nor the target.
  c.joint.stop_gradient = 'none'

  # mode='sweep': train a grid of level-1 SAEs on the same batches in one vmapped step and
  # report each (FVU, L0, dead, ground-truth recovery). Comma-separated values; '' = not swept.
  # e.g. --config.mode=sweep --config.sweep.k=2,4,8 --config.sweep.lr=1e-3,3e-3
  c.sweep = ml_collections.ConfigDict()
  # 1: the level-1 grid below. 2: level-2 SAEs on the decoder rows of this config's level 1
  # (trained once, stage 'level1', resumed like a staged run's), swept over seeds (level-2 init),
  # lr (level2.lr) and n2 (level2.n_latents; smaller dictionaries are padded with latents that
  # never fire), in one vmapped step; e.g. --config.sweep.level=2 --config.sweep.n2=8,16
  c.sweep.level = 1
  c.sweep.seeds = ''
  c.sweep.lr = ''
  c.sweep.k = ''              # TopK / BatchTopK / Matryoshka k (jumprelu: its target L0)
  c.sweep.l1_coeff = ''       # relu_l1
  c.sweep.l0_coeff = ''       # jumprelu
  c.sweep.n2 = ''             # sweep.level=2: level2.n_latents values

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1               # devices along the batch axis; -1 = all that remain
  c.mesh.model = 1               # devices along the latent axis

  if arg == 'small':  # CI / Colab quick variant of the same pipeline
    c.train.steps = 600
    c.train.checkpoint_every = 200
    c.train.batch_size = 512
    c.level2.steps = 600
    c.joint.level2_start = 300
    c.data.eval_rows = 8192
  elif arg not in (None, ''):
    raise ValueError(f'unknown config variant {arg!r}; known: "small"')
  return c
