"""Tests for csae_jax.sources.arrays: discovery, exact reads, split/shuffle properties, errors."""

import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from csae_jax.sources import arrays
from csae_jax.sources.arrays import ArraySource, discover, write_shards

D = 8


def _rand(n, seed, dtype=np.float32, loc=0.0):
  return (np.random.default_rng(seed).normal(loc, 3.0, (n, D))).astype(dtype)


@pytest.fixture
def two_npy(tmp_path):
  # "b_" sorts after "a_" although written first: order must follow names, not creation.
  b = _rand(37, 1, np.float16)
  a = _rand(50, 0)
  np.save(tmp_path / "b_part.npy", b)
  np.save(tmp_path / "a_part.npy", a)
  (tmp_path / "notes.txt").write_text("ignored")
  return tmp_path, np.concatenate([a, b.astype(np.float32)])


def test_discover_and_read_rows_npy(two_npy):
  path, all_nd = two_npy
  files = discover(str(path))
  assert [f.name for f in files] == ["a_part.npy", "b_part.npy"]
  assert [(f.n_rows, f.d, f.dtype, f.kind) for f in files] == [
      (50, D, "float32", "npy"), (37, D, "float16", "npy")]
  src = ArraySource(str(path), batch_size=8, seed=0)
  assert (src.n_rows, src.d, src.n_train + src.n_eval) == (87, D, 87)
  ids = np.random.default_rng(0).integers(0, 87, 200)
  got = src.read_rows(ids)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, all_nd[ids])
  np.testing.assert_array_equal(src.read_rows(np.array([], np.int64)), np.zeros((0, D)))
  with pytest.raises(ValueError, match=r"\[0, 87\)"):
    src.read_rows(np.array([87]))


def test_single_file_path_is_a_dataset(two_npy):
  path, all_nd = two_npy
  src = ArraySource(str(path / "a_part.npy"), batch_size=4, seed=0)
  assert src.n_rows == 50
  np.testing.assert_array_equal(src.read_rows(np.arange(50)), all_nd[:50])


def test_safetensors_f32_and_bf16(tmp_path):
  x = _rand(20, 2)
  y = _rand(13, 3).astype(ml_dtypes.bfloat16)
  save_file({"acts": x}, str(tmp_path / "0.safetensors"), metadata={"layer": "12"})
  save_file({"acts": y}, str(tmp_path / "1.safetensors"))
  files = discover(str(tmp_path))
  assert [(f.kind, f.dtype, f.n_rows) for f in files] == [
      ("safetensors", "float32", 20), ("safetensors", "bfloat16", 13)]
  src = ArraySource(str(tmp_path), batch_size=4, seed=0)
  ids = np.random.default_rng(1).permutation(33)
  np.testing.assert_array_equal(
      src.read_rows(ids), np.concatenate([x, y.astype(np.float32)])[ids])


def test_scale_normalises_batches(tmp_path):
  np.save(tmp_path / "x.npy", _rand(4000, 4, loc=2.0))
  src = ArraySource(str(tmp_path), batch_size=64, seed=0, norm_sample_rows=500)
  msq = np.mean([np.mean(np.sum(src.batch(s) ** 2, 1)) for s in range(40)])
  assert abs(msq - 1.0) < 0.05
  fixed = ArraySource(str(tmp_path), batch_size=64, seed=0, scale=0.5)
  assert fixed.scale == 0.5
  np.testing.assert_array_equal(fixed.batch(3), 0.5 * fixed.read_rows(fixed.global_indices(3)))


