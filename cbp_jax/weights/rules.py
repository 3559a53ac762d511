"""The key-map language: regex rules from checkpoint keys to our variable names.

A rule is ``(compiled regex over a checkpoint key, [(our name template, transform), ...])``.
A template's ``{}`` take the regex groups in order (or it is a callable of the match, such as
:class:`one_based`); the transform turns the PyTorch array into ours. An empty destination list
drops the key on purpose (``num_batches_tracked``). The helpers below build the rules of one
PyTorch module (``linear``, ``conv``, ``layer_norm``, ...); each family's table lives in its own
module (``mit``, ``convnext``, ``swin``, ``resnet``, ``heads``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np
from flax import nnx

from cbp_jax.models import stacking

Rule = tuple[re.Pattern, list[tuple[str | Callable, Callable]]]

B = r"(\d+)"  # a block or stage index in a source regex

# ----------------------------------------------------------------------------- transforms


def linear_kernel(w):
    """Linear (out, in) -> (in, out)."""
    return w.T


def conv_kernel(w):
    """Conv (O, I, kh, kw) -> (kh, kw, I, O)."""
    return w.transpose(2, 3, 1, 0)


def conv1x1_kernel(w):
    """A 1x1 conv (O, I, 1, 1) -> a Linear kernel (I, O)."""
    return w[:, :, 0, 0].T


def same(w):
    return w


_UNFOLD_TO_OFFICIAL = [0, 2, 1, 3]  # its own inverse


def unfold_linear(w):
    """mmseg's PatchMerging Linear (out, 4C), input in ``nn.Unfold`` order (channel-major,
    then the 2x2 offsets row-major) -> (4C, out) in the official order (offset-major:
    (0, 0), (1, 0), (0, 1), (1, 1))."""
    out, four_c = w.shape
    w = w.reshape(out, four_c // 4, 4).transpose(0, 2, 1)[:, _UNFOLD_TO_OFFICIAL, :]
    return w.reshape(out, four_c).T


def unfold_vector(v):
    """mmseg's PatchMerging LayerNorm (4C,) in ``nn.Unfold`` order -> the official order."""
    return v.reshape(-1, 4).T[_UNFOLD_TO_OFFICIAL].reshape(-1)


