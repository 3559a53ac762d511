"""grain loaders: sharded, deterministic, resumable batches as global jax.Arrays.

Training stream (mmseg's InfiniteSampler): epoch e visits every record once in
the order of a permutation drawn from (seed, e); epochs follow each other
without a gap, batches may straddle them. Global batch t holds the stream
positions t*B .. t*B + B - 1; process p of P builds slots p*B/P .. (p+1)*B/P - 1
of it, so the global batch does not depend on the number of processes. An
example's augmentation uses ``np.random.default_rng([seed, epoch, record])``.

Everything about batch t is a function of (seed, t): the iterator state is just
the number of batches handed out, and restoring it rebuilds the pipeline at that
batch (prefetched batches are dropped and recomputed), whatever the number of
worker processes.

JAX is imported lazily so that grain's worker processes, which unpickle the
per-example functions of this module, do not import it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from cbp_jax.data.sources import IGNORE_INDEX, BadExampleError

log = logging.getLogger(__name__)

_STREAM_TAG = 0x5EED  # separates the shuffling stream from augmentation streams
_MAX_STEPS = 2**40  # the training stream is infinite in practice


def _parse_absl_flags() -> None:
    """grain reads absl flags; outside absl.app.run they must be marked parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _worker_init(worker_index: int, worker_count: int) -> None:
    """Each grain worker is one process: one OpenCV thread avoids oversubscription."""
    del worker_index, worker_count
    import cv2

    cv2.setNumThreads(1)


def _shard(shard_options) -> tuple[int, int]:
    if shard_options is None:
        shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    return int(shard_options.shard_index), int(shard_options.shard_count)


def _load(source, record: int, skip: bool) -> tuple[dict, int]:
    """source[record]; with ``skip``, bad records are replaced by the next good one."""
    n = len(source)
    for skipped in range(n):
        try:
            return source[(record + skipped) % n], skipped
        except BadExampleError as e:
            if not skip:
                raise
            log.warning("skipping bad example %d: %s", (record + skipped) % n, e)
    raise BadExampleError(repr(source), f"all {n} examples are bad")


@dataclasses.dataclass
class _TrainExample:
    """Local element k -> transformed training example (picklable, runs in workers)."""

    source: Any
    transform: Callable
    seed: int
    global_batch_size: int
    local_batch_size: int
    shard_index: int
    skip_bad_examples: bool

    def __post_init__(self):
        self._perms: dict[int, np.ndarray] = {}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_perms"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._perms = {}

    def position(self, k: int) -> int:
        step, slot = divmod(k, self.local_batch_size)
        return step * self.global_batch_size + self.shard_index * self.local_batch_size + slot

    def record(self, position: int) -> tuple[int, int]:
        """Stream position -> (epoch, record index)."""
        epoch, i = divmod(position, len(self.source))
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.default_rng([self.seed, epoch, _STREAM_TAG])
            perm = rng.permutation(len(self.source))
            self._perms = {epoch: perm}
        return epoch, int(perm[i])

    def __call__(self, k: int) -> dict:
        epoch, record = self.record(self.position(int(k)))
        example, skipped = _load(self.source, record, self.skip_bad_examples)
        rng = np.random.default_rng([self.seed, epoch, record])
        out = self.transform(example, rng)
        kept = {k: out[k] for k in ("image", "label", "views") if k in out}
        return {**kept, "skipped": np.int32(skipped)}


def _to_global(batch: dict, sharding) -> dict:
    import jax

    # np.array copies out of grain's shared memory: on CPU, jax may alias host buffers,
    # which would keep every batch's shared-memory block alive until the array dies.
    return {
        k: jax.make_array_from_process_local_data(sharding, np.array(v)) for k, v in batch.items()
    }


def _check_batch(
    global_batch_size: int, shard_count: int, mesh, data_axis: str | tuple[str, ...]
) -> int:
    if global_batch_size <= 0 or global_batch_size % shard_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of the "
            f"process count {shard_count}"
        )
    if mesh is not None:
        axes = (data_axis,) if isinstance(data_axis, str) else tuple(data_axis)
        missing = [a for a in axes if a not in mesh.shape]
        if missing:
            raise ValueError(f"mesh has no axis {missing}; its axes are {dict(mesh.shape)}")
        size = math.prod(mesh.shape[a] for a in axes)
        if global_batch_size % size:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by the mesh's "
                f"{data_axis!r} axis of size {size}; pick a multiple of it"
            )
    return global_batch_size // shard_count