def test_epoch_coverage_and_holdout(tmp_path):
  np.save(tmp_path / "x.npy", _rand(100, 5))
  src = ArraySource(str(tmp_path), batch_size=16, seed=3, holdout_rows=20)
  assert (src.n_train, src.n_eval) == (80, 20)
  ids_by_epoch = [np.concatenate([src.global_indices(e * 5 + s) for s in range(5)])
                  for e in range(3)]
  for ids in ids_by_epoch:  # each epoch: every train row exactly once
    assert np.array_equal(np.sort(ids), np.sort(ids_by_epoch[0]))
    assert len(np.unique(ids)) == 80
  assert not np.array_equal(ids_by_epoch[0], ids_by_epoch[1])  # reshuffled per epoch
  train = set(ids_by_epoch[0].tolist())
  eval_rows = np.concatenate(list(src.eval_batches(max_rows=1000, batch_size=7)))
  assert eval_rows.shape == (20, D)
  held = sorted(set(range(100)) - train)
  assert len(held) == 20
  for ids in ids_by_epoch:  # no held-out row in any epoch's training batches
    assert not set(ids.tolist()) & set(held)
  # eval rows are exactly the held-out rows, scaled (compared as sets of row tuples)
  want = src.read_rows(np.array(held)) * np.float32(src.scale)
  assert sorted(map(tuple, eval_rows.tolist())) == sorted(map(tuple, want.tolist()))
  assert sum(len(b) for b in src.eval_batches(max_rows=9, batch_size=4)) == 9
  # they say how many rows they hold before anyone reads them (a progress bar's ETA)
  assert src.eval_batches(max_rows=9, batch_size=4).n_rows == 9
  assert src.eval_batches(max_rows=1000, batch_size=7).n_rows == 20
  # the split does not depend on the training seed
  other = ArraySource(str(tmp_path), batch_size=16, seed=99, holdout_rows=20)
  assert set(np.concatenate([other.global_indices(s) for s in range(5)]).tolist()) == train


def test_no_holdout(tmp_path):
  np.save(tmp_path / "x.npy", _rand(12, 5))
  src = ArraySource(str(tmp_path), batch_size=12, seed=0, holdout_rows=0)
  assert sorted(src.global_indices(0).tolist()) == list(range(12))
  assert list(src.eval_batches(10, 4)) == []


def test_determinism_and_process_slices(two_npy):
  path, _ = two_npy
  a = ArraySource(str(path), batch_size=8, seed=7)
  b = ArraySource(str(path), batch_size=8, seed=7)
  c = ArraySource(str(path), batch_size=8, seed=8)
  for s in (0, 1, 17):
    np.testing.assert_array_equal(a.batch(s), b.batch(s))
  assert not np.array_equal(a.global_indices(0), c.global_indices(0))
  parts = [ArraySource(str(path), batch_size=8, seed=7, process_index=i, process_count=2)
           for i in (0, 1)]
  for s in (0, 5):
    halves = [p.batch(s) for p in parts]
    assert halves[0].shape == (4, D)
    np.testing.assert_array_equal(np.concatenate(halves), a.batch(s))
  assert a.fingerprint == b.fingerprint and a.scale == b.scale


def test_fingerprint_and_manifest(tmp_path):
  x = _rand(30, 6)
  np.save(tmp_path / "x.npy", x)
  src = ArraySource(str(tmp_path), batch_size=4, seed=0)
  m = src.manifest()
  assert m["kind"] == "arrays" and m["files"] == [{"name": "x.npy", "n_rows": 30, "dtype": "float32"}]
  assert (m["n_rows"], m["d"], m["n_train"], m["n_eval"]) == (30, D, 27, 3)
  assert m["scale"] == src.scale and m["fingerprint"] == src.fingerprint
  x[-1, 0] += 1.0  # same shape, dtype and size: only the sampled bytes differ
  np.save(tmp_path / "x.npy", x)
  assert ArraySource(str(tmp_path), batch_size=4, seed=0).fingerprint != src.fingerprint


