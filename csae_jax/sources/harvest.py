"""Harvesting: images -> a VLM port's named sites -> activation shards in the export format.

`run(cfg, workdir)` is the entry point (`python -m experiments.run
--config=experiments/configs/harvest.py ...`). Images are resized to `image_size`^2, processed by
the port's preprocessor (`registry.preprocessor`) and sent through the jitted port in batches of
`batch_size`
(one compilation: every batch has the same grid; the last one is padded by repeating its final
image, whose copies are dropped). Vision sites need only the vision tower; text sites run the
whole model on the chat prompt with the image (`prompt`), and keep the image tokens (or all of
them). Every `chunk_images` images become one shard per site (`harvest_store`), so a killed
harvest resumes at its first unfinished chunk.

Each row's provenance goes to the index: image id, token index within the image's tokens, and
the (row, col) of the token in the patch grid (vision blocks) or the merged grid (merger, text
image tokens; -1 for text tokens that are not image tokens), which reports use to show the
top-activating patches.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from csae_jax import checkpoint as ckpt_lib
from csae_jax import config as config_lib
from csae_jax import sharding
from csae_jax.sources import harvest_store, images as images_lib
from csae_jax.vlms import registry


# Decoding and resizing are PIL work that holds the GIL (threads gave no speed-up), while the 4B
# vision tower harvests ~1,700 images/s on an H200 in bf16. `workers` > 0 runs them in a pool of
# processes ('spawn': forking a process that runs JAX is unsafe) that return uint8 [S, S, 3]
# arrays (196 kB at 256^2, not 1.5 MB of float patches); the normalisation and patch flattening
# are one vectorised numpy call on the whole batch in the main process
# (the preprocessor's `patchify`, tested equal to the model's processor).
_WORKER: dict = {}


def _worker_init(images_spec: str, data_dir: str, split: str, model: str, model_path: str,
                 image_size: int):
  _WORKER['images'] = images_lib.open_images(images_spec, data_dir=data_dir, split=split)
  _WORKER['pre'] = registry.preprocessor(registry.resolve(model)[0], model_path, image_size)


def _load_resized(imgs, pre, ids: list[int]
                  ) -> tuple[np.ndarray, list]:
  """[n, S, S, 3] uint8 and the labels, each image read once."""
  loaded = [imgs.load_labelled(i) for i in ids]
  return np.stack([pre.resize(im) for im, _ in loaded]), [label for _, label in loaded]


def _worker_resize(ids: list[int]) -> tuple[np.ndarray, list]:
  return _load_resized(_WORKER['images'], _WORKER['pre'], ids)


class Preprocessing:
  """Batches of (pixel_values, grid_thw, labels) for lists of image ids, in order; with workers,
  two batches are in flight while the device runs."""

  def __init__(self, cfg: config_lib.HarvestConfig, imgs, pre):
    self.imgs, self.pre, self.cfg = imgs, pre, cfg
    self.pool = None
    if cfg.workers:
      import concurrent.futures  # pylint: disable=g-import-not-at-top
      import multiprocessing  # pylint: disable=g-import-not-at-top
      self.pool = concurrent.futures.ProcessPoolExecutor(
          cfg.workers, mp_context=multiprocessing.get_context('spawn'),
          initializer=_worker_init, initargs=(cfg.images, cfg.data_dir, cfg.split, cfg.model,
                                              cfg.model_path, pre.image_size))

  def batches(self, id_batches: list[list[int]]):
    if self.pool is None:
      for ids in id_batches:
        images, labels = _load_resized(self.imgs, self.pre, ids)
        yield (*self.pre.patchify(images), labels)
      return
    per = max(1, -(-len(id_batches[0]) // self.cfg.workers)) if id_batches else 1

    def submit(ids):
      return [self.pool.submit(_worker_resize, ids[j:j + per]) for j in range(0, len(ids), per)]
    queue = [submit(ids) for ids in id_batches[:2]]
    for n in range(len(id_batches)):
      parts = [f.result() for f in queue.pop(0)]
      if n + 2 < len(id_batches):
        queue.append(submit(id_batches[n + 2]))
      yield (*self.pre.patchify(np.concatenate([im for im, _ in parts])),
             [label for _, labels in parts for label in labels])

  def close(self):
    if self.pool is not None:
      self.pool.shutdown()


def parse_sites(spec: str, default: str) -> list[str]:
  sites = [s.strip() for s in (spec or default).split(',') if s.strip()]
  if len(set(sites)) != len(sites):
    raise ValueError(f'sites {spec!r} names a site twice')
  return sites


class Harvester:
  """A batch of images -> per site: activations of every image, with their index rows.

  Any port with the common interface works: `model.forward(ids, pixels, grid, sites=)`,
  `model.vision_forward(pixels, grid, sites=)`, `model.cfg.image_token_id`; the preprocessor's
  `prompt_ids`, `patch_positions` and `merged_positions` (registry.preprocessor)."""

  def __init__(self, model, pre, sites: list[str], *,
               prompt: str, all_tokens: bool):
    self.model, self.pre, self.sites = model, pre, sites
    self.prompt, self.all_tokens = prompt, all_tokens
    bad = [s for s in sites if not s.startswith(('vision/', 'text/'))]
    if bad:
      raise ValueError(f'unknown site(s) {bad}; sites are vision/block_{{i}}, vision/merger, '
                       f'vision/deepstack_{{j}}, vision/projector or text/layer_{{i}}')
    self.text = any(s.startswith('text/') for s in sites)
    self._patch_rc = pre.patch_positions()
    self._merged_rc = pre.merged_positions()
    self._ids = None

  def _prompt_ids(self, grid_i3: np.ndarray) -> np.ndarray:
    if self._ids is None:  # same image size and prompt for every image: tokenise once
      self._ids = self.pre.prompt_ids(grid_i3[:1], self.prompt)
    return self._ids

  def __call__(self, pixels: np.ndarray, grid: np.ndarray, image_ids: np.ndarray,
               store_dtype: str) -> dict[str, tuple[np.ndarray, dict]]:
    """A preprocessed batch -> {site: (acts_td of the first len(image_ids) images, index)}.

    Rows are cast to the store dtype on the device (half the transfer for float16); images past
    len(image_ids) are the padding of a short last batch and are dropped."""
    b = len(grid)
    if self.text:
      ids_bs = np.tile(self._prompt_ids(grid), (b, 1))
      out = self.model.forward(ids_bs, pixels, grid, sites=self.sites)
    else:
      out = self.model.vision_forward(pixels, grid, sites=tuple(self.sites))
    out = jax.device_get({k: out[k].astype(store_dtype) for k in self.sites})
    return {site: self._rows(site, np.asarray(out[site]), image_ids, b) for site in self.sites}

  def _rows(self, site: str, acts: np.ndarray, image_ids: np.ndarray, b: int
            ) -> tuple[np.ndarray, dict]:
    n = len(image_ids)
    if site.startswith('vision/'):  # [b * per, d] or [b, per, d]: each image's tokens in order
      acts = acts.reshape(-1, acts.shape[-1])
      per = len(acts) // b
      rows, cols = self._patch_rc if per == len(self._patch_rc[0]) else self._merged_rc
      token = np.arange(per)
    else:  # [b, seq, d]: the same prompt for every image
      ids = self._ids
      is_img = ids == self.model.cfg.image_token_id
      keep = np.ones_like(is_img) if self.all_tokens else is_img
      r_all, c_all = np.full(len(ids), -1), np.full(len(ids), -1)
      r_all[is_img], c_all[is_img] = self._merged_rc
      token = np.flatnonzero(keep)
      rows, cols, per = r_all[keep], c_all[keep], int(keep.sum())
      acts = acts[:, keep].reshape(b * per, -1)
    index = {'image_id': np.repeat(image_ids, per), 'token_index': np.tile(token, n),
             'row': np.tile(rows, n), 'col': np.tile(cols, n)}
    return acts[:n * per], index


def site_batches(prep: Preprocessing, harvester: Harvester, ids: list[int], batch_size: int,
                 store_dtype: str):
  """Yields (batch's image ids, their labels, {site: (acts_td, index)}) over `ids` in order.

  Every forward has batch_size images (a short last batch repeats its final image, whose rows
  are dropped): one compilation. Harvesting and the reference embeddings
  (csae_jax.evals.embeddings) both read images through here, so image id i is the same image."""
  id_batches = [ids[b0:b0 + batch_size] for b0 in range(0, len(ids), batch_size)]
  padded = [b + [b[-1]] * (batch_size - len(b)) for b in id_batches]
  for b, (pixels, grid, labels) in zip(id_batches, prep.batches(padded)):
    yield b, labels[:len(b)], harvester(pixels, grid, np.asarray(b), store_dtype)


def _all_gather(tree):
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree)


def _open_stores(root: str, sites: list[str], manifest: dict, overwrite: bool
                 ) -> dict[str, harvest_store.SiteStore]:
  """One writer of the manifests: process 0 creates, validates or overwrites them (an overwrite's
  rmtree must not race another process's chunk writes), then every process passes a barrier and
  the others check what process 0 left (the same error where it refused); if any process fails,
  every process raises."""
  if jax.process_count() == 1:
    return {s: harvest_store.SiteStore(root, s, manifest, overwrite=overwrite) for s in sites}
  stores, error = {}, None
  if jax.process_index() == 0:
    try:
      stores = {s: harvest_store.SiteStore(root, s, manifest, overwrite=overwrite)
                for s in sites}
    except ValueError as e:  # still meet the others at the barrier, or they would wait forever
      error = e
  ckpt_lib.barrier('harvest/manifests')
  if jax.process_index() != 0:
    try:
      stores = {s: harvest_store.SiteStore(root, s, manifest, overwrite=False, create=False)
                for s in sites}
    except ValueError as e:
      error = e
  # all stop if one cannot go on (e.g. a --workdir that is not shared): the others would wait
  # for its chunks at the end
  failed = np.flatnonzero(_all_gather(np.int32(error is not None))).tolist()
  if error is not None:
    raise error
  if failed:
    raise ValueError(f'process(es) {failed} of this harvest could not open the store in '
                     f'{root}; their logs name the problem')
  return stores


def _chunk_bounds(c: int, chunk_images: int, n_images: int) -> tuple[int, int]:
  return c * chunk_images, min((c + 1) * chunk_images, n_images)


def _gather_runs(todo: list[int], n_chunks: int, done_images: int, elapsed: float
                 ) -> tuple[list[list[int]], int, float]:
  """(chunks each process ran, images timed on all, the longest time): an all-gather, so also
  the barrier that every process's chunks are on disk before process 0 finalizes."""
  ran = np.zeros(n_chunks, np.int32)
  ran[todo] = 1
  out = _all_gather(
      {'ran': ran, 'images': np.int32(done_images), 'elapsed': np.float32(elapsed)})
  return ([np.flatnonzero(r).tolist() for r in out['ran']], int(np.sum(out['images'])),
          float(np.max(out['elapsed'])))


def run(cd, workdir: str) -> dict:
  """Harvests every chunk not yet on disk; returns counts and throughput.

  In a multi-process run (jax.process_count() > 1, all processes on the same --workdir of a
  shared filesystem) chunk c is process c % process_count's: each runs the model on its own
  devices on its own chunks (no cross-process collective in the forward), process 0 alone
  writes the manifests, and once every chunk is on disk, the index, images.json and
  harvest.json. The store is then the one a 1-process harvest writes, file for file."""
  cfg = cd if isinstance(cd, config_lib.HarvestConfig) else config_lib.harvest_from_config_dict(cd)
  port, _ = registry.resolve(cfg.model)
  sites = parse_sites(cfg.sites, registry.default_site(cfg.model))
  imgs = images_lib.open_images(cfg.images, data_dir=cfg.data_dir, split=cfg.split)
  n_images = min(len(imgs), cfg.max_images) if cfg.max_images else len(imgs)
  pre = registry.preprocessor(port, cfg.model_path, cfg.image_size)
  # the local devices: a mesh over every process's devices would make each forward a
  # cross-process collective, while each process harvests chunks of its own
  mesh = sharding.make_mesh(cfg.mesh, jax.local_devices()) if cfg.mesh.model > 1 else None
  model = registry.load(port, cfg.model_path, dtype=cfg.dtype, mesh=mesh)
  harvester = Harvester(model, pre, sites, prompt=cfg.prompt, all_tokens=cfg.all_tokens)
  root = os.path.join(os.path.abspath(workdir), 'activations')
  manifest = {'model': cfg.model, 'port': port.name,
              'model_path': os.path.abspath(cfg.model_path), 'images': cfg.images,
              'split': cfg.split, 'n_images': n_images, 'image_size': pre.image_size,
              'prompt': cfg.prompt if harvester.text else None, 'all_tokens': cfg.all_tokens,
              'chunk_images': cfg.chunk_images, 'dtype': cfg.dtype,
              'store_dtype': cfg.store_dtype}
  stores = _open_stores(root, sites, manifest, cfg.overwrite)
  n_chunks = -(-n_images // cfg.chunk_images)
  rank, n_proc = jax.process_index(), jax.process_count()
  mine = list(range(rank, n_chunks, n_proc))
  todo = [c for c in mine if not all(st.done(c) for st in stores.values())]
  size = lambda c: len(range(*_chunk_bounds(c, cfg.chunk_images, n_images)))  # noqa: E731
  tag = ''
  if n_proc > 1:
    tag = f' [process {rank} of {n_proc}]'
    print(f'process {rank} of {n_proc}: harvesting chunks {todo} (its chunks: {mine})',
          file=sys.stderr, flush=True)
  bar = tqdm(total=sum(map(size, mine)), initial=sum(map(size, mine)) - sum(map(size, todo)),
             desc=f'harvest {",".join(sites)}{tag}', unit='img', file=sys.stderr,
             dynamic_ncols=True, mininterval=1.0)
  t0, done_images, t_first = time.perf_counter(), 0, None
  prep = Preprocessing(cfg, imgs, pre)
  for c in todo:
    lo, hi = _chunk_bounds(c, cfg.chunk_images, n_images)
    parts, chunk_images = {s: [] for s in sites}, {}
    for ids, labels, out in site_batches(prep, harvester, list(range(lo, hi)), cfg.batch_size,
                                         cfg.store_dtype):
      chunk_images.update({str(i): {'file': imgs.key(i), 'label': label}
                           for i, label in zip(ids, labels)})
      for s in sites:
        parts[s].append(out[s])
      if t_first is None:
        t_first = time.perf_counter()  # throughput excludes the first batch (compilation)
      else:
        done_images += len(ids)
      bar.update(len(ids))
    for s, st in stores.items():
      acts = np.concatenate([a for a, _ in parts[s]])
      index = {k: np.concatenate([ix[k] for _, ix in parts[s]]) for k in parts[s][0][1]}
      st.write_chunk(c, acts, index, cfg.store_dtype, chunk_images)
  bar.close()
  prep.close()
  elapsed = time.perf_counter() - (t_first or t0)
  by_process = None
  if n_proc > 1:
    by_process, done_images, elapsed = _gather_runs(todo, n_chunks, done_images, elapsed)
  path = os.path.join(root, 'harvest.json')
  if rank == 0:
    rows = {s: st.finalize(n_chunks) for s, st in stores.items()}
    result = {'stage': 'harvest', 'sites': sites, 'n_images': n_images,
              'rows': rows, 'dirs': {s: st.dir for s, st in stores.items()},
              'chunks_run': len(todo) if by_process is None else sum(map(len, by_process)),
              'images_per_s': round(done_images / elapsed, 3) if done_images else None,
              'device': jax.devices()[0].device_kind, 'config': dataclasses.asdict(cfg)}
    if by_process is not None:  # which process wrote which chunks this run
      result.update(processes=n_proc, chunks_run_by_process=by_process)
    ckpt_lib.write_json_atomic(path, result)
  if n_proc == 1:
    return result
  # every process returns once the store is final (a next command on any host may read it)
  ckpt_lib.barrier('harvest/finalized')
  return ckpt_lib.read_json(path)
