"""Which blocks an encoder with ``scan_blocks`` stacks, and the one conversion between the
unrolled and the stacked layouts of its variables.

Unrolled, block ``i`` of a stage is ``stages.{s}.blocks.{i}.…`` (ResNet: ``stages.{s}.{i}.…``);
scanned, a stage's repeated blocks are one :class:`~cbp_jax.models.layers.BlockStack` whose
variables carry a leading axis, ``stages.{s}.blocks.stacked.…`` (Swin's window pairs:
``stages.{s}.blocks.stacked.{0|1}.…``, one entry per pair; ResNet: the blocks after the
first, ``stages.{s}.1.stacked.…``). :func:`plan` says where, from the architecture alone;
:func:`stack_blocks` / :func:`unstack_blocks` move flat ``{dotted name: array}`` dicts
between the layouts, so that the weight importers and exports (which know the unrolled
names) and checkpoints written by either layout serve both.

A stacked block of rate 0 among blocks that drop paths holds a fixed random stream the
unrolled block does not have (see ``layers.DropPath``): unstacking drops it, stacking
restores it (key 0, count 0).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cbp_jax import sharding
from cbp_jax.models import layers

FAMILIES = ("mit", "convnext", "swin", "resnet")
_RNG_LEAF = re.compile(r"(^|\.)drop_path\.rngs\.(key|count)(\.value)?$")


@dataclasses.dataclass(frozen=True)
class Stack:
    """Blocks ``start .. start + len(rates) - 1`` of the list at ``blocks``, stacked at
    ``path`` with a leading axis of ``len(rates) // group`` entries.

    Attributes:
      blocks: the unrolled list's path (block ``i`` is ``{blocks}.{i}.…``).
      path: the stacked unit's path (``{path}.…``, or ``{path}.{r}.…`` for the r-th block of
        a group).
      start: the index of the first stacked block in the list.
      rates: each stacked block's drop-path rate.
      group: consecutive blocks per stacked entry.
    """

    blocks: str
    path: str
    start: int
    rates: tuple[float, ...]
    group: int = 1

    @property
    def steps(self) -> int:
        return len(self.rates) // self.group


def stage_stack(family: str, depth: int) -> tuple[int, int] | None:
    """``(first stacked block, blocks per scan step)`` of a stage of ``depth`` blocks, or None
    where the stage stays unrolled: MiT and ConvNeXt stack every block; Swin its (window,
    shifted window) pairs when the depth is even; ResNet the blocks after the first
    (downsampling) one when there are any."""
    if family in ("mit", "convnext"):
        return (0, 1) if depth >= 1 else None
    if family == "swin":
        return (0, 2) if depth >= 2 and depth % 2 == 0 else None
    if family == "resnet":
        return (1, 1) if depth >= 2 else None
    raise ValueError(f"family={family!r}; use one of {FAMILIES}.")


def plan(
    family: str, depths: Sequence[int], drop_path_rate: float, prefix: str = ""
) -> tuple[Stack, ...]:
    """The stacks of a scanned encoder of ``family`` with ``depths`` (names under ``prefix``,
    e.g. ``"encoder."`` in a segmentor)."""
    out = []
    for s, (depth, rates) in enumerate(
        zip(depths, layers.drop_path_rates(drop_path_rate, depths), strict=True)
    ):
        found = stage_stack(family, depth)
        if found is None:
            continue
        start, group = found
        if family == "resnet":
            blocks, path = f"{prefix}stages.{s}", f"{prefix}stages.{s}.1.{layers.STACKED}"
        else:
            blocks = f"{prefix}stages.{s}.blocks"
            path = f"{blocks}.{layers.STACKED}"
        out.append(Stack(blocks, path, start, tuple(rates[start:]), group))
    return tuple(out)


def module_plan(module: Any) -> tuple[Stack, ...]:
    """The stacks of ``module`` (an encoder or a segmentor; names as ``nnx`` paths give
    them): empty unless its encoder was built with ``scan_blocks``."""
    encoder = getattr(module, "encoder", module)
    if not getattr(encoder, "scan_blocks", False):
        return ()
    prefix = "encoder." if encoder is not module else ""
    cfg = encoder.config
    return plan(encoder.FAMILY, cfg.depths, cfg.drop_path_rate, prefix)


def _stack_of(name: str, stacks: Sequence[Stack]) -> tuple[Stack, int, str] | None:
    """``(stack, index in its group, suffix)`` of a stacked variable's name."""
    for stack in stacks:
        if name.startswith(stack.path + "."):
            rest = name[len(stack.path) + 1 :]
            if stack.group == 1:
                return stack, 0, rest
            r, suffix = rest.split(".", 1)
            return stack, int(r), suffix
    return None


