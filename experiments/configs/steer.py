"""Group-level concept steering of a VLM's captions (the paper's protocol), and its synthetic
benchmark.

    python -m experiments.run --config=experiments/configs/steer.py --config.model=qwen3-vl \
        --config.model_path=MODEL_DIR --config.images=IMAGE_DIR --config.export=EXPORT_DIR \
        --config.site=vision/block_23 --config.concepts=C1,C2 --config.arms=none,concept \
        --config.value=V --config.mode=clamp --config.max_new_tokens=N --workdir=WD

writes WD/steer/captions.jsonl (one caption per line: image, arm, concept, sign, value, mode,
tokens, text, ...), judgments.jsonl, results.json and results.md (appeared % / removed % per arm,
similarity of steered to unsteered captions). EXPORT_DIR is a CSAE run's export/ (level1_sae.npz,
hierarchy.json); the clamp value s * u is measured on the harvest that run trained on (found
through its level-1 manifest, or --config.harvest=WD_HARVEST/activations/<site>).

    python -m experiments.run --config=experiments/configs/steer.py:synthetic --workdir=WD

trains CSAE and Matryoshka on the synthetic hierarchy per seed, a readout of the parent concepts,
and steers every concept with every arm (WD/steer_synthetic/results.{json,md}).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg == 'synthetic':
    return synthetic_config()
  if arg not in (None, ''):
    raise ValueError(f'unknown config variant {arg!r}; steer.py has "synthetic"')
  c = ml_collections.ConfigDict()
  c.stage = 'steer'
  c.model = 'qwen3-vl'     # a port or a named checkpoint of csae_jax.vlms.registry
  c.model_path = ''        # local HF checkpoint folder (weights, tokenizer, preprocessor config)
  c.images = ''            # the harvested images (folder with class subfolders, or 'tfds:NAME')
  c.data_dir = ''          # TFDS data_dir
  c.split = 'train'        # TFDS split
  c.export = ''            # CSAE export/ folder (level1_sae.npz, hierarchy.json)
  c.harvest = ''           # harvest site folder; '' = the export run's level-1 data.path
  c.matryoshka_export = ''  # Matryoshka baseline export (mode=compare: WD/matryoshka_cosine/export)
  c.site = ''              # the steered site; '' = the harvest's (e.g. vision/block_23)
  c.concepts = ''          # comma-separated level-2 concept ids; '' = sample n_concepts
  c.n_concepts = 10        # concepts sampled (seeded) among those with labelled top images
  c.min_members = 2        # concepts with fewer level-1 members are not sampled
  c.images_per_concept = 100
  c.top_frac = 0.5         # this share of a concept's images are its top images, the rest random
  c.arms = ''              # '' = none,random,single,[matryoshka,]concept
  c.value = 0.0            # > 0: clamp magnitude V for every arm (+V insert, -V suppress)
  c.s = 3.0                # else value = s * u, u the concept's scale on its top-10 images
  c.mode = 'clamp'         # clamp | clamp_error | add | ablate
  c.direction = 'members'  # mode=add: unit sum of member rows, or 'level2' (the concept's row)
  c.positions = ''         # '' = every token of the site; 'image' = image tokens; or "0,3,7"
  c.max_new_tokens = 30
  c.prompt = 'Describe what is in this image in one short sentence.'
  c.image_size = 0         # 0 = the harvest's image size
  c.batch_size = 8         # images per generate call
  c.suppress_on = 'present'  # present: images whose unsteered caption shows the concept | all
  c.judge = 'lexical'      # lexical (label words + synonyms) | vlm (blind A/B/C/D)
  c.judge_model = ''       # judge=vlm: port or registry name
  c.judge_model_path = ''  # judge=vlm: its checkpoint folder
  c.label_hierarchy = ''   # json {label: parent} or {label: [synonyms]}
  c.label_min_frac = 0.3   # labels covering this share of the top images name the concept
  c.seed = 0
  c.dtype = 'float32'      # model compute dtype: float32 | bfloat16
  c.overwrite = False      # True: replace a steering run made with other settings
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.model = 1         # devices the model's large weights are sharded over
  return c


def synthetic_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = 'steer_synthetic'
  c.seeds = '0,1,2'        # each seed trains its own CSAE and Matryoshka
  c.modes = 'clamp,clamp_error'
  c.arms = 'none,random,single,matryoshka,concept'
  c.s = 3.0                # value = s * u
  c.value = 0.0            # > 0: fixed clamp magnitude instead
  c.steps = 4000           # level-1 training steps (the pipeline's default)
  c.level2_steps = 3000    # staged level-2 steps (the pipeline's default)
  c.n_eval = 4096          # held-out samples steered (absent / present split per concept)
  c.n_readout = 32768      # readout training samples
  c.min_members = 2
  c.overwrite = False
  return c
