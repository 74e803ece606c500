"""Named checkpoints: which port loads them, and the paper's site and image size for each.

A user passes either a port name ('qwen3-vl': any Qwen3-VL checkpoint folder) or a checkpoint
name from here ('qwen3-vl-4b-instruct'); the folder itself always comes from `model_path`
(nothing is downloaded).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  name: str
  port: str            # key of PORTS
  hf_id: str           # where the weights are published (for the user's own download)
  default_site: str    # the paper's harvesting / steering site
  image_size: int      # the paper's image size


@dataclasses.dataclass(frozen=True)
class Port:
  name: str
  default_site: str
  # Reference embedding (csae_jax.evals.embeddings): the site whose tokens, pooled per image,
  # are the image's embedding by default, and whether its first token is a CLS token (pool='cls').
  embedding_site: str = ''
  cls_token: bool = False
  # image_size 0 in a harvest / steering config means this (0: the checkpoint's own size, for
  # towers that take one size only).
  default_image_size: int = 256


PORTS = {
    # The last vision block of the 4B/8B vision tower (depth 24) is block 23, the paper's site.
    # Embedding: the tower's own output (every block, then the 2x2 patch merger), i.e. what the
    # language model receives as the image: the nearest thing to an image embedding Qwen3-VL
    # has. It has no CLS token, so its tokens are mean-pooled.
    'qwen3-vl': Port('qwen3-vl', 'vision/block_23', embedding_site='vision/merger'),
    # Gemma-3-4B's SigLIP tower has 27 layers: block 26 is its last (before post_layernorm).
    # Embedding: the projector's pooled tokens (what the language model receives).
    'gemma-3': Port('gemma-3', 'vision/block_26', embedding_site='vision/projector',
                    default_image_size=0),
    # LLaVA-1.5's CLIP ViT-L/14-336 has 24 layers; the language model reads layer 22's output
    # (vision_feature_layer -2), the paper-style site. Embedding: the CLS token of that layer.
    'llava-1.5': Port('llava-1.5', 'vision/block_22', embedding_site='vision/block_22',
                      cls_token=True, default_image_size=0),
    # SigLIP / CLIP alone (csae_jax.vlms.image_encoders): reference embeddings for HMS, their
    # `get_image_features` (SigLIP's attention-pooled head, CLIP's projected CLS), one token.
    'siglip': Port('siglip', 'vision/embedding', embedding_site='vision/embedding',
                   default_image_size=0),
    'clip': Port('clip', 'vision/embedding', embedding_site='vision/embedding',
                 default_image_size=0),
}

CHECKPOINTS = {
    'qwen3-vl-4b-instruct': Checkpoint('qwen3-vl-4b-instruct', 'qwen3-vl',
                                       'Qwen/Qwen3-VL-4B-Instruct', 'vision/block_23', 256),
    'gemma-3-4b-it': Checkpoint('gemma-3-4b-it', 'gemma-3', 'google/gemma-3-4b-it',
                                'vision/block_26', 896),
    # The paper's LLaVA site: language-model layer 39 of the 13B (its last of 40), image tokens;
    # for the 7B (32 layers) its last layer, the same place in the stack.
    'llava-1.5-7b': Checkpoint('llava-1.5-7b', 'llava-1.5', 'llava-hf/llava-1.5-7b-hf',
                               'text/layer_31', 336),
    'llava-1.5-13b': Checkpoint('llava-1.5-13b', 'llava-1.5', 'llava-hf/llava-1.5-13b-hf',
                                'text/layer_39', 336),
    'siglip-so400m-patch14-384': Checkpoint('siglip-so400m-patch14-384', 'siglip',
                                            'google/siglip-so400m-patch14-384',
                                            'vision/embedding', 384),
    'clip-vit-large-patch14-336': Checkpoint('clip-vit-large-patch14-336', 'clip',
                                             'openai/clip-vit-large-patch14-336',
                                             'vision/embedding', 336),
}


# Short names users type for a port (`--config.model=llava`, as the command spells it).
ALIASES = {'llava': 'llava-1.5', 'gemma3': 'gemma-3', 'qwen3vl': 'qwen3-vl'}


def default_site(model: str) -> str:
  """The site a harvest of `model` takes when none is named: a named checkpoint's paper site,
  else its port's."""
  port, ckpt = resolve(model)
  return ckpt.default_site if ckpt else port.default_site


def resolve(model: str) -> tuple[Port, Checkpoint | None]:
  """(port, checkpoint entry or None) for a port, alias or checkpoint name."""
  key = model.strip().lower()
  key = ALIASES.get(key, key)
  if key in CHECKPOINTS:
    c = CHECKPOINTS[key]
    return PORTS[c.port], c
  if key in PORTS:
    return PORTS[key], None
  raise ValueError(f'unknown model {model!r}; use a port ({sorted(PORTS)}) or a named checkpoint '
                   f'({sorted(CHECKPOINTS)})')


def load(port: Port, folder: str, *, dtype: str = 'float32', mesh=None):
  """The port's model loaded from a local checkpoint folder."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if port.name == 'qwen3-vl':
    from csae_jax.vlms import qwen3_vl  # pylint: disable=g-import-not-at-top
    return qwen3_vl.Qwen3VL.from_pretrained(folder, dtype=jnp.dtype(dtype), mesh=mesh)
  if port.name == 'gemma-3':
    from csae_jax.vlms import gemma3  # pylint: disable=g-import-not-at-top
    return gemma3.Gemma3.from_pretrained(folder, dtype=jnp.dtype(dtype), mesh=mesh)
  if port.name == 'llava-1.5':
    from csae_jax.vlms import llava  # pylint: disable=g-import-not-at-top
    return llava.Llava.from_pretrained(folder, dtype=jnp.dtype(dtype), mesh=mesh)
  if port.name in ('siglip', 'clip'):
    from csae_jax.vlms import image_encoders  # pylint: disable=g-import-not-at-top
    cls = image_encoders.SiglipEncoder if port.name == 'siglip' else image_encoders.ClipEncoder
    return cls.from_pretrained(folder, dtype=jnp.dtype(dtype), mesh=mesh)
  raise ValueError(f'no loader for port {port.name!r}')


def preprocessor(port: Port, folder: str, image_size: int = 0):
  """The port's preprocessor (resize, patchify, prompt_ids, token grid positions); image_size 0
  = the port's default."""
  from csae_jax.vlms import preprocess  # pylint: disable=g-import-not-at-top
  if port.name == 'qwen3-vl':
    return preprocess.Qwen3VLPreprocessor(folder, image_size=image_size or
                                          port.default_image_size)
  if port.name == 'gemma-3':
    return preprocess.Gemma3Preprocessor(folder, image_size=image_size)
  if port.name == 'llava-1.5':
    return preprocess.LlavaPreprocessor(folder, image_size=image_size)
  if port.name == 'siglip':
    return preprocess.SiglipImages(folder, image_size=image_size)
  if port.name == 'clip':
    return preprocess.ClipImages(folder, image_size=image_size)
  raise ValueError(f'no preprocessor for port {port.name!r}')
