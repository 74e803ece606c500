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


PORTS = {
    # The last vision block of the 4B/8B vision tower (depth 24) is block 23, the paper's site.
    # Embedding: the tower's own output (every block, then the 2x2 patch merger), i.e. what the
    # language model receives as the image: the nearest thing to an image embedding Qwen3-VL
    # has. It has no CLS token, so its tokens are mean-pooled.
    'qwen3-vl': Port('qwen3-vl', 'vision/block_23', embedding_site='vision/merger'),
}

CHECKPOINTS = {
    'qwen3-vl-4b-instruct': Checkpoint('qwen3-vl-4b-instruct', 'qwen3-vl',
                                       'Qwen/Qwen3-VL-4B-Instruct', 'vision/block_23', 256),
}


def resolve(model: str) -> tuple[Port, Checkpoint | None]:
  """(port, checkpoint entry or None) for a port or checkpoint name."""
  key = model.strip().lower()
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
  raise ValueError(f'no loader for port {port.name!r}')
