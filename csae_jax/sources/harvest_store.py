"""The on-disk side of harvesting: one folder per site, written chunk by chunk, resumable.

    <workdir>/activations/<site with '/' -> '_'>/
        shard_00000.npy ...   [n_tokens, d] activations of the chunk's images (export format)
        shard_00000.idx.npz   the chunk's rows: image_id, token_index, row, col
        index.npz             all rows, aligned with the shards in name order (written at the end)
        shard_00000.images.json   the chunk's images: id -> {"file": key, "label": label or null}
        images.json           all chunks' images (written at the end)
        manifest.json         what made it (model, site, image size, prompt, images, chunking)

Shards are named by chunk, so the processes of a multi-process harvest (each writing its own
chunks, `harvest.run`) never write the same file, and the name order is the 1-process order.
A chunk is complete when its shard and its .idx.npz exist (both written to a temporary name and
renamed), so a killed harvest restarts at its first incomplete chunk. `ArraySource` reads only
`.npy`/`.safetensors`, so the folder is directly a `--config.data.path` of the CSAE run.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from csae_jax import checkpoint as ckpt_lib

SCHEMA_VERSION = 1


def site_dirname(site: str) -> str:
  return site.replace('/', '_')


class SiteStore:
  """Chunked writer for one site's activations."""

  def __init__(self, root: str, site: str, manifest: dict, *, overwrite: bool,
               create: bool = True):
    """create=False (the other processes of a multi-process harvest): only check the manifest
    that process 0 wrote, so one process alone deletes or writes it."""
    self.dir = os.path.join(root, site_dirname(site))
    path = os.path.join(self.dir, 'manifest.json')
    want = {'schema_version': SCHEMA_VERSION, 'site': site, **manifest}
    if not create:
      self._check(path, want)
      return
    if os.path.exists(path):
      have = ckpt_lib.read_json(path)
      if have != want:
        if not overwrite:
          raise self._mismatch(have, want)
        shutil.rmtree(self.dir)
    os.makedirs(self.dir, exist_ok=True)
    ckpt_lib.write_json_atomic(path, want)

  def _mismatch(self, have: dict, want: dict) -> ValueError:
    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    return ValueError(f'{self.dir} holds a harvest made with other settings (differs in '
                      f'{diff}); use another --workdir, or --config.overwrite=True to '
                      f'delete it and start again')

  def _check(self, path: str, want: dict) -> None:
    if not os.path.exists(path):
      raise ValueError(f'{path} does not exist after process 0 created it: every process of a '
                       f'multi-process harvest needs the same --workdir on a filesystem they all '
                       f'see (a shared disk), or process 0 failed (see its log)')
    have = ckpt_lib.read_json(path)
    if have != want:  # process 0 refused it (no overwrite) and says the same
      raise self._mismatch(have, want)

  def _paths(self, chunk: int) -> tuple[str, str, str]:
    return (os.path.join(self.dir, f'shard_{chunk:05d}.npy'),
            os.path.join(self.dir, f'shard_{chunk:05d}.idx.npz'),
            os.path.join(self.dir, f'shard_{chunk:05d}.images.json'))

  def done(self, chunk: int) -> bool:
    return all(os.path.exists(p) for p in self._paths(chunk))  # images.json is written first

  def write_chunk(self, chunk: int, acts_td: np.ndarray, index: dict[str, np.ndarray],
                  dtype: str, images: dict) -> None:
    """images: the chunk's image id -> {"file", "label"}, recorded where the images were read
    (a TFDS record decodes whole: reading labels again at the end would decode every image
    twice)."""
    shard, idx, images_path = self._paths(chunk)
    ckpt_lib.write_json_atomic(images_path, images)
    lengths = {k: len(v) for k, v in index.items()}
    if any(n != len(acts_td) for n in lengths.values()):
      raise AssertionError(f'index lengths {lengths} != {len(acts_td)} rows')  # a bug, not input
    tmp = os.path.join(self.dir, f'.shard_{chunk:05d}.tmp')
    with open(tmp, 'wb') as f:  # a file handle stops np.save from appending ".npy"
      np.save(f, np.ascontiguousarray(acts_td, dtype=dtype))
    tmp_idx = tmp + '.idx'
    with open(tmp_idx, 'wb') as f:
      np.savez(f, **{k: np.asarray(v, np.int32) for k, v in index.items()})
    os.replace(tmp, shard)  # shard first: a chunk counts as done only once its index exists
    os.replace(tmp_idx, idx)

  def finalize(self, n_chunks: int) -> int:
    """index.npz (all chunks, shard order) and images.json; returns the number of rows."""
    parts, images = [], {}
    for c in range(n_chunks):
      with np.load(self._paths(c)[1]) as z:
        parts.append({k: z[k] for k in z.files})
      images.update(ckpt_lib.read_json(self._paths(c)[2]))
    index = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    tmp = os.path.join(self.dir, '.index.tmp')
    with open(tmp, 'wb') as f:
      np.savez(f, **index)
    os.replace(tmp, os.path.join(self.dir, 'index.npz'))
    ckpt_lib.write_json_atomic(os.path.join(self.dir, 'images.json'), images)
    return len(index['image_id'])

