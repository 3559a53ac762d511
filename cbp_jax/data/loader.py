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
import queue
import threading
from collections.abc import Callable, Iterator
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
        return {
            "image": out["image"],
            "label": out["label"],
            "skipped": np.int32(skipped),
        }


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


class _Prefetcher:
    """A thread that pulls numpy batches and turns them into global arrays ahead."""

    def __init__(self, iterator, convert, size: int):
        self._it, self._convert = iterator, convert
        self._queue: queue.Queue = queue.Queue(maxsize=max(size, 1))
        self._stop = threading.Event()
        self._final = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            for batch in self._it:
                item = ("ok", self._convert(batch))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(("end", None))
        except BaseException as e:  # noqa: BLE001 -- re-raised in the consumer
            self._queue.put(("error", e))

    def get(self):
        if self._final is not None:  # the stream ended or failed: say so every time
            kind, value = self._final
        else:
            while True:
                try:
                    kind, value = self._queue.get(timeout=1.0)
                    break
                except queue.Empty:
                    if not self._thread.is_alive() and self._queue.empty():
                        raise RuntimeError("the loader's prefetch thread stopped") from None
            if kind != "ok":
                self._final = (kind, value)
        if kind == "error":
            raise value
        if kind == "end":
            raise StopIteration
        return value

    def close(self):
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
            self._thread.join(timeout=0.1)


