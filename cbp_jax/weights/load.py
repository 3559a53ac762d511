"""``load_pretrained``: a PyTorch checkpoint into an encoder or a segmentor, all or nothing."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbp_jax.models import stacking
from cbp_jax.models.convnext import ConvNeXt
from cbp_jax.models.mit import MixTransformer
from cbp_jax.models.resnet import ResNetV1c
from cbp_jax.models.segmentor import Segmentor
from cbp_jax.models.swin import SwinTransformer
from cbp_jax.weights.formats import Format, detect
from cbp_jax.weights.io import read_state_dict
from cbp_jax.weights.rules import match, targets

# Parts of a segmentor that may stay freshly initialized when the checkpoint has none of them.
FRESH_OK = ("head", "classifier", "aux_head", "aux_classifier", "encoder.out_norms")


def _family(encoder: nnx.Module) -> str:
    for cls, family in (
        (MixTransformer, "mit"),
        (ConvNeXt, "convnext"),
        (SwinTransformer, "swin"),
        (ResNetV1c, "resnet"),
    ):
        if isinstance(encoder, cls):
            return family
    raise TypeError(
        "load_pretrained takes a MixTransformer, ConvNeXt, SwinTransformer, ResNetV1c or "
        f"Segmentor, not {type(encoder).__name__}."
    )


@dataclasses.dataclass
class LoadReport:
    """What ``load_pretrained`` did."""

    path: str
    format: str
    loaded: list[str]  # module variables that received a value
    num_values: int  # scalars written
    fresh: dict[str, int]  # part -> number of variables left as initialized
    dropped: list[str]  # checkpoint keys intentionally not used
    skipped_parts: dict[str, int]  # checkpoint part -> tensors skipped (module lacks it)

    def summary(self) -> str:
        lines = [f"load_pretrained: {self.path}", f"  format: {self.format}"]
        lines.append(
            f"  loaded: {len(self.loaded)} variables, {self.num_values / 1e6:.2f} M values"
        )
        if self.fresh:
            parts = ", ".join(f"{k} ({n})" for k, n in self.fresh.items())
            lines.append(f"  freshly initialized (not in the checkpoint): {parts}")
        else:
            lines.append("  freshly initialized: nothing")
        if self.skipped_parts:
            parts = ", ".join(f"{k} ({n} tensors)" for k, n in self.skipped_parts.items())
            lines.append(f"  checkpoint parts the module does not have, skipped: {parts}")
        if self.dropped:
            shown = ", ".join(self.dropped[:6]) + (" ..." if len(self.dropped) > 6 else "")
            lines.append(f"  checkpoint keys not used by design ({len(self.dropped)}): {shown}")
        return "\n".join(lines)


def _part(target: str, is_segmentor: bool) -> str:
    if not is_segmentor:
        return "encoder.out_norms" if target.startswith("out_norms.") else "encoder"
    if target.startswith("encoder.out_norms."):
        return "encoder.out_norms"
    return target.split(".", 1)[0]


def _listed(items: Sequence[str], limit: int, sep: str = ", ") -> str:
    return sep.join(items[:limit]) + (" ..." if len(items) > limit else "")


@dataclasses.dataclass
class _Mapping:
    """A state dict sorted by where each tensor goes."""

    values: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # our name -> value
    dropped: list[str] = dataclasses.field(default_factory=list)  # keys not used by design
    unexpected: list[str] = dataclasses.field(default_factory=list)  # keys that match no rule
    mismatched: list[str] = dataclasses.field(default_factory=list)  # shape mismatches
    no_target: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # part -> keys


def _map_state_dict(
    sd: dict[str, np.ndarray],
    fmt: Format,
    prefix: str,
    variables: dict[str, Any],
    *,
    is_segmentor: bool,
    ignore: Sequence[str],
) -> _Mapping:
    """Maps every checkpoint tensor through ``fmt``'s encoder rules (keys under ``prefix``),
    then its head rules; transforms and shape-checks each value against ``variables``
    (unrolled names -> Variables or arrays)."""
    enc_prefix = "encoder." if is_segmentor else ""
    ignore_pats = [re.compile(p) for p in ignore]
    out = _Mapping()
    for key, arr in sd.items():
        if any(p.search(key) for p in ignore_pats):
            out.dropped.append(key)
            continue
        head_key = key.removeprefix("segformer.")
        enc_key = key[len(prefix) :] if key.startswith(prefix) else None
        mapped = match(fmt.encoder_rules, enc_key) if enc_key is not None else None
        dst_prefix, is_head = enc_prefix, False
        if mapped is None:
            mapped = match(fmt.head_rules, head_key)
            dst_prefix, is_head = "", True
        if mapped is None:
            if any(re.search(p, enc_key if enc_key is not None else key) for p in fmt.ignorable):
                out.dropped.append(key)
            else:
                out.unexpected.append(key)
            continue
        if not mapped:  # e.g. num_batches_tracked
            out.dropped.append(key)
            continue
        for dst, fn in mapped:
            dst = dst_prefix + dst
            if is_head and not is_segmentor:
                out.no_target.setdefault(dst.split(".", 1)[0], []).append(key)
                continue
            if dst not in variables:
                out.no_target.setdefault("?", []).append(f"{key} -> {dst}")
                continue
            val = fn(arr)
            want = tuple(variables[dst][...].shape)
            if tuple(val.shape) != want:
                out.mismatched.append(
                    f"{key} {tuple(arr.shape)} -> {dst} {tuple(val.shape)} != {want}"
                )
                continue
            out.values[dst] = val
    return out


def _fresh_parts(
    mapping: _Mapping, variables: dict[str, Any], is_segmentor: bool
) -> tuple[dict[str, int], list[str]]:
    """(allowed fresh part -> variable count, variables that wrongly get no value)."""
    loaded_parts = {_part(t, is_segmentor) for t in mapping.values}
    fresh: dict[str, int] = {}
    bad_missing = []
    for t in variables:
        if t in mapping.values:
            continue
        part = _part(t, is_segmentor)
        if part in FRESH_OK and part not in loaded_parts:
            fresh[part] = fresh.get(part, 0) + 1
        else:
            bad_missing.append(t)
    return fresh, bad_missing


def _problems(mapping: _Mapping, fmt: Format, bad_missing: list[str]) -> list[str]:
    problems = []
    if mapping.unexpected:
        problems.append(
            f"{len(mapping.unexpected)} checkpoint keys match no rule of {fmt.name}: "
            + _listed(sorted(mapping.unexpected), 20)
        )
    if "?" in mapping.no_target:
        items = mapping.no_target["?"]
        problems.append(
            f"{len(items)} checkpoint tensors map to variables this module does not have "
            "(another architecture/width, or a CBP classifier where the checkpoint has a "
            "learned one; pass ignore=[...] to drop them on purpose): " + _listed(items, 12)
        )
    if mapping.mismatched:
        problems.append(
            f"{len(mapping.mismatched)} shape mismatches (checkpoint of another variant?): "
            + _listed(mapping.mismatched, 12, "; ")
        )
    if bad_missing:
        problems.append(
            f"{len(bad_missing)} module variables get no value from the checkpoint: "
            + _listed(bad_missing, 20)
        )
    return problems


def load_pretrained(
    module: nnx.Module,
    path: str | os.PathLike,
    *,
    ignore: Sequence[str] = (),
    verbose: bool = True,
    trust_pickle: bool = False,
) -> LoadReport:
    """Loads a PyTorch checkpoint into an encoder or a segmentor, in place.

    A model with ``scan_blocks`` is filled through its unrolled view
    (``models.stacking.unstack_blocks``): every format maps to the unrolled names, and the
    values are stacked back into the model's variables.

    Args:
      module: a ``MixTransformer`` / ``ConvNeXt`` / ``SwinTransformer`` / ``ResNetV1c``
        encoder or a ``Segmentor``.
      path: a checkpoint file, an HF ``save_pretrained`` folder, or a hub id.
      ignore: regexes (``re.search``) of checkpoint keys to drop on purpose (e.g.
        ``[r"^decode_head\\.classifier"]`` to keep a fresh CBP classifier of another width).
      verbose: print the one-screen summary.
      trust_pickle: allow PyTorch pickles with non-tensor objects (``weights_only=False``);
        only for files you trust.

    Returns:
      A :class:`LoadReport`.

    Raises:
      ValueError: unknown layout, a family mismatch, a shape mismatch, checkpoint tensors
        that map to nothing, or module variables left without a value outside the parts
        allowed to be fresh (decode head, classifier, auxiliary head, ConvNeXt / Swin output
        norms); a torchvision ResNet for a ResNetV1c (the stems differ).
    """
    is_segmentor = isinstance(module, Segmentor)
    family = _family(module.encoder if is_segmentor else module)
    sd, resolved = read_state_dict(path, trust_pickle=trust_pickle)
    fmt, prefix = detect(list(sd), family)
    variables = targets(module)
    stacks = stacking.module_plan(module)
    # Unrolled names -> Variables, or (a scanned model) -> the current values.
    unrolled = (
        stacking.unstack_blocks({k: v[...] for k, v in variables.items()}, stacks)
        if stacks
        else variables
    )
    mapping = _map_state_dict(sd, fmt, prefix, unrolled, is_segmentor=is_segmentor, ignore=ignore)
    fresh, bad_missing = _fresh_parts(mapping, unrolled, is_segmentor)
    problems = _problems(mapping, fmt, bad_missing)
    if problems:
        raise ValueError(
            f"load_pretrained({resolved!r}) as {fmt.name} (prefix {prefix!r}) failed; nothing "
            "was written.\n- " + "\n- ".join(problems)
        )
    if stacks:
        merged = stacking.stack_blocks(unrolled | mapping.values, stacks)
        for name, var in variables.items():
            var[...] = jnp.asarray(merged[name], dtype=var[...].dtype)
    else:
        for dst, val in mapping.values.items():
            var = variables[dst]
            var[...] = jnp.asarray(val, dtype=var[...].dtype)
    report = LoadReport(
        path=resolved,
        format=fmt.name + (f", prefix {prefix!r}" if prefix else ""),
        loaded=sorted(mapping.values),
        num_values=int(sum(v.size for v in mapping.values.values())),
        fresh=fresh,
        dropped=sorted(mapping.dropped),
        skipped_parts={k: len(v) for k, v in mapping.no_target.items() if k != "?"},
    )
    if verbose:
        print(report.summary())
    return report
