"""Harvest a VLM's activations from images into the export format (input of the CSAE run).

    python -m experiments.run --config=experiments/configs/harvest.py \
        --config.model=qwen3-vl --config.model_path=DIR --config.images=IMAGE_DIR \
        --config.sites=vision/block_23 --workdir=WD

writes WD/activations/<site, '/' -> '_'>/ (shards [n_tokens, d], index.npz, images.json,
manifest.json), usable directly as `--config.data.path` of experiments/configs/csae.py.
Resumable: the same command after an interruption continues at the first unfinished chunk.

On several hosts (or processes), the same command on each with --coordinator_address=HOST0:PORT
--num_processes=N --process_id=I and one --workdir on a shared filesystem: chunk c is harvested
by process c % N, process 0 writes the manifests and, at the end, the index (README, Harvesting).

Sites: vision/block_{i} (output of vision block i, every patch token), vision/merger (merged image
tokens entering the language model), vision/deepstack_{j} (Qwen3-VL), vision/projector (Gemma-3,
LLaVA: the image tokens entering the language model), vision/embedding (SigLIP / CLIP alone: one
row per image, their get_image_features), text/layer_{i} (residual stream after decoder layer i;
image-token positions, or every token with all_tokens=True).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, ''):
    raise ValueError(f'unknown config variant {arg!r}; harvest.py has none')
  c = ml_collections.ConfigDict()
  c.stage = 'harvest'
  # A port ('qwen3-vl', 'gemma-3', 'llava-1.5' or 'llava'; 'siglip' / 'clip' alone) or a named
  # checkpoint of csae_jax.vlms.registry (e.g. 'qwen3-vl-4b-instruct', 'llava-1.5-13b', which
  # also sets the default site: the paper's).
  c.model = 'qwen3-vl'
  c.model_path = ''        # local HF checkpoint folder (config.json, *.safetensors, tokenizer, ...)
  c.images = ''            # a folder of images (labels = subfolder names), or 'tfds:NAME'
  c.data_dir = ''          # TFDS: the data_dir where the dataset is prepared (no download)
  c.split = 'train'        # TFDS split
  c.sites = ''             # comma-separated; '' = the model's default (Qwen3-VL-4B: vision/block_23)
  # every image resized to image_size x image_size; 0 = the port's default (Qwen3-VL: 256, the
  # paper's; Gemma-3: the checkpoint's vision_config.image_size, the only size its tower takes)
  c.image_size = 0
  c.prompt = 'Describe the image content accurately.'  # text sites: the user prompt (paper's)
  c.all_tokens = False     # text sites: keep every token, not only the image tokens
  c.batch_size = 8         # images per jitted forward
  # Image decoding + resizing processes (0: inline). Measured on an H200 machine with JPEGs:
  # 138 images/s inline, 115 with 12 processes (the rest of the host loop is the limit there);
  # worth trying when images are large or slow to decode.
  c.workers = 0
  c.chunk_images = 256     # images per shard; a killed harvest resumes at the first unfinished one
  c.max_images = 0         # 0 = every image
  c.dtype = 'float32'      # model compute dtype: 'float32' | 'bfloat16'
  c.store_dtype = 'float32'  # saved activations: 'float32' | 'float16'
  c.overwrite = False      # True: delete a site folder made with other settings and start again
  # the devices of each process (a multi-process harvest gives each process its own chunks and
  # runs them on its local devices only)
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1         # devices along the image batch
  c.mesh.model = 1         # devices the model's large weights are sharded over
  return c
