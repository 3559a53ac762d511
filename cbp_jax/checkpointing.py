"""Checkpoints with Orbax ``CheckpointManager``: train state + data-iterator state + config.

The train state is saved as a flat ``{"params.encoder.stages.0...": array}`` dict (typed PRNG
keys as their raw key data), so any pytree (NNX states, optax NamedTuples) round-trips, and
restoring onto an abstract, sharded target places every array directly on its devices.
"""

import contextlib
import json
import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from cbp_jax import storage
from cbp_jax.sharding import path_name


def is_prng_key(x) -> bool:
    """Whether ``x`` is a typed PRNG key array."""
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _flat_names(tree) -> list[str]:
    return [path_name(p, sep=".") for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def keys_as_data(tree):
    """``tree`` with every typed PRNG key replaced by its uint32 key data."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_prng_key(x) else x, tree)


def keys_from_data(raw, like):
    """Inverse of :func:`keys_as_data`: re-wraps key data where ``like`` holds typed keys
    (arrays keep their key implementation; shape structs get JAX's default one, which is
    what ``nnx.Rngs`` draws)."""

    def wrap(r, x):
        if not is_prng_key(x):
            return r
        impl = jax.random.key_impl(x) if isinstance(x, jax.Array) else None
        return jax.random.wrap_key_data(r, impl=impl)

    return jax.tree.map(wrap, raw, like)


def flatten_state(tree) -> dict[str, Any]:
    """``{dotted path: leaf}``; typed PRNG keys become their uint32 key data."""
    leaves = jax.tree_util.tree_leaves(keys_as_data(tree))
    return dict(zip(_flat_names(tree), leaves, strict=True))


def _abstract_flat(target) -> dict[str, Any]:
    """Abstract (shape, dtype, sharding) version of :func:`flatten_state` for restoring."""

    def abstract(leaf):
        if is_prng_key(leaf):
            data = jax.eval_shape(jax.random.key_data, leaf)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=leaf.sharding)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)

    leaves = jax.tree_util.tree_leaves(target)
    return {name: abstract(leaf) for name, leaf in zip(_flat_names(target), leaves, strict=True)}


def unflatten_state(flat: dict[str, Any], target):
    """Inverse of :func:`flatten_state` onto the structure (and key types) of ``target``."""
    names = _flat_names(target)
    missing = [n for n in names if n not in flat]
    if missing:
        raise ValueError(
            f"checkpoint lacks {len(missing)} entries of the train state, e.g. {missing[:5]}; "
            "it was written by a different model or optimizer configuration."
        )
    raw = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(target), [flat[n] for n in names]
    )
    return keys_from_data(raw, target)


CHECKPOINTS_NAME = "checkpoints"  # the folder inside a workdir
STATE_ITEM = "state"  # the train state's item in a checkpoint step


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the earlier checkpoints are intact."""


class NoUsableCheckpointError(RuntimeError):
    """Every checkpoint of a workdir failed to restore."""


class CheckpointLayoutError(NoUsableCheckpointError):
    """A checkpoint holds another train-state layout than the run builds (not damage)."""


class _DropFailedWriteNoise(logging.Filter):
    """Drops Orbax's and asyncio's error records about a write under ``directory``: one
    traceback per array, hundreds per failed save, all saying what the single
    :class:`CheckpointSaveError` says."""

    def __init__(self, directory: str):
        super().__init__()
        self.directory = directory

    def filter(self, record: logging.LogRecord) -> bool:
        from_writer = record.name == "asyncio" or "orbax" in record.pathname
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        return not (from_writer and self.directory in text)


_NOISY_LOGGERS = ("asyncio", "absl")


def _folder_mib(path: str) -> float:
    total = 0
    for folder, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total / 2**20


def _space_note(directory: str, step_dir: str | None) -> str:
    """How large a checkpoint is and how much room the disk has; "" for an object store."""
    if not storage.is_local(directory):
        return ""
    usage = shutil.disk_usage(directory)
    note = f"That disk has {usage.free / 2**20:.0f} MiB free of {usage.total / 2**20:.0f} MiB. "
    if step_dir is not None:
        note += f"One checkpoint takes {_folder_mib(step_dir):.0f} MiB. "
    return note


class Checkpointer:
    """Periodic, asynchronous, keep-N checkpoints of (train state, data state, config).

    A save that fails (a full disk, a lost mount) raises :class:`CheckpointSaveError` at
    the :meth:`check_saves` after the write ends (asynchronous saves) or at once; the
    checkpoints written before stay as they are. :meth:`restore_latest` falls back past
    checkpoints that do not restore.

    Args:
      directory: absolute or relative folder, or a ``gs://`` URL (``<workdir>/checkpoints``).
      every: save every ``every`` steps (``save(force=True)`` saves any step).
      keep: how many recent checkpoints to keep.
      async_save: write in a background thread while training goes on.
    """

    def __init__(self, directory: str, *, every: int, keep: int = 3, async_save: bool = True):
        self.directory = os.fspath(storage.resolve(directory))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None  # the step being written in the background
        self._noise_filter = _DropFailedWriteNoise(self.directory)
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).addFilter(self._noise_filter)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self, step: int, state, data_state: dict, config: dict | None = None, force: bool = False
    ) -> bool:
        """Saves if ``step`` is on the interval (or ``force``); returns whether it saved."""
        items = {
            "state": ocp.args.StandardSave(flatten_state(state)),
            "data": ocp.args.JsonSave(data_state),
        }
        if config is not None:
            items["config"] = ocp.args.JsonSave(json.loads(json.dumps(config, default=str)))
        self.check_saves()
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:
            raise self._save_error(step, e) from e
        if saved:
            self._pending = step
            self.check_saves()  # a synchronous save has finished here
        return saved

    def check_saves(self) -> None:
        """Raises :class:`CheckpointSaveError` if the last save ended without a checkpoint.

        Cheap (no file-system access while a write is running): call it every step.
        """
        if self._pending is None or self.manager.is_saving_in_progress():
            return
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()  # returns at once; re-raises a failed write
            error = None
        except Exception as e:  # noqa: BLE001 -- reported in the CheckpointSaveError
            error = e
        if error is not None or not (storage.path(self.directory) / str(step)).is_dir():
            raise self._save_error(step, error)

    def _save_error(self, step: int, cause: Exception | None) -> CheckpointSaveError:
        """The one message for a failed save; removes its partial write (Orbax's temporary
        folder, or on GCS the unfinished step)."""
        folder = storage.path(self.directory)
        names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
        # A partial write: Orbax's temporary folder, or (on GCS, written in place) the step.
        partial = [n for n in names if n.startswith(f"{step}.orbax-checkpoint-tmp")]
        partial += [] if storage.is_local(folder) else [n for n in names if n == str(step)]
        if jax.process_index() == 0:
            for name in partial:
                with contextlib.suppress(OSError):
                    (folder / name).rmtree()
        earlier = sorted(int(n) for n in names if n.isdigit() and n != str(step))
        reason = str(cause).strip().splitlines()[0][:400] if cause else "the write did not finish"
        room = _space_note(
            self.directory, os.fspath(folder / str(earlier[-1])) if earlier else None
        )
        if earlier:
            kept = f"The earlier checkpoints (steps {earlier}) are intact"
        else:
            kept = "No earlier checkpoint exists"
        if storage.is_local(folder):
            fix = (
                "Free space there (or lower --config.checkpoint.keep, or pass a --workdir on a "
                "larger disk)"
            )
        else:
            fix = "Check the bucket's quota and permissions (or lower --config.checkpoint.keep)"
        return CheckpointSaveError(
            f"Saving the checkpoint of step {step} in {self.directory} failed: {reason}. "
            f"{room}{kept}; the partial write was removed. {fix}, then rerun the same command "
            "to resume."
        )

    def _check_layout(self, step: int, target) -> None:
        """Raises :class:`CheckpointLayoutError` if ``step`` holds other state entries than
        ``target``; unreadable metadata is left to the restore itself."""
        try:
            saved = set(self.manager.item_metadata(step)["state"].tree)
        except Exception:  # noqa: BLE001 -- a damaged checkpoint: restore() reports it
            return
        expected = set(_flat_names(target))
        if saved == expected:
            return
        missing, extra = sorted(expected - saved), sorted(saved - expected)
        raise CheckpointLayoutError(
            f"The checkpoint {storage.path(self.directory) / str(step)} holds another train "
            f"state than this run builds: {len(missing)} entries missing (e.g. {missing[:3]}), "
            f"{len(extra)} not expected (e.g. {extra[:3]}). It was written by another model or "
            "optimizer configuration, or by cbp_jax before the optimizer state became "
            "optax.partition groups under optax.inject_hyperparams. Nothing was moved: resume "
            "it with the code and config that wrote it, or pass another --workdir to start "
            "afresh."
        )

    def restore(self, step: int, target) -> tuple[Any, dict]:
        """``(state, data_state)`` of ``step``, laid out as ``target`` (structure, shardings).

        Raises:
          CheckpointLayoutError: ``step`` holds another set of state entries than ``target``.
        """
        self._check_layout(step, target)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract_flat(target)),
                data=ocp.args.JsonRestore(),
            ),
        )
        return unflatten_state(dict(restored["state"]), target), restored["data"]

    def restore_latest(self, target) -> tuple[int, Any, dict] | None:
        """``(step, state, data_state)`` of the newest checkpoint that restores; None if
        there is none.

        A step that does not restore (a truncated file, a lost manifest) is moved aside to
        ``<step>.broken`` (never deleted), with a warning naming it, and the next older step
        is tried. A checkpoint of another layout (:class:`CheckpointLayoutError`) stops the
        search and is left where it is.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        broken = []
        for step in steps:
            try:
                state, data_state = self.restore(step, target)
            except CheckpointLayoutError:
                raise
            except Exception as e:  # noqa: BLE001 -- named in the warning, then the next step
                moved = self._set_aside(step)
                reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else repr(e)
                absl_logging.warning(
                    "The checkpoint %s does not restore (%s: %s); moved it to %s and trying "
                    "the previous step.",
                    storage.path(self.directory) / str(step),
                    type(e).__name__,
                    reason,
                    moved,
                )
                broken.append(moved)
                continue
            if broken:
                print(f"Warning: skipped broken checkpoint(s) {broken}; resuming from step {step}.")
            return step, state, data_state
        if broken:
            raise NoUsableCheckpointError(
                f"No checkpoint in {self.directory} restores; all were moved aside: {broken}. "
                "Rerun the same command to start from scratch, or restore a copy of the "
                "checkpoints from a backup."
            )
        return None

    def _set_aside(self, step: int) -> str:
        """Renames the folder of ``step`` to ``<step>.broken`` (``.broken2`` ...): out of
        Orbax's sight, still on disk."""
        source = storage.path(self.directory) / str(step)
        target, n = source.with_name(f"{step}.broken"), 1
        while target.exists():
            n += 1
            target = source.with_name(f"{step}.broken{n}")
        if jax.process_index() == 0:
            source.rename(target)
        self.manager.reload()
        return os.fspath(target)

    def wait(self) -> None:
        """Waits for the background write; raises :class:`CheckpointSaveError` if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception:  # noqa: BLE001 -- a pending save's failure: check_saves reports it
            if self._pending is None:
                absl_logging.info("a failed save, already reported, was awaited")
        self.check_saves()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()
            for name in _NOISY_LOGGERS:
                logging.getLogger(name).removeFilter(self._noise_filter)


def restore_subset(directory: str, step: int, target):
    """The entries of ``target`` (a part of the saved train state, e.g. its ``{"params",
    "model_state"}``) from checkpoint ``step`` in ``directory``, laid out as ``target``
    (arrays or ``jax.ShapeDtypeStruct`` with shardings). Reads nothing else (no optimizer
    state, no data-iterator state) and writes nothing.

    Raises:
      CheckpointLayoutError: the checkpoint lacks entries of ``target``.
    """
    path = storage.resolve(directory) / str(step) / STATE_ITEM
    with ocp.PyTreeCheckpointer() as checkpointer:
        saved = set(ocp.PyTreeCheckpointHandler().metadata(path).tree)
        missing = sorted(set(_flat_names(target)) - saved)
        if missing:
            raise CheckpointLayoutError(
                f"The checkpoint {path.parent} lacks {len(missing)} entries of the "
                f"model this config builds (e.g. {missing[:3]}): it was written by another "
                "model configuration. Pass the config the run was trained with."
            )
        abstract = _abstract_flat(target)
        restored = checkpointer.restore(
            path,
            args=ocp.args.PyTreeRestore(
                abstract,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=True,
            ),
        )
    return unflatten_state(dict(restored), target)
