"""Reader/writer of user-exported activations: `.npy` / `.safetensors` files of `[n_tokens, d]` rows.

Files in a directory are sorted by name and their rows concatenated into global ids [0, N).
Everything is memory-mapped; only the rows a batch needs are ever read. Batch order comes from
a vectorised Feistel permutation (`permutation.Permutation`), so no permutation of N is held in
memory and the batch at a step is a pure function of (seed, step, data): the step number saved
in a checkpoint is the stream's position, and a resumed run reads the next unseen batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

from csae_jax.sources import batches as batches_lib
from csae_jax.sources import permutation

# Held-out split seed: fixed and independent of the training seed, so every run over the same
# data evaluates on the same rows and no training seed can leak eval rows into training.
_SPLIT_SEED = 0x5EED
_EXTS = (".npy", ".safetensors")
_ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
              "BF16": np.dtype(ml_dtypes.bfloat16)}
_N_FINGERPRINT_ROWS = 4  # rows hashed per file; cheap, yet catches rewritten data of equal shape


@dataclasses.dataclass(frozen=True)
class ArrayFile:
  path: str
  kind: str  # 'npy' | 'safetensors'
  n_rows: int
  d: int
  dtype: str  # 'float32' | 'float16' | 'bfloat16'
  offset: int  # byte offset of the row data inside the file (for memmap)

  @property
  def name(self) -> str:
    return os.path.basename(self.path)


def _check_shape_dtype(path: str, shape: tuple, dtype_name: str) -> None:
  name = os.path.basename(path)
  if len(shape) != 2:
    raise ValueError(f"{name}: array has shape {tuple(shape)}, expected [n_tokens, d] (2-D); "
                     f"reshape it to (-1, d) before saving.")
  if dtype_name in ("float64", "F64"):
    raise ValueError(f"{name}: dtype float64 is not supported; convert it to float32 "
                     f"(arr.astype(np.float32)) before saving.")
  if dtype_name not in ("float32", "float16", "bfloat16"):
    raise ValueError(f"{name}: unsupported dtype {dtype_name}; save activations as float32, "
                     f"float16 or bfloat16.")


def _inspect_npy(path: str) -> ArrayFile:
  try:
    # Header only (mmap), so inspecting a huge file costs nothing.
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
  except Exception as e:  # noqa: BLE001 -- re-raised with the file name and a fix
    raise ValueError(f"{os.path.basename(path)}: cannot read as .npy ({e}); re-save it with "
                     f"np.save(path, array_float32).") from e
  dt = arr.dtype
  dtype_name = {"f4": "float32", "f2": "float16", "f8": "float64"}.get(f"{dt.kind}{dt.itemsize}",
                                                                        str(dt))
  _check_shape_dtype(path, arr.shape, dtype_name)
  return ArrayFile(path, "npy", int(arr.shape[0]), int(arr.shape[1]), dtype_name, int(arr.offset))


def _inspect_safetensors(path: str) -> ArrayFile:
  name = os.path.basename(path)
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    (n_header,) = struct.unpack("<Q", raw) if len(raw) == 8 else (size,)
    if n_header + 8 > size:
      raise ValueError(f"{name}: not a valid safetensors file (bad header length); re-export it "
                       f"with safetensors.numpy.save_file.")
    header = json.loads(f.read(n_header))
  tensors = {k: v for k, v in header.items() if k != "__metadata__"}
  if len(tensors) != 1:
    raise ValueError(f"{name}: holds {len(tensors)} tensors ({sorted(tensors)[:5]}), expected "
                     f"exactly one [n_tokens, d] tensor; save one tensor per file.")
  (key, info), = tensors.items()
  shape, st_dtype = tuple(info["shape"]), info["dtype"]
  dt = _ST_DTYPES.get(st_dtype)
  _check_shape_dtype(path, shape, dt.name if dt is not None else st_dtype)
  begin, end = info["data_offsets"]
  if end - begin != shape[0] * shape[1] * dt.itemsize:
    raise ValueError(f"{name}: tensor {key!r} byte range does not match shape {shape}; the file "
                     f"is corrupt, re-export it.")
  return ArrayFile(path, "safetensors", shape[0], shape[1], dt.name, 8 + n_header + begin)


def discover(path: str) -> list[ArrayFile]:
  """Lists the array files at `path` (a directory, or one .npy/.safetensors file), sorted by name."""
  if not os.path.exists(path):
    raise ValueError(f"activation path {path!r} does not exist; point it at a directory of "
                     f".npy/.safetensors files of shape [n_tokens, d].")
  if os.path.isdir(path):
    entries = sorted(os.listdir(path))
    paths = [os.path.join(path, n) for n in entries
             if n.endswith(_EXTS) and not n.startswith(".")
             and os.path.isfile(os.path.join(path, n))]
    if not paths:
      shown = ", ".join(entries[:10]) + (" ..." if len(entries) > 10 else "") or "nothing"
      raise ValueError(f"directory {path!r} has no .npy or .safetensors files (found: {shown}); "
                       f"export activations as [n_tokens, d] arrays with those extensions.")
  elif path.endswith(_EXTS):
    paths = [path]
  else:
    raise ValueError(f"{path!r} is neither a directory nor a .npy/.safetensors file; pass a "
                     f"directory of such files or one such file.")
  files = [_inspect_npy(p) if p.endswith(".npy") else _inspect_safetensors(p) for p in paths]
  for f in files[1:]:
    if f.d != files[0].d:
      raise ValueError(f"files disagree on d: {files[0].name} has d={files[0].d}, {f.name} has "
                       f"d={f.d}; every file must hold rows of the same width.")
  return files


def _open(f: ArrayFile) -> np.ndarray:
  """A read-only memmap `[n_rows, d]` of the file, in its stored dtype. The kernel's default
  read-ahead stays on: MADV_RANDOM read fewer bytes per cold batch but made one I/O per row,
  which an IOPS-limited cloud disk punishes (`benchmarks/stream_read.py` measures both)."""
  if f.kind == "npy":
    return np.load(f.path, mmap_mode="r", allow_pickle=False)
  return np.memmap(f.path, dtype=_ST_DTYPES[{"float32": "F32", "float16": "F16",
                                              "bfloat16": "BF16"}[f.dtype]],
                   mode="r", offset=f.offset, shape=(f.n_rows, f.d))


class ArraySource:
  """Shuffled, resumable, per-process batches of rows from exported activation files."""

  def __init__(self, path: str, *, batch_size: int, seed: int, holdout_rows: int | None = None,
               process_index: int = 0, process_count: int = 1, norm_sample_rows: int = 65536,
               scale: float | None = None):
    self.path = path
    self.files = discover(path)
    self.d = self.files[0].d
    self.n_rows = sum(f.n_rows for f in self.files)
    if self.n_rows == 0:
      raise ValueError(f"{path!r}: all files have 0 rows ({', '.join(f.name for f in self.files)}); "
                       f"export some activations first.")
    # starts_f[i] = global id of file i's first row; files with 0 rows are harmless here.
    self._starts_f = np.cumsum([0] + [f.n_rows for f in self.files])
    self._maps = [_open(f) if f.n_rows else None for f in self.files]

    if holdout_rows is None:
      holdout_rows = min(self.n_rows // 10, 16384)
    if not 0 <= holdout_rows < self.n_rows:
      raise ValueError(f"holdout_rows={holdout_rows} must be in [0, n_rows={self.n_rows}); "
                       f"lower it.")
    self.n_eval = int(holdout_rows)
    self.n_train = self.n_rows - self.n_eval
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} must be in [0, process_count="
                       f"{process_count}).")
    if batch_size < 1 or batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} is not divisible by process_count="
                       f"{process_count}; pick a multiple of the process count.")
    if batch_size > self.n_train:
      raise ValueError(f"batch_size={batch_size} exceeds the {self.n_train} training rows in "
                       f"{path!r}; lower batch_size or holdout_rows, or export more rows.")
    self.batch_size, self.seed = batch_size, seed
    self.process_index, self.process_count = process_index, process_count

    # Positions [0, n_train) of the split permutation train; [n_train, N) are held out. Each
    # epoch permutes the train *positions* afresh and maps them through the one split, so no
    # epoch can draw a held-out row.
    self._split = permutation.Permutation(self.n_rows, f"split:{_SPLIT_SEED}")
    self._epochs: dict[int, permutation.Permutation] = {}

    self.fingerprint = self._fingerprint()
    self.scale = float(scale) if scale is not None else self._compute_scale(norm_sample_rows)

  # ---- reading ---------------------------------------------------------------------------------
  def read_rows(self, rows: np.ndarray) -> np.ndarray:
    """Rows by global id, `[len(rows), d]` float32, unscaled; ids in any order, repeats allowed."""
    rows_b = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows_b.size and (rows_b.min() < 0 or rows_b.max() >= self.n_rows):
      raise ValueError(f"row ids must be in [0, {self.n_rows}); got range "
                       f"[{rows_b.min()}, {rows_b.max()}].")
    # Sorted ids make each file's reads ascending (sequential-ish disk access).
    order_b = np.argsort(rows_b, kind="stable")
    sorted_b = rows_b[order_b]
    bounds = np.searchsorted(sorted_b, self._starts_f)
    out_bd = np.empty((rows_b.size, self.d), np.float32)
    for i, mm in enumerate(self._maps):
      lo, hi = bounds[i], bounds[i + 1]
      if hi > lo:
        out_bd[order_b[lo:hi]] = mm[sorted_b[lo:hi] - self._starts_f[i]].astype(np.float32)
    return out_bd

  def _locate(self, row: int) -> tuple[ArrayFile, int]:
    i = int(np.searchsorted(self._starts_f, row, side="right")) - 1
    return self.files[i], int(row - self._starts_f[i])

  def _check_finite(self, rows_bd: np.ndarray, ids_b: np.ndarray) -> None:
    bad_b = ~np.isfinite(rows_bd).all(axis=1)
    if bad_b.any():
      # Report the smallest bad id so the message does not depend on batch order.
      f, local = self._locate(int(ids_b[bad_b].min()))
      raise ValueError(f"{f.name}: row {local} contains NaN or inf; clean or drop it and "
                       f"re-export the file.")

  def _read_scaled(self, ids_b: np.ndarray) -> np.ndarray:
    rows_bd = self.read_rows(ids_b)
    self._check_finite(rows_bd, ids_b)
    rows_bd *= np.float32(self.scale)
    return rows_bd

  # ---- batches ---------------------------------------------------------------------------------
  def global_indices(self, step: int) -> np.ndarray:
    """`[batch_size]` int64 global row ids of the global batch at `step` (epochs roll over)."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    pos_b = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
    epoch_b, within_b = np.divmod(pos_b, self.n_train)
    out_b = np.empty(self.batch_size, np.int64)
    for e in np.unique(epoch_b):  # one or two epochs per batch (batch_size <= n_train)
      sel = epoch_b == e
      out_b[sel] = self._epoch(int(e))(within_b[sel])
    return self._split(out_b)

  def _epoch(self, e: int) -> permutation.Permutation:
    if e not in self._epochs:
      if len(self._epochs) > 8:
        self._epochs.clear()
      # keyed by (seed, epoch) together: seeds s and s + 1 share no epoch's order
      self._epochs[e] = permutation.Permutation(self.n_train, f"train:{self.seed}:{e}")
    return self._epochs[e]

  def batch(self, step: int) -> np.ndarray:
    """This process's contiguous slice of the global batch, `[batch_size // process_count, d]`."""
    per = self.batch_size // self.process_count
    ids_b = self.global_indices(step)[self.process_index * per:(self.process_index + 1) * per]
    return self._read_scaled(ids_b)

  def eval_row_ids(self, max_rows: int) -> np.ndarray:
    """Global ids of the held-out rows in `eval_batches` order (to look up a row's image and
    patch in a harvest's index.npz)."""
    return self._split(self.n_train + np.arange(min(max_rows, self.n_eval), dtype=np.int64))

  def eval_batches(self, max_rows: int, batch_size: int) -> batches_lib.Batches:
    """Held-out rows, scaled float32, fixed order, at most `max_rows` total (last may be short)."""
    ids_n = self.eval_row_ids(max_rows)
    return batches_lib.Batches(
        lambda: (self._read_scaled(ids_n[lo:lo + batch_size])
                 for lo in range(0, len(ids_n), batch_size)), len(ids_n))

  # ---- statistics ------------------------------------------------------------------------------
  def _compute_scale(self, norm_sample_rows: int) -> float:
    n = min(self.n_rows, max(1, norm_sample_rows))
    # Evenly strided over all rows (train and eval alike): deterministic, and touches every file.
    ids_s = np.unique(np.linspace(0, self.n_rows - 1, n).round().astype(np.int64))
    rows_sd = self.read_rows(ids_s)
    self._check_finite(rows_sd, ids_s)
    msq = float(np.mean(np.sum(rows_sd.astype(np.float64) ** 2, axis=1)))
    if msq == 0.0:
      raise ValueError(f"{self.path!r}: sampled rows are all zero, cannot normalise; check the "
                       f"export.")
    return float(1.0 / np.sqrt(msq))

  def _fingerprint(self) -> str:
    h = hashlib.sha256()
    # The order's version is part of the data's identity: a stage trained on another split or
    # order must not resume on this one (its held-out rows would have been trained on).
    h.update(f"order:feistel{permutation.ROUNDS}\n".encode())
    for f, mm in zip(self.files, self._maps):
      h.update(f"{f.name}|{f.n_rows}|{f.d}|{f.dtype}|{os.path.getsize(f.path)}\n".encode())
      if mm is not None:
        for r in np.unique(np.linspace(0, f.n_rows - 1, _N_FINGERPRINT_ROWS).astype(np.int64)):
          h.update(np.ascontiguousarray(mm[r]).tobytes())
    return h.hexdigest()

  def manifest(self) -> dict:
    return {"kind": "arrays", "path": os.path.abspath(self.path),
            "files": [{"name": f.name, "n_rows": f.n_rows, "dtype": f.dtype} for f in self.files],
            "n_rows": self.n_rows, "d": self.d, "scale": self.scale,
            "fingerprint": self.fingerprint, "n_train": self.n_train, "n_eval": self.n_eval,
            "order": f"feistel{permutation.ROUNDS}"}