def test_nan_detected_with_file_and_row(tmp_path):
  np.save(tmp_path / "a.npy", _rand(10, 0))
  bad = _rand(10, 1)
  bad[6, 3] = np.nan
  np.save(tmp_path / "b.npy", bad)
  with pytest.raises(ValueError, match=r"b\.npy: row 6 .*clean or drop"):
    ArraySource(str(tmp_path), batch_size=4, seed=0)  # caught by the norm sample
  # with an explicit scale no sample is read: the batch that holds the row must raise
  src = ArraySource(str(tmp_path), batch_size=20, seed=0, holdout_rows=0, scale=1.0)
  with pytest.raises(ValueError, match=r"b\.npy: row 6"):
    src.batch(0)
  src = ArraySource(str(tmp_path), batch_size=1, seed=0, holdout_rows=19, scale=1.0)
  with pytest.raises(ValueError, match=r"b\.npy: row 6"):
    list(src.eval_batches(100, 5))
  bad[6, 3] = np.inf
  np.save(tmp_path / "b.npy", bad)
  with pytest.raises(ValueError, match=r"b\.npy: row 6"):
    ArraySource(str(tmp_path), batch_size=4, seed=0)


def _save(tmp_path, name, arr):
  if name.endswith(".npy"):
    np.save(tmp_path / name, arr)
  else:
    save_file(arr, str(tmp_path / name))


@pytest.mark.parametrize("files, match", [
    ({"v.npy": np.zeros(5, np.float32)}, r"v\.npy.*\(5,\).*expected \[n_tokens, d\]"),
    ({"c.npy": np.zeros((2, 3, 4), np.float32)}, r"c\.npy.*\(2, 3, 4\).*expected \[n_tokens, d\]"),
    ({"a.npy": np.zeros((3, 4), np.float32), "b.npy": np.zeros((3, 5), np.float32)},
     r"a\.npy has d=4, b\.npy has d=5"),
    ({"i.npy": np.zeros((3, 4), np.int64)}, r"i\.npy.*int64"),
    ({"f.npy": np.zeros((3, 4), np.float64)}, r"f\.npy.*float64.*convert it to float32"),
    ({"s.safetensors": {"a": np.zeros((3, 4), np.float32), "b": np.zeros((3, 4), np.float32)}},
     r"s\.safetensors: holds 2 tensors"),
    ({"s.safetensors": {"a": np.zeros((3, 4), np.float64)}}, r"s\.safetensors.*float64"),
    ({"e.npy": np.zeros((0, 4), np.float32)}, r"0 rows.*e\.npy"),
])
def test_file_errors(tmp_path, files, match):
  for name, arr in files.items():
    _save(tmp_path, name, arr)
  with pytest.raises(ValueError, match=match):
    ArraySource(str(tmp_path), batch_size=1, seed=0)


def test_path_errors(tmp_path):
  with pytest.raises(ValueError, match=r"nope.*does not exist"):
    ArraySource(str(tmp_path / "nope"), batch_size=1, seed=0)
  (tmp_path / "readme.md").write_text("x")
  with pytest.raises(ValueError, match=r"no \.npy or \.safetensors files \(found: readme\.md\)"):
    discover(str(tmp_path))
  with pytest.raises(ValueError, match=r"readme\.md.*neither a directory"):
    discover(str(tmp_path / "readme.md"))


def test_batch_size_errors(tmp_path):
  np.save(tmp_path / "x.npy", _rand(20, 0))
  with pytest.raises(ValueError, match=r"batch_size=6 is not divisible by process_count=4"):
    ArraySource(str(tmp_path), batch_size=6, seed=0, process_count=4)
  with pytest.raises(ValueError, match=r"batch_size=19 exceeds the 18 training rows"):
    ArraySource(str(tmp_path), batch_size=19, seed=0)