class _BaseLoader:
    """Owns a grain iterator whose last stage, grain's ``ThreadPrefetchIterDataset``, converts
    the next ``prefetch`` elements (to global arrays) in a background thread; closes it."""

    _grain_it = None
    _error: Exception | None = None

    def _start(self, dataset, num_workers: int, read_threads: int, convert, prefetch: int):
        _parse_absl_flags()
        it_ds = dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(prefetch, 1))
        )
        if num_workers > 0:
            it_ds = it_ds.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2),
                worker_init_fn=_worker_init,
            )
        if convert is not None:  # in this process: global arrays need the process's devices
            it_ds = it_ds.map(convert)
        it_ds = grain.experimental.ThreadPrefetchIterDataset(it_ds, prefetch_buffer_size=prefetch)
        self._grain_it = iter(it_ds)
        self._error = None

    def _next_element(self):
        """The grain iterator's next element; after a failure, that failure every time (grain
        would go on with the next element, silently dropping the failed one)."""
        if self._grain_it is None:
            raise RuntimeError(f"{type(self).__name__} is closed")
        if self._error is not None:
            raise self._error
        try:
            return next(self._grain_it)
        except Exception as e:
            self._error = e
            raise

    def close(self) -> None:
        """Stops the prefetch thread and the worker processes (idempotent)."""
        if self._grain_it is not None:
            self._grain_it.close()
            self._grain_it = None

    def __iter__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- interpreter shutdown
            pass


class TrainLoader(_BaseLoader):
    """Infinite iterator of global training batches; see ``make_train_loader``."""

    def __init__(
        self,
        source,
        transform: Callable,
        *,
        global_batch_size: int,
        mesh=None,
        data_axis: str | tuple[str, ...] = "data",
        seed: int = 0,
        num_workers: int = 0,
        read_threads: int = 1,
        prefetch: int = 2,
        shard_options=None,
        skip_bad_examples: bool | None = None,
    ):
        self.source, self.transform = source, transform
        self.seed, self.global_batch_size = int(seed), int(global_batch_size)
        self.mesh, self.data_axis = mesh, data_axis
        self.shard_index, self.shard_count = _shard(shard_options)
        self.local_batch_size = _check_batch(
            self.global_batch_size, self.shard_count, mesh, data_axis
        )
        if skip_bad_examples is None:
            skip_bad_examples = bool(getattr(source, "skip_bad_examples", False))
        self.skip_bad_examples = skip_bad_examples
        self.num_workers, self.read_threads, self.prefetch = num_workers, read_threads, prefetch
        self.num_skipped = 0
        self._step = 0
        self._example = _TrainExample(
            source,
            transform,
            self.seed,
            self.global_batch_size,
            self.local_batch_size,
            self.shard_index,
            skip_bad_examples,
        )
        self._restart()

    @property
    def step(self) -> int:
        """Number of batches handed out so far."""
        return self._step

    @property
    def epoch(self) -> int:
        """The epoch of the next batch's first example."""
        return self._step * self.global_batch_size // len(self.source)

    def _restart(self) -> None:
        self.close()
        b = self.local_batch_size
        ds = grain.MapDataset.range(self._step * b, _MAX_STEPS * b).map(self._example)
        ds = ds.batch(b, drop_remainder=True)
        sharding = None
        if self.mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec

            sharding = NamedSharding(self.mesh, PartitionSpec(self.data_axis))

        def convert(batch):
            out = {"image": batch["image"], "label": batch["label"].astype(np.int32)}
            if "views" in batch:  # data.views.WithObjectViews: the OCCL views of each pixel
                out["views"] = batch["views"].astype(np.int32)
            if sharding is not None:
                out = _to_global(out, sharding)
            out["skipped"] = int(np.sum(batch["skipped"]))
            return out

        self._start(ds, self.num_workers, self.read_threads, convert, self.prefetch)

    def __next__(self) -> dict:
        batch = self._next_element()
        skipped = int(batch.pop("skipped"))
        if skipped:
            self.num_skipped += skipped
            log.warning(
                "batch %d: %d bad example(s) skipped (%d so far on this process)",
                self._step,
                skipped,
                self.num_skipped,
            )
        self._step += 1
        return batch

    def get_state(self) -> dict:
        """JSON-able state: the next batch index plus what must match on restore."""
        return {
            "step": self._step,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_records": len(self.source),
        }

    def set_state(self, state: dict) -> None:
        """Continues exactly after the batch at which ``state`` was taken."""
        for key, mine in (
            ("seed", self.seed),
            ("global_batch_size", self.global_batch_size),
            ("num_records", len(self.source)),
        ):
            if int(state[key]) != mine:
                raise ValueError(
                    f"loader state has {key}={state[key]} but this loader has {mine}; "
                    "restore with the settings and data the state was saved with"
                )
        self._step = int(state["step"])
        self._restart()


