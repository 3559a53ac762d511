"""grain loaders: epochs, determinism, resume, process sharding, global arrays, bad data."""

import json
import os

import jax
import numpy as np
import pytest
from data_helpers import make_ade20k

from cbp_jax import data
from cbp_jax.data.loader import _shard


class _IndexSource:
    """Record i is a 2x2 image and label holding i."""

    skip_bad_examples = False

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {
            "image": np.full((2, 2, 3), i, np.uint8),
            "label": np.full((2, 2), i, np.uint8),
            "name": str(i),
        }


def _identity(example, rng):
    return {"image": example["image"].astype(np.float32), "label": example["label"]}


def _records(batch):
    return np.asarray(batch["label"])[:, 0, 0].tolist()


def _take(loader, n):
    return [jax.tree.map(np.asarray, next(loader)) for _ in range(n)]


def _mesh():
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))


def test_epochs_are_permutations_reshuffled():
    with data.make_train_loader(_IndexSource(10), _identity, global_batch_size=4, seed=0) as ld:
        order = sum((_records(b) for b in _take(ld, 10)), [])
        assert ld.step == 10 and ld.epoch == 4
    epochs = [order[i : i + 10] for i in range(0, 40, 10)]
    for e in epochs:
        assert sorted(e) == list(range(10))
    assert len({tuple(e) for e in epochs}) == 4  # a new order every epoch
    with data.make_train_loader(_IndexSource(10), _identity, global_batch_size=4, seed=1) as ld:
        assert sum((_records(b) for b in _take(ld, 3)), []) != order[:12]


def test_process_shards_rebuild_the_global_batch():
    src, kw = _IndexSource(9), dict(global_batch_size=6, seed=5)
    with data.make_train_loader(src, _identity, **kw) as ld:
        full = [_records(b) for b in _take(ld, 4)]
    parts = []
    for p in range(3):
        opts = data.loader.grain.sharding.ShardOptions(shard_index=p, shard_count=3)
        with data.make_train_loader(src, _identity, shard_options=opts, **kw) as ld:
            parts.append([_records(b) for b in _take(ld, 4)])
    for t in range(4):
        assert parts[0][t] + parts[1][t] + parts[2][t] == full[t]
    assert _shard(None) == (0, 1)  # ShardByJaxProcess in a single process