class _BaseLoader:
    """Owns a grain iterator and a device-prefetch thread; closes both."""

    _prefetcher: _Prefetcher | None = None
    _grain_it = None

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
        self._grain_it = iter(it_ds)
        self._prefetcher = _Prefetcher(self._grain_it, convert, prefetch)

    def close(self) -> None:
        """Stops the prefetch thread and the worker processes (idempotent)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
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
            if sharding is not None:
                out = _to_global(out, sharding)
            out["skipped"] = int(np.sum(batch["skipped"]))
            return out

        self._start(ds, self.num_workers, self.read_threads, convert, self.prefetch)

    def __next__(self) -> dict:
        if self._prefetcher is None:
            raise RuntimeError("TrainLoader is closed")
        batch = self._prefetcher.get()
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
        prefetch: batches converted to device arrays ahead of time.
        shard_options: grain ``ShardOptions``; default ``ShardByJaxProcess``.
        skip_bad_examples: replace bad examples by the next good record and count
            them (``loader.num_skipped``); default: the source's setting.

    Returns:
        A ``TrainLoader``: ``next()`` gives ``{"image": float32 (B, H, W, 3),
        "label": int32 (B, H, W)}``; ``get_state()`` / ``set_state()``; ``close()``.
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
    """Global index -> test-transformed example padded to fixed sizes."""

    source: Any
    transform: Callable
    global_batch_size: int
    local_batch_size: int
    shard_index: int
    image_size: tuple[int, int]
    label_size: tuple[int, int]
    skip_bad_examples: bool

    def __call__(self, k: int) -> dict:
        step, slot = divmod(int(k), self.local_batch_size)
        index = step * self.global_batch_size + self.shard_index * self.local_batch_size + slot
        h, w = self.image_size
        lh, lw = self.label_size
        image = np.zeros((h, w, 3), np.float32)
        label = np.full((lh, lw), IGNORE_INDEX, np.uint8)
        zero = np.zeros(2, np.int32)
        padding = {"image": image, "label": label, "image_hw": zero, "label_hw": zero,
                   "valid": np.bool_(False), "index": np.int32(-1), "name": ""}  # fmt: skip
        if index >= len(self.source):
            return padding
        try:
            example = self.source[index]
        except BadExampleError as e:
            if not self.skip_bad_examples:
                raise
            # Counted once as an invalid slot; never replaced, so nothing counts twice.
            log.warning("eval: skipping bad example %d: %s", index, e)
            return padding
        out = self.transform(example)
        img, lab = out["image"], out["label"]
        name = example["name"]
        if img.shape[0] > h or img.shape[1] > w or lab.shape[0] > lh or lab.shape[1] > lw:
            raise ValueError(
                f"eval example {name!r}: resized image {img.shape[:2]} / label {lab.shape} "
                f"(H, W) exceed image_size={self.image_size} / label_size={self.label_size}; "
                "pass larger sizes to make_eval_loader"
            )
        image[: img.shape[0], : img.shape[1]] = img
        label[: lab.shape[0], : lab.shape[1]] = lab
        return {
            "image": image,
            "label": label,
            "image_hw": np.asarray(img.shape[:2], np.int32),
            "label_hw": np.asarray(lab.shape, np.int32),
            "valid": np.bool_(True),
            "index": np.int32(index),
            "name": name,
        }


class EvalLoader(_BaseLoader):
    """One pass over a split in padded global batches; see ``make_eval_loader``."""

    def __init__(
        self,
        source,
        transform: Callable,
        *,
        global_batch_size: int,
        image_size: tuple[int, int],
        label_size: tuple[int, int],
        mesh=None,
        data_axis: str | tuple[str, ...] = "data",
        num_workers: int = 0,
        read_threads: int = 1,
        prefetch: int = 2,
        shard_options=None,
        skip_bad_examples: bool | None = None,
    ):
        shard_index, shard_count = _shard(shard_options)
        b = _check_batch(global_batch_size, shard_count, mesh, data_axis)
        if skip_bad_examples is None:
            skip_bad_examples = bool(getattr(source, "skip_bad_examples", False))
        self.num_batches = -(-len(source) // global_batch_size)
        fn = _EvalExample(
            source,
            transform,
            global_batch_size,
            b,
            shard_index,
            tuple(image_size),
            tuple(label_size),
            skip_bad_examples,
        )
        ds = grain.MapDataset.range(self.num_batches * b).map(fn).batch(b)
        if mesh is None:
            convert = lambda batch: batch
        else:
            from jax.sharding import NamedSharding, PartitionSpec

            sharding = NamedSharding(mesh, PartitionSpec(data_axis))

            def convert(batch):
                names = batch.pop("name")
                out = _to_global({**batch, "label": batch["label"].astype(np.int32)}, sharding)
                out["name"] = [str(n) for n in names]  # this process's names, in its slot order
                return out

        self._start(ds, num_workers, read_threads, convert, prefetch)

    def __len__(self) -> int:
        return self.num_batches

    def __next__(self) -> dict:
        if self._prefetcher is None:
            raise StopIteration
        try:
            return self._prefetcher.get()
        except StopIteration:
            self.close()
            raise


def make_eval_loader(
    source,
    transform: Callable,
    *,
    global_batch_size: int,
    image_size: tuple[int, int],
    label_size: tuple[int, int],
    mesh=None,
    data_axis: str | tuple[str, ...] = "data",
    num_workers: int = 0,
    read_threads: int = 1,
    prefetch: int = 2,
    shard_options=None,
    skip_bad_examples: bool | None = None,
) -> EvalLoader:
    """One pass over ``source`` in padded, fixed-shape global batches.

    Every example is test-transformed, the image padded with 0 to ``image_size``
    and the original-size label padded with 255 to ``label_size``. The last batch
    is filled with ``valid=False`` examples whose labels are all 255, so summing
    metrics over every batch counts each real example exactly once.

    Returns:
        An ``EvalLoader`` (``len()`` = number of batches) of dicts:
        "image" float32 (B, Hi, Wi, 3), "label" int32 (B, Hl, Wl) (uint8 without a
        mesh), "image_hw" int32 (B, 2) resized size, "label_hw" int32 (B, 2) original
        size, "valid" bool (B,), "index" int32 (B,) record index or -1, and "name":
        this process's names (a list; NumPy array without a mesh).
    """
    return EvalLoader(
        source,
        transform,
        global_batch_size=global_batch_size,
        image_size=image_size,
        label_size=label_size,
        mesh=mesh,
        data_axis=data_axis,
        num_workers=num_workers,
        read_threads=read_threads,
        prefetch=prefetch,
        shard_options=shard_options,
        skip_bad_examples=skip_bad_examples,
    )


def eval_examples(
    source, transform: Callable, *, shard_options=None, skip_bad_examples: bool | None = None
) -> Iterator[dict]:
    """Per-image test examples of this process's share (every P-th), in order.

    Yields ``{"image": float32 (1, h, w, 3), "label": uint8 (H, W) original size,
    "name": str, "index": int}`` -- mmseg's batch-1 whole-image inference.
    """
    shard_index, shard_count = _shard(shard_options)
    if skip_bad_examples is None:
        skip_bad_examples = bool(getattr(source, "skip_bad_examples", False))
    for index in range(shard_index, len(source), shard_count):
        example, skipped = _load(source, index, skip_bad_examples)
        if skipped:
            continue  # a bad example is dropped from evaluation, and logged by _load
        out = transform(example)
        yield {
            "image": out["image"][None],
            "label": out["label"],
            "name": example["name"],
            "index": index,
        }