def make_train_loader(
    source,
    transform: Callable,
    *,
    global_batch_size: int,
    mesh=None,
    data_axis: str | tuple[str, ...] = "data",
    seed: int = 0,
    num_workers: int = 0,
    read_threads: int = 1,
    prefetch: int = 2,
    shard_options=None,
    skip_bad_examples: bool | None = None,
) -> TrainLoader:
    """Infinite iterator of training batches.

    Args:
        source: random-access source (``make_source``).
        transform: ``TrainTransform`` (or any picklable ``f(example, rng) -> dict``
            with fixed-shape "image" and "label").
        global_batch_size: B over all processes.
        mesh: ``jax.sharding.Mesh``; batches become global ``jax.Array``s sharded along
            ``data_axis`` (built with ``jax.make_array_from_process_local_data``).
            None: per-process NumPy batches.
        data_axis: mesh axis (or tuple of axes) the batch dimension is sharded over.
        seed: shuffling and augmentation seed.
        num_workers: grain worker processes (0: in the main process).
        read_threads: threads per worker (or in the main process) making batches.
        prefetch: batches converted to device arrays ahead of time, in the thread of grain's
            ``ThreadPrefetchIterDataset`` (0: none; each batch is converted when asked for).
        shard_options: grain ``ShardOptions``; default ``ShardByJaxProcess``.
        skip_bad_examples: replace bad examples by the next good record and count
            them (``loader.num_skipped``); default: the source's setting.

    Returns:
        A ``TrainLoader``: ``next()`` gives ``{"image": float32 (B, H, W, 3),
        "label": int32 (B, H, W)}`` (and ``"views"``: int32 (B, H, W) when the transform
        gives them, ``data.views.WithObjectViews``); ``get_state()`` / ``set_state()``;
        ``close()``.
    """
    return TrainLoader(
        source,
        transform,
        global_batch_size=global_batch_size,
        mesh=mesh,
        data_axis=data_axis,
        seed=seed,
        num_workers=num_workers,
        read_threads=read_threads,
        prefetch=prefetch,
        shard_options=shard_options,
        skip_bad_examples=skip_bad_examples,
    )


# ----------------------------------------------------------------------------- eval


@dataclasses.dataclass
class _EvalExample:
    """Local element k -> test-transformed example of this process's slot, at its own size."""

    source: Any
    transform: Callable
    global_batch_size: int
    local_batch_size: int
    shard_index: int
    num_examples: int
    skip_bad_examples: bool

    def __call__(self, k: int) -> dict:
        chunk, slot = divmod(int(k), self.local_batch_size)
        index = chunk * self.global_batch_size + self.shard_index * self.local_batch_size + slot
        absent = {"image": np.zeros((0, 0, 3), np.float32), "label": np.zeros((0, 0), np.uint8),
                  "index": np.int32(-1), "name": ""}  # fmt: skip
        if index >= self.num_examples:
            return absent
        try:
            example = self.source[index]
        except BadExampleError as e:
            if not self.skip_bad_examples:
                raise
            # Left out of the metrics (an empty slot); never replaced, so nothing counts twice.
            log.warning("eval: skipping bad example %d: %s", index, e)
            return absent
        out = self.transform(example)
        return {
            "image": np.asarray(out["image"], np.float32),
            "label": np.asarray(out["label"]),
            "index": np.int32(index),
            "name": example["name"],
        }


def _size_key(example: dict) -> tuple[int, int, int, int]:
    """(image h, w, label h, w); -1s for an empty slot."""
    if example["index"] < 0:
        return (-1, -1, -1, -1)
    return (*example["image"].shape[:2], *example["label"].shape[:2])