def fold_linear(w):
    """The inverse of :func:`unfold_linear`: (4C, out) in the official order -> mmseg's
    (out, 4C) in ``nn.Unfold`` order."""
    four_c, out = w.shape
    w = w.T.reshape(out, 4, four_c // 4)[:, _UNFOLD_TO_OFFICIAL, :]
    return w.transpose(0, 2, 1).reshape(out, four_c)


def fold_vector(v):
    """The inverse of :func:`unfold_vector`: (4C,) official order -> ``nn.Unfold`` order."""
    return v.reshape(4, -1)[_UNFOLD_TO_OFFICIAL].T.reshape(-1)


class split:  # noqa: N801 - reads as a function in the rule tables
    """The ``i``-th of ``n`` equal parts along axis 0, then ``fn`` (a fused checkpoint
    tensor, such as qkv, becoming several of ours)."""

    def __init__(self, n: int, i: int, fn: Callable):
        self.n, self.i, self.fn = n, i, fn

    def __call__(self, w):
        return self.fn(np.split(w, self.n, axis=0)[self.i])


# ----------------------------------------------------------------------------- rule builders


def rules(*groups: Iterable[tuple[str, list]]) -> list[Rule]:
    """Compiles ``(source regex, destinations)`` pairs from groups of them."""
    return [(re.compile(src), dst) for g in groups for src, dst in g]


class one_based:  # noqa: N801 - reads as a function in the rule tables
    """Destination whose first ``{}`` is the first regex group minus 1 (1-based sources)."""

    offset = -1

    def __init__(self, template: str):
        self.template = template

    def __add__(self, suffix: str) -> one_based:
        return type(self)(self.template + suffix)

    def __call__(self, m: re.Match) -> str:
        g = m.groups()
        return self.template.format(int(g[0]) + self.offset, *g[1:])


class _to_one_based(one_based):  # noqa: N801
    """The inverse of :class:`one_based`: the first ``{}`` is our 0-based index plus 1."""

    offset = 1


def _weight_bias(src, dst, kernel: str, kernel_fn: Callable) -> list:
    return [
        (src + r"\.weight", [(dst + "." + kernel, kernel_fn)]),
        (src + r"\.bias", [(dst + ".bias", same)]),
    ]


def linear(src, dst):
    return _weight_bias(src, dst, "kernel", linear_kernel)


def linear_1x1(src, dst):
    """A 1x1 conv in the checkpoint, a Linear here."""
    return _weight_bias(src, dst, "kernel", conv1x1_kernel)


def conv(src, dst):
    return _weight_bias(src, dst, "kernel", conv_kernel)


def layer_norm(src, dst):
    return _weight_bias(src, dst, "scale", same)


def batch_norm(src, dst):
    return layer_norm(src, dst) + [
        (src + r"\.running_mean", [(dst + ".mean", same)]),
        (src + r"\.running_var", [(dst + ".var", same)]),
        (src + r"\.num_batches_tracked", []),
    ]


def conv_bn(src, dst, conv_name="conv", bn_name="bn"):
    """mmcv ConvModule (conv without bias + BN) -> ConvBNReLU."""
    return conv(rf"{src}\.{conv_name}", dst + ".conv") + batch_norm(
        rf"{src}\.{bn_name}", dst + ".bn"
    )


def param(src, dst):
    return [(src, [(dst, same)])]


def fused_qkv(src: str, dst, sep: str = r"\.") -> list:
    """A fused qkv Linear (3C, C) at ``{src}{sep}weight`` -> the q, k and v Linears."""
    return [
        (
            rf"{src}{sep}{p}",
            [(dst + f".{x}.{n}", split(3, i, fn)) for i, x in enumerate("qkv")],
        )
        for p, n, fn in (("weight", "kernel", linear_kernel), ("bias", "bias", same))
    ]


# ----------------------------------------------------------------------------- applying


def _fill(dst, m: re.Match) -> str:
    return dst(m) if callable(dst) else dst.format(*m.groups())


def match(table: list[Rule], key: str) -> list[tuple[str, Callable]] | None:
    """``[(our name, transform)]`` of the first rule whose regex matches all of ``key``;
    None when none does."""
    for pat, dsts in table:
        m = pat.fullmatch(key)
        if m:
            return [(_fill(dst, m), fn) for dst, fn in dsts]
    return None


def targets(module: nnx.Module) -> dict[str, nnx.Variable]:
    """Flat 'a.b.0.c' -> Variable for every Param and BatchStat of the module."""
    out = {}
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Param | nnx.BatchStat):
            out[".".join(str(p) for p in path)] = node
    return out


# ----------------------------------------------------------------------------- inverse maps

# Our layout -> PyTorch's, for each forward transform (an export writes these).
_INVERSE: dict[Callable, Callable] = {
    linear_kernel: lambda w: w.T,  # (in, out) -> (out, in)
    conv_kernel: lambda w: w.transpose(3, 2, 0, 1),  # (kh, kw, I, O) -> (O, I, kh, kw)
    conv1x1_kernel: lambda w: w.T[:, :, None, None],  # (in, out) -> (out, in, 1, 1)
    unfold_linear: fold_linear,
    unfold_vector: fold_vector,
    same: same,
}


class _Piece(NamedTuple):
    """Part ``index`` of ``count`` of a fused checkpoint tensor (concatenated on axis 0)."""

    index: int
    count: int
    array: np.ndarray


def _inverse(fn: Callable) -> Callable:
    """Our array -> the checkpoint's, or a :class:`_Piece` of it for a :class:`split` part."""
    if isinstance(fn, split):
        inner = _inverse(fn.fn)
        return lambda w: _Piece(fn.i, fn.n, inner(w))
    if fn not in _INVERSE:
        raise ValueError(f"the transform {getattr(fn, '__name__', fn)!r} has no inverse here.")
    return _INVERSE[fn]