def test_write_shards_round_trip(tmp_path):
  chunks = [_rand(n, i) for i, n in enumerate([7, 1, 30, 2])]  # 40 rows -> shards of 16,16,8
  out = tmp_path / "export"
  os.makedirs(out)
  np.save(out / "shard_00009.npy", np.zeros((3, 99), np.float32))  # stale, from an older export
  paths = write_shards(str(out), iter(chunks), rows_per_shard=16, dtype=np.float16)
  assert [os.path.basename(p) for p in paths] == [f"shard_{i:05d}.npy" for i in range(3)]
  assert sorted(os.listdir(out)) == [os.path.basename(p) for p in paths]  # no tmp, no stale
  src = ArraySource(str(out), batch_size=4, seed=0)
  assert [f.n_rows for f in src.files] == [16, 16, 8] and src.files[0].dtype == "float16"
  np.testing.assert_array_equal(src.read_rows(np.arange(40)),
                                np.concatenate(chunks).astype(np.float16).astype(np.float32))
  with pytest.raises(ValueError, match=r"shape \(3, 5\).*d=8"):
    write_shards(str(out), [_rand(2, 0), np.zeros((3, 5))])


def test_offset_matches_memmap(two_npy):
  path, all_nd = two_npy
  f = discover(str(path))[0]
  mm = np.memmap(f.path, dtype=np.float32, mode="r", offset=f.offset, shape=(f.n_rows, f.d))
  np.testing.assert_array_equal(mm, all_nd[:50])


def test_seeds_do_not_replay_each_others_epochs(tmp_path):
  # grain reshuffled epoch e with seed + e, so seed 1's first epoch was seed 0's second: a seed
  # sweep trained two members on the same order shifted by one epoch.
  np.save(tmp_path / "x.npy", _rand(96, 0))
  s0, s1 = (ArraySource(str(tmp_path), batch_size=16, seed=s, holdout_rows=16) for s in (0, 1))
  epoch = lambda src, e: np.concatenate([src.global_indices(e * 5 + i) for i in range(5)])
  for e in range(3):
    assert not np.array_equal(epoch(s0, e + 1), epoch(s1, e))
    assert not np.array_equal(epoch(s0, e), epoch(s1, e))


def test_a_killed_and_resumed_run_reads_each_row_once_per_epoch(tmp_path, monkeypatch):
  """The stream through the real training loop: steps before the resumed checkpoint come from
  the killed run, the rest from the resumed one; together they are the uninterrupted stream,
  every training row once per epoch (epochs straddle batches), no held-out row."""
  from csae_jax import modes
  from experiments.configs import csae
  np.save(tmp_path / "x.npy", _rand(1000, 4))
  read: list[dict] = [{}, {}]
  run = [0]
  real_batch = ArraySource.batch

  def recording_batch(self, step):
    read[run[0]][step] = self.global_indices(step)
    return real_batch(self, step)
  monkeypatch.setattr(ArraySource, "batch", recording_batch)

  class Kill(Exception):
    pass

  def kill_at_55(done, state):
    if done == 55:
      raise Kill

  c = csae.get_config("small")
  c.update_from_flattened_dict({
      "data.path": str(tmp_path), "data.holdout_rows": 200, "data.eval_rows": 200,
      "train.steps": 60, "train.checkpoint_every": 20, "train.batch_size": 128,
      "level1.n_latents": 32, "level1.k": 2, "level2.steps": 10, "level2.restarts": 1})
  wd = str(tmp_path / "wd")
  with pytest.raises(Kill):
    modes.run(c, wd, hooks=[kill_at_55])
  run[0] = 1
  modes.run(c, wd)
  assert min(read[1]) == 40  # resumed at the last checkpoint, step 40
  stream = [read[0][s] for s in range(40)] + [read[1][s] for s in range(40, 60)]
  ids = np.concatenate(stream)
  src = ArraySource(str(tmp_path), batch_size=128, seed=c.train.seed, holdout_rows=200)
  held = set(src.eval_row_ids(200).tolist())
  train = np.array(sorted(set(range(1000)) - held))
  for lo in range(0, len(ids) - 800 + 1, 800):  # 60 x 128 rows: 9 whole epochs of 800
    np.testing.assert_array_equal(np.sort(ids[lo:lo + 800]), train)
  assert not held & set(ids.tolist())
  for s in range(40, 55):  # the lost steps were read again, identically
    np.testing.assert_array_equal(read[0][s], read[1][s])