def _all_size_keys(local_keys: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The distinct size keys of one chunk over every process, sorted (the same everywhere)."""
    keys = np.asarray(local_keys, np.int32)
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        keys = np.asarray(multihost_utils.process_allgather(keys)).reshape(-1, 4)
    return sorted({tuple(int(v) for v in k) for k in keys if k[0] >= 0})


def _pad_group(examples: list[dict], key: tuple[int, ...], size: int) -> dict:
    """This process's ``size`` slots of one same-size global batch: ``examples`` then padding
    (image 0, label 255, ``valid`` False)."""
    h, w, lh, lw = key
    image = np.zeros((size, h, w, 3), np.float32)
    label = np.full((size, lh, lw), IGNORE_INDEX, np.int32)
    valid = np.zeros(size, bool)
    index = np.full(size, -1, np.int32)
    for i, ex in enumerate(examples):
        image[i], label[i], valid[i], index[i] = ex["image"], ex["label"], True, ex["index"]
    names = [ex["name"] for ex in examples] + [""] * (size - len(examples))
    return {"image": image, "label": label, "valid": valid, "index": index, "name": names}


class EvalLoader(_BaseLoader):
    """One pass over a split in same-size global batches; see ``make_eval_loader``."""

    def __init__(
        self,
        source,
        transform: Callable,
        *,
        global_batch_size: int,
        mesh=None,
        data_axis: str | tuple[str, ...] = "data",
        num_examples: int | None = None,
        num_workers: int = 0,
        read_threads: int = 1,
        prefetch: int = 2,
        shard_options=None,
        skip_bad_examples: bool | None = None,
    ):
        shard_index, shard_count = _shard(shard_options)
        self.local_batch_size = b = _check_batch(global_batch_size, shard_count, mesh, data_axis)
        if skip_bad_examples is None:
            skip_bad_examples = bool(getattr(source, "skip_bad_examples", False))
        n = len(source) if not num_examples else min(int(num_examples), len(source))
        self.num_examples = n
        self.num_chunks = -(-n // global_batch_size)
        fn = _EvalExample(
            source, transform, global_batch_size, b, shard_index, n, skip_bad_examples
        )
        ds = grain.MapDataset.range(self.num_chunks * b).map(fn)
        self._sharding = None
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec

            self._sharding = NamedSharding(mesh, PartitionSpec(data_axis))
        self._batches: list[dict] = []
        self._start(ds, num_workers, read_threads, None, prefetch)

    def _next_chunk(self) -> None:
        """Reads this process's slots of the next chunk and queues its same-size batches."""
        chunk = [self._next_element() for _ in range(self.local_batch_size)]
        keys = [_size_key(ex) for ex in chunk]
        for key in _all_size_keys(keys):
            group = _pad_group(
                [ex for ex, k in zip(chunk, keys, strict=True) if k == key],
                key,
                self.local_batch_size,
            )
            if self._sharding is not None:
                names = group.pop("name")
                group = _to_global(group, self._sharding) | {"name": names}
            self._batches.append(group)

    def __next__(self) -> dict:
        while not self._batches:
            if self._grain_it is None:
                raise StopIteration
            try:
                self._next_chunk()
            except StopIteration:
                self.close()
                raise
        return self._batches.pop(0)


def make_eval_loader(
    source,
    transform: Callable,
    *,
    global_batch_size: int,
    mesh=None,
    data_axis: str | tuple[str, ...] = "data",
    num_examples: int | None = None,
    num_workers: int = 0,
    read_threads: int = 1,
    prefetch: int = 2,
    shard_options=None,
    skip_bad_examples: bool | None = None,
) -> EvalLoader:
    """One pass over ``source`` (its first ``num_examples``) in same-size global batches.

    The split is read in chunks of ``global_batch_size`` consecutive examples; process p of P
    test-transforms slots ``p * B / P .. (p + 1) * B / P - 1`` of each chunk. A chunk becomes
    one global batch per distinct (image size, label size) in it, in sorted order (the
    processes agree on the sizes with one small all-gather per chunk). Each such batch holds
    the chunk's examples of that size and ``valid=False`` padding (image 0, label 255), so
    every example is counted exactly once and the model sees each image at its own size, never
    padded: whole-image inference stays exact (mmseg runs it with batch 1). Fixed-size splits
    (CamVid, crops) give one full batch per chunk; mixed sizes (ADE20K) trade idle slots for
    that exactness.

    Args:
        source: random-access source (``make_source``).
        transform: ``TestTransform`` (or any picklable ``f(example) -> {"image", "label"}``).
        global_batch_size: slots per chunk over all processes (a multiple of the mesh's
            ``data_axis`` size and of the process count).
        mesh: ``jax.sharding.Mesh``: batches become global ``jax.Array``s sharded along
            ``data_axis``; None: NumPy batches (one process).
        num_examples: evaluate only the first ones (None: all).
        num_workers, read_threads, prefetch, shard_options, skip_bad_examples: as for
            ``make_train_loader``; a bad example is left out (logged), not replaced.

    Returns:
        An ``EvalLoader`` of dicts: "image" float32 (B, h, w, 3) normalized at the test size,
        "label" int32 (B, H, W) original size, "valid" bool (B,), "index" int32 (B,) record
        index or -1, and "name": this process's names (a list, "" for padding).
    """
    return EvalLoader(
        source,
        transform,
        global_batch_size=global_batch_size,
        mesh=mesh,
        data_axis=data_axis,
        num_examples=num_examples,
        num_workers=num_workers,
        read_threads=read_threads,
        prefetch=prefetch,
        shard_options=shard_options,
        skip_bad_examples=skip_bad_examples,
    )