def _template(pattern: str, prefer: Sequence[str] = ()) -> str:
    """A forward rule's source regex as a format string: each capture group (``(\\d+)``,
    ``(\\d)``, ``([1-9])``) -> ``{}``, ``\\.`` -> ``.``, an alternation ``(?:a|b)`` -> the
    option named in ``prefer``, else its first (the v4 names transformers writes)."""

    def choose(m: re.Match) -> str:
        options = m.group(1).split("|")
        return next((o for o in options if o in prefer), options[0])

    t = re.sub(r"\(\?:([^()]*)\)", choose, pattern)
    t = re.sub(r"\((?!\?)[^()]*\)", "{}", t).replace("\\.", ".")
    if re.search(r"[\\()\[\]|?*+^$]", t):
        raise ValueError(f"the key rule {pattern!r} has no inverse here (only plain groups).")
    return t


def invert_rules(
    table: list[Rule],
    *,
    src_prefix: str = "",
    dst_prefix: str = "",
    prefer: Sequence[str] = (),
) -> list[Rule]:
    """The inverse of a key map: our variable names -> checkpoint keys and layouts.

    Each forward rule ``checkpoint regex -> [(our name template, transform)]`` becomes, per
    destination, ``our name regex -> [(checkpoint key template, inverse transform)]``; rules
    that write nothing (``num_batches_tracked``) are left out. A rule that splits one
    checkpoint tensor into several of ours (:class:`split`: mmseg's ``in_proj_weight``,
    official Swin's ``qkv``) inverts to parts that :func:`export_state_dict` concatenates.

    Args:
      table: a forward table such as ``HF_MIT_V4``.
      src_prefix: prepended to the checkpoint keys (e.g. ``"segformer."``).
      dst_prefix: prepended to our names (e.g. ``"encoder."`` for a segmentor's encoder).
      prefer: names to write where a rule accepts alternatives (``(?:dwconv|depthwise_conv)``:
        ``("depthwise_conv",)`` writes mmpretrain's); default the first alternative.
    """
    out = []
    for pat, dsts in table:
        src = src_prefix + _template(pat.pattern, prefer) if dsts else ""
        for dst, fn in dsts:
            shifted = isinstance(dst, one_based)
            if callable(dst) and not shifted:
                raise ValueError(f"the key rule {pat.pattern!r} has no inverse here.")
            template = dst_prefix + (dst.template if shifted else dst)
            ours = r"(\d+)".join(re.escape(part) for part in template.split("{}"))
            key = _to_one_based(src) if shifted else src
            out.append((re.compile(ours), [(key, _inverse(fn))]))
    return out


def export_state_dict(module: nnx.Module, table: list[Rule]) -> dict[str, np.ndarray]:
    """``{checkpoint key: array}`` of every ``Param`` / ``BatchStat`` of ``module`` by the
    inverse rules ``table`` (parts of a fused tensor concatenated in order); a variable that
    no rule maps, or a fused tensor with a part missing, is an error listing them. A model
    with ``scan_blocks`` is read through its unrolled view (the names the tables know)."""
    out, unmapped, pieces = {}, [], {}
    values = {name: var[...] for name, var in targets(module).items()}
    for name, array in stacking.unstack_blocks(values, stacking.module_plan(module)).items():
        mapped = match(table, name)
        if mapped is None:
            unmapped.append(name)
            continue
        for key, fn in mapped:
            value = fn(np.asarray(array, np.float32))
            if isinstance(value, _Piece):
                pieces.setdefault(key, [None] * value.count)[value.index] = value.array
            else:
                out[key] = np.ascontiguousarray(value)
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} variables have no key in the export layout (another "
            "architecture?): " + ", ".join(unmapped[:12]) + (" ..." if len(unmapped) > 12 else "")
        )
    partial = sorted(key for key, parts in pieces.items() if any(p is None for p in parts))
    if partial:
        raise ValueError(
            f"{len(partial)} fused tensors lack some of their parts (q, k or v?): "
            + ", ".join(partial[:12])
        )
    out |= {key: np.ascontiguousarray(np.concatenate(parts)) for key, parts in pieces.items()}
    return out


def with_batch_norm_counters(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``sd`` plus ``num_batches_tracked`` (int64 0) beside every ``running_mean``: PyTorch's
    BatchNorm state has the counter, nothing here counts batches, and eval never reads it."""
    counters = {
        key.removesuffix("running_mean") + "num_batches_tracked": np.zeros((), np.int64)
        for key in sd
        if key.endswith(".running_mean")
    }
    return sd | counters
