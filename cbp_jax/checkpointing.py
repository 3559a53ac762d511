"""Checkpoints with Orbax ``CheckpointManager``: train state + data-iterator state + config.

The train state is saved as a flat ``{"params.encoder.stages.0...": array}`` dict (typed PRNG
keys as their raw key data), so any pytree (NNX states, optax NamedTuples) round-trips, and
restoring onto an abstract, sharded target places every array directly on its devices.
"""

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from cbp_jax.sharding import path_name


def is_prng_key(x) -> bool:
    """Whether ``x`` is a typed PRNG key array."""
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _flat_names(tree) -> list[str]:
    return [path_name(p).replace("/", ".") for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def keys_as_data(tree):
    """``tree`` with every typed PRNG key replaced by its uint32 key data."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_prng_key(x) else x, tree)


def keys_from_data(raw, like):
    """Inverse of :func:`keys_as_data`: re-wraps key data where ``like`` holds typed keys."""
    return jax.tree.map(
        lambda r, x: (
            jax.random.wrap_key_data(r, impl=jax.random.key_impl(x)) if is_prng_key(x) else r
        ),
        raw,
        like,
    )


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


class Checkpointer:
    """Periodic, asynchronous, keep-N checkpoints of (train state, data state, config).

    Args:
      directory: absolute or relative folder (``<workdir>/checkpoints``).
      every: save every ``every`` steps (``save(force=True)`` saves any step).
      keep: how many recent checkpoints to keep.
      async_save: write in a background thread while training goes on.
    """

    def __init__(self, directory: str, *, every: int, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

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
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, target) -> tuple[Any, dict]:
        """``(state, data_state)`` of ``step``, laid out as ``target`` (structure, shardings)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract_flat(target)),
                data=ocp.args.JsonRestore(),
            ),
        )
        return unflatten_state(dict(restored["state"]), target), restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