def test_resume_gives_the_same_batches():
    src = data.make_source("scenes", split="train", num_images=10)
    tt = data.train_transform((32, 32), (80, 60))
    kw = dict(global_batch_size=4, seed=3)
    with data.make_train_loader(src, tt, **kw) as ld:
        first = _take(ld, 2)
        state = json.loads(json.dumps(ld.get_state()))  # saved with the checkpoint
        rest = _take(ld, 3)
    with data.make_train_loader(src, tt, **kw) as ld:
        ld.set_state(state)
        resumed = _take(ld, 3)
        assert ld.step == 5
    for a, b in zip(rest, resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(first[0]["image"], rest[0]["image"])
    with data.make_train_loader(src, tt, global_batch_size=4, seed=4) as ld:
        with pytest.raises(ValueError, match="seed=3 but this loader has 4"):
            ld.set_state(state)


@pytest.mark.slow
def test_global_arrays_workers_and_resume():
    """8 fake devices, 2 worker processes: the same batches as in-process, resumable."""
    src = data.make_source("scenes", split="train", num_images=12)
    tt = data.train_transform((32, 48), (80, 60))
    mesh = _mesh()
    kw = dict(global_batch_size=8, seed=0, mesh=mesh)
    with data.make_train_loader(src, tt, **kw) as ld:
        batch = next(ld)
        assert batch["image"].shape == (8, 32, 48, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (8, 32, 48) and batch["label"].dtype == np.int32
        assert batch["image"].sharding.spec == jax.sharding.PartitionSpec("data")
        assert len(batch["image"].addressable_shards) == 8
        reference = [jax.tree.map(np.asarray, batch)] + _take(ld, 3)
    with data.make_train_loader(src, tt, num_workers=2, **kw) as ld:
        got = _take(ld, 2)
        state = ld.get_state()
    with data.make_train_loader(src, tt, num_workers=2, **kw) as ld:
        ld.set_state(state)
        got += _take(ld, 2)
    for a, b in zip(reference, got, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    with pytest.raises(ValueError, match="not divisible by the mesh's 'data' axis of size 8"):
        data.make_train_loader(src, tt, global_batch_size=12, mesh=mesh)


def test_bad_example_raises_or_is_skipped(tmp_path, caplog):
    base = make_ade20k(str(tmp_path), n_train=4)
    bad = os.path.join(base, "images", "training", "ADE_train_00000002.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8 broken")
    tt = data.train_transform((16, 16), (64, 32))
    src = data.make_source("ade20k", str(tmp_path), "train")
    with data.make_train_loader(src, tt, global_batch_size=4) as ld:
        with pytest.raises(data.BadExampleError, match="ADE_train_00000002.jpg"):
            next(ld)
        with pytest.raises(data.BadExampleError, match="ADE_train_00000002.jpg"):
            next(ld)  # a failed loader keeps failing instead of hanging
    src = data.make_source("ade20k", str(tmp_path), "train", skip_bad_examples=True)
    with data.make_train_loader(src, tt, global_batch_size=4) as ld:
        batches = _take(ld, 3)  # 12 examples over 3 epochs: the bad one is hit 3 times
        assert ld.num_skipped == 3
    assert batches[0]["image"].shape == (4, 16, 16, 3)
    assert "ADE_train_00000002.jpg" in caplog.text and "bad example(s) skipped" in caplog.text
    # Evaluation never replaces a bad example (it would count another one twice).
    et = data.test_transform((64, 32))
    with data.make_eval_loader(src, et, global_batch_size=4) as ld:
        indices = [i for b in ld for i in b["index"][b["valid"]].tolist()]
    assert sorted(indices) == [0, 1, 3]


def test_eval_loader_batches_same_sizes_and_covers_each_example_once(tmp_path):
    make_ade20k(str(tmp_path), n_val=5)  # five different image sizes
    src = data.make_source("ade20k", str(tmp_path), "val")
    et = data.test_transform((64, 32))
    with data.make_eval_loader(src, et, global_batch_size=8, mesh=_mesh()) as ld:
        batches = list(ld)
    assert len(batches) == 5  # one chunk of 8 slots, one global batch per size
    seen = []
    for batch in batches:
        b = jax.tree.map(np.asarray, {k: v for k, v in batch.items() if k != "name"})
        assert b["image"].shape[0] == 8 and b["label"].dtype == np.int32
        assert b["valid"].sum() == 1
        (i,) = np.flatnonzero(b["valid"])
        index = int(b["index"][i])
        ex = src[index]
        np.testing.assert_array_equal(b["label"][i], ex["label"])
        np.testing.assert_allclose(b["image"][i], et(ex)["image"], rtol=1e-6)
        assert batch["name"][i] == ex["name"]
        padding = ~b["valid"]
        assert np.all(b["label"][padding] == 255) and np.all(b["image"][padding] == 0)
        assert np.all(b["index"][padding] == -1)
        seen.append(index)
    assert sorted(seen) == list(range(5))
    keys = [(b["image"].shape[1:3], b["label"].shape[1:3]) for b in batches]
    assert keys == sorted(keys)  # sorted: every process builds the same sequence


def test_eval_loader_shards_chunks_over_processes():
    src = data.make_source("scenes", split="val", num_images=5)
    et = data.test_transform((160, 120))
    seen = []
    for p in range(2):
        opts = data.loader.grain.sharding.ShardOptions(shard_index=p, shard_count=2)
        with data.make_eval_loader(src, et, global_batch_size=4, shard_options=opts) as ld:
            batches = list(ld)
        # Chunks [0..3] and [4]: slots 2p, 2p + 1 of each. Simulated shards share no sizes
        # (one JAX process); real processes all-gather them and build the same batches.
        assert len(batches) == 2 - p
        for b in batches:
            assert b["image"].shape == (2, 120, 160, 3)
            for i in np.flatnonzero(b["valid"]):
                np.testing.assert_array_equal(b["label"][i], src[b["index"][i]]["label"])
                seen.append(int(b["index"][i]))
    assert sorted(seen) == list(range(5))