def write_shards(out_dir: str, rows_nd_iter: Iterable[np.ndarray], *, rows_per_shard: int = 65536,
                 dtype=np.float32, prefix: str = "shard") -> list[str]:
  """Writes row chunks as `{prefix}_00000.npy`, ... of `rows_per_shard` rows (last may be short).

  Each shard is written to a hidden temp name then `os.replace`d, so a reader never sees a partial
  file. Shards `{prefix}_NNNNN.npy` left over from an earlier, longer export are removed afterwards
  so the directory holds exactly this export.
  """
  if rows_per_shard < 1:
    raise ValueError(f"rows_per_shard={rows_per_shard} must be >= 1.")
  os.makedirs(out_dir, exist_ok=True)
  paths: list[str] = []
  buf: list[np.ndarray] = []
  n_buf, d = 0, None

  def flush(rows_nd: np.ndarray) -> None:
    path = os.path.join(out_dir, f"{prefix}_{len(paths):05d}.npy")
    tmp = os.path.join(out_dir, f".{prefix}_{len(paths):05d}.npy.tmp")
    with open(tmp, "wb") as fh:  # a file handle stops np.save from appending ".npy"
      np.save(fh, np.ascontiguousarray(rows_nd, dtype=dtype))
    os.replace(tmp, path)
    paths.append(path)

  for rows_nd in rows_nd_iter:
    rows_nd = np.asarray(rows_nd)
    if rows_nd.ndim != 2 or (d is not None and rows_nd.shape[1] != d):
      raise ValueError(f"write_shards: got a chunk of shape {rows_nd.shape}, expected "
                       f"[n, d]{'' if d is None else f' with d={d}'}; reshape it to (-1, d).")
    d = rows_nd.shape[1]
    buf.append(rows_nd)
    n_buf += rows_nd.shape[0]
    while n_buf >= rows_per_shard:
      all_nd = np.concatenate(buf) if len(buf) > 1 else buf[0]
      flush(all_nd[:rows_per_shard])
      buf, n_buf = [all_nd[rows_per_shard:]], n_buf - rows_per_shard
  if n_buf:
    flush(np.concatenate(buf))

  pattern = re.compile(re.escape(prefix) + r"_(\d{5})\.npy")
  for name in os.listdir(out_dir):
    m = pattern.fullmatch(name)
    if m and int(m.group(1)) >= len(paths):
      os.remove(os.path.join(out_dir, name))
  return paths