def _block_of(name: str, stacks: Sequence[Stack]) -> tuple[Stack, int, str] | None:
    """``(stack, block index within the stack, suffix)`` of an unrolled block's name."""
    for stack in stacks:
        m = re.match(re.escape(stack.blocks) + r"\.(\d+)\.(.+)$", name)
        if m and stack.start <= int(m.group(1)) < stack.start + len(stack.rates):
            return stack, int(m.group(1)) - stack.start, m.group(2)
    return None


def _stacked_name(stack: Stack, r: int, suffix: str) -> str:
    return f"{stack.path}.{suffix}" if stack.group == 1 else f"{stack.path}.{r}.{suffix}"


def unstack_blocks(flat: Mapping[str, Any], stacks: Sequence[Stack]) -> dict[str, Any]:
    """``flat`` (``{dotted name: array}`` of the stacked layout) in the unrolled layout: each
    stacked array (n, ...) becomes its n blocks' (...) arrays; other names pass unchanged."""
    out = {}
    for name, value in flat.items():
        found = _stack_of(name, stacks)
        if found is None:
            out[name] = value
            continue
        stack, r, suffix = found
        for step in range(stack.steps):
            i = step * stack.group + r
            if stack.rates[i] == 0 and _RNG_LEAF.search(suffix):
                continue  # the unrolled block of rate 0 has no random stream
            out[f"{stack.blocks}.{stack.start + i}.{suffix}"] = value[step]
    return out


def _placeholder(suffix: str, like: Any) -> Any:
    """The fixed stream of a stacked rate-0 block: key 0 (as ``like``: typed or key data),
    count 0."""
    if suffix.rsplit(".value", 1)[0].endswith("count"):
        return jnp.zeros_like(like)
    if jax.dtypes.issubdtype(like.dtype, jax.dtypes.prng_key):
        return jax.random.key(0, impl=jax.random.key_impl(like))
    return jax.random.key_data(jax.random.key(0))


def stack_blocks(flat: Mapping[str, Any], stacks: Sequence[Stack]) -> dict[str, Any]:
    """``flat`` (``{dotted name: array}`` of the unrolled layout) in the stacked layout: the
    blocks' arrays of each stacked variable become one array with a leading axis.

    Raises:
      ValueError: a stacked variable lacks some of its blocks (naming them).
    """
    out, parts, likes = {}, {}, {}
    for name, value in flat.items():
        found = _block_of(name, stacks)
        if found is None:
            out[name] = value
            continue
        stack, i, suffix = found
        r, step = i % stack.group, i // stack.group
        parts.setdefault((stack, r, suffix), {})[step] = value
        likes.setdefault((stack, suffix), value)
    for stack, _, suffix in list(parts):  # a group member all of rate 0 has no stream yet
        if _RNG_LEAF.search(suffix):
            for r in range(stack.group):
                parts.setdefault((stack, r, suffix), {})
    missing = []
    for (stack, r, suffix), values in parts.items():
        for step in range(stack.steps):
            i = step * stack.group + r
            if step in values:
                continue
            if stack.rates[i] == 0 and _RNG_LEAF.search(suffix):
                values[step] = _placeholder(suffix, likes[stack, suffix])
            else:
                missing.append(f"{stack.blocks}.{stack.start + i}.{suffix}")
        if len(values) == stack.steps:
            ordered = [values[step] for step in range(stack.steps)]
            stack_fn = np.stack if all(isinstance(v, np.ndarray) for v in ordered) else jnp.stack
            out[_stacked_name(stack, r, suffix)] = stack_fn(ordered)
    if missing:
        raise ValueError(
            f"stack_blocks: {len(missing)} block variables of the stacked layout are missing "
            f"(e.g. {missing[:4]}): the state is of another architecture (depths?)."
        )
    return out


def convert_tree(tree: Any, source: Sequence[Stack], target: Sequence[Stack], like: Any) -> Any:
    """``tree`` (e.g. a model's ``params`` state) from the layout of the ``source`` stacks to
    that of the ``target`` stacks, with the structure of ``like`` (the target layout's
    tree: arrays or shape structs). Exact: values are only split and stacked.

    Raises:
      ValueError: the converted names are not ``like``'s (another architecture).
    """
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    flat = {sharding.path_name(path, sep="."): leaf for path, leaf in leaves}
    converted = stack_blocks(unstack_blocks(flat, source), target)
    like_leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    names = [sharding.path_name(path, sep=".") for path, _ in like_leaves]
    if set(names) != set(converted):
        odd = sorted(set(names) ^ set(converted))
        raise ValueError(
            f"convert_tree: {len(odd)} names differ between the converted state and the target "
            f"(e.g. {odd[:4]}): the two layouts are of different architectures."
        )
    return jax.tree_util.tree_unflatten(treedef, [converted[n] for n in names])
