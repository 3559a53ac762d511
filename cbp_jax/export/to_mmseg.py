"""``--to mmseg``: an mmsegmentation 1.x checkpoint of any paper model.

``export_mmseg`` writes ``{"state_dict": ..., "meta": ...}`` with ``torch.save``: the model's
variables through the inverse of the mmseg import tables (``weights.MMSEG_EXPORT``: mmseg
MiT + SegformerHead, mmpretrain ConvNeXt + UPerHead, mmseg Swin + UPerHead, ResNetV1c +
FCNHead, each with its auxiliary FCNHead), plus what mmseg's own checkpoints hold besides:
BatchNorm ``num_batches_tracked`` and Swin's ``relative_position_index`` buffers. A CBP
classifier becomes ``decode_head.conv_seg`` with the prototypes (N, D, 1, 1) as its weight
and bias 0 (logits ``features @ W^T`` are exactly that conv); a learned one is its own weight
and bias. ``meta["dataset_meta"]`` has the class names and palette (mmseg's ``init_model``
reads them). The file is read back through cbp_jax's mmseg import tables and must give every
variable its value. :func:`mmseg_config` is the mmseg ``model`` config of the network the file
fits, printed as Python text by ``export.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx

from cbp_jax import storage, weights
from cbp_jax.data.transforms import MEAN, STD
from cbp_jax.export.common import MissingDependencyError, Request
from cbp_jax.models import ConvNeXtConfig, MiTConfig, ResNetConfig, SwinConfig
from cbp_jax.models.convnext import CONVNEXT_VARIANTS
from cbp_jax.models.mit import MIT_VARIANTS
from cbp_jax.models.resnet import RESNET_VARIANTS
from cbp_jax.models.swin import SWIN_VARIANTS, relative_position_index
from cbp_jax.predict import Segmenter
from cbp_jax.weights.formats import MMSEG_EXPORT, segmentor_family

OUT_KIND = "file"  # what --out names

_CONV_SEG = r"^decode_head\.conv_seg\."
# mmseg ResNet's ``depth`` -> blocks per stage (Bottleneck), its ``arch_settings``.
_RESNET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
_NORM_CFG = {"type": "SyncBN", "requires_grad": True}  # BatchNorm eps 1e-5, as ours


def encoder_config(config) -> MiTConfig | ConvNeXtConfig | SwinConfig | ResNetConfig:
    """The encoder's architecture ``config.model`` asks for (its variant's values with the
    config's overrides), without building the model."""
    name = config.model.name
    family = segmentor_family(name)
    variant = name.split("_", 1)[1]
    cls, variants, encoder = {
        "mit": (MiTConfig, MIT_VARIANTS, f"mit_{variant}"),
        "convnext": (ConvNeXtConfig, CONVNEXT_VARIANTS, variant),
        "swin": (SwinConfig, SWIN_VARIANTS, variant),
        "resnet": (ResNetConfig, RESNET_VARIANTS, f"{variant.removesuffix('_d8')}_v1c"),
    }[family]
    fields = {f.name for f in dataclasses.fields(cls)}
    overrides = {
        k: tuple(v) if isinstance(v, list | tuple) else v
        for k, v in config.model.items()
        if k in fields
    }
    return cls(**{**variants[encoder], **overrides})


def check_mmseg_exportable(config) -> None:
    """Raises ValueError unless mmseg 1.x has the layers of the model ``config`` builds."""
    m = config.model
    problems = []
    cosine = m.get("classifier", "cbp") == "cbp" and m.get("cbp_normalize_features")
    if cosine:
        problems.append(
            "config.model.cbp_normalize_features=True: a cosine classifier is not mmseg's "
            "1x1 conv_seg"
        )
    family = segmentor_family(m.name)
    enc = encoder_config(config)
    fits_hf = family == "mit" and m.get("head") == "mlp" and not cosine
    if family == "mit" and m.get("head") == "mlp":
        problems.append(
            "config.model.head='mlp' is the NVlabs / transformers all-MLP head; mmseg 1.x's "
            "SegformerHead is head='mmseg'"
        )
    if family == "mit" and any(
        d != enc.embed_dims[0] * h for d, h in zip(enc.embed_dims, enc.num_heads, strict=True)
    ):
        problems.append(
            f"embed_dims {enc.embed_dims} are not embed_dims[0] x num_heads {enc.num_heads}, "
            "the only widths mmseg's MixVisionTransformer builds"
        )
    if family == "convnext" and enc.kernel_size != 7:
        problems.append(
            f"config.model.kernel_size={enc.kernel_size}: mmpretrain's ConvNeXt has 7x7 "
            "depthwise convs"
        )
    if problems:
        others = "`--to hf`, `--to onnx` or `--to jax`" if fits_hf else "`--to onnx` or `--to jax`"
        raise ValueError(
            "Cannot export to mmsegmentation: " + "; ".join(problems) + f". Export with {others}."
        )


def _is_cbp(segmenter: Segmenter) -> bool:
    return segmenter.config.model.get("classifier", "cbp") == "cbp"


def mmseg_state_dict(segmenter: Segmenter) -> dict[str, np.ndarray]:
    """The model's tensors in mmseg 1.x's layout (PyTorch shapes, ``backbone.`` /
    ``decode_head.`` / ``auxiliary_head.`` keys); CBP prototypes (N, D) become
    ``decode_head.conv_seg`` (N, D, 1, 1) with bias 0."""
    check_mmseg_exportable(segmenter.config)
    family = segmentor_family(segmenter.config.model.name)
    model = segmenter.model()
    if _is_cbp(segmenter):
        prototypes = np.asarray(model.classifier.class_weights(), np.float32)
        model.classifier = None
    sd = weights.rules.export_state_dict(model, MMSEG_EXPORT[family])
    if _is_cbp(segmenter):
        sd["decode_head.conv_seg.weight"] = prototypes[:, :, None, None]
        sd["decode_head.conv_seg.bias"] = np.zeros(len(prototypes), np.float32)
    if family == "swin":  # buffers of mmseg's WindowMSA, in every mmseg Swin checkpoint
        index = relative_position_index(model.encoder.config.window_size).astype(np.int64)
        table = "relative_position_bias_table"
        sd |= {k.replace(table, "relative_position_index"): index for k in sd if k.endswith(table)}
    return weights.rules.with_batch_norm_counters(sd)


# ----------------------------------------------------------------------------- the mmseg config


def backbone_config(enc, family: str) -> dict[str, Any]:
    """mmseg's ``backbone`` dict for our encoder config ``enc``."""
    outs = (0, 1, 2, 3)
    if family == "mit":
        return dict(
            type="MixVisionTransformer", in_channels=enc.in_channels,
            embed_dims=enc.embed_dims[0], num_stages=len(enc.depths),
            num_layers=list(enc.depths), num_heads=list(enc.num_heads),
            patch_sizes=list(enc.patch_sizes), strides=list(enc.strides),
            sr_ratios=list(enc.sr_ratios), out_indices=outs, mlp_ratio=enc.mlp_ratio,
            qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0,
            drop_path_rate=enc.drop_path_rate, norm_cfg=dict(type="LN", eps=enc.norm_eps),
        )  # fmt: skip
    if family == "convnext":
        return dict(
            type="mmpretrain.ConvNeXt",
            arch=dict(depths=list(enc.depths), channels=list(enc.dims)),
            in_channels=enc.in_channels, out_indices=list(outs),
            drop_path_rate=enc.drop_path_rate, layer_scale_init_value=1.0,
            gap_before_final_norm=False, norm_cfg=dict(type="LN2d", eps=enc.norm_eps),
        )  # fmt: skip
    if family == "swin":
        return dict(
            type="SwinTransformer", in_channels=enc.in_channels, embed_dims=enc.embed_dim,
            patch_size=enc.patch_size, window_size=enc.window_size, mlp_ratio=enc.mlp_ratio,
            depths=list(enc.depths), num_heads=list(enc.num_heads),
            strides=(enc.patch_size, 2, 2, 2), out_indices=outs, qkv_bias=True,
            qk_scale=None, patch_norm=True, drop_rate=0.0, attn_drop_rate=0.0,
            drop_path_rate=enc.drop_path_rate, use_abs_pos_embed=False,
            act_cfg=dict(type="GELU"), norm_cfg=dict(type="LN", eps=enc.norm_eps),
        )  # fmt: skip
    return dict(
        type="ResNetV1c", depth=resnet_depth(enc.depths), in_channels=enc.in_channels,
        stem_channels=enc.stem_channels, base_channels=enc.base_channels,
        num_stages=len(enc.depths), out_indices=outs, strides=tuple(enc.strides),
        dilations=tuple(enc.dilations), contract_dilation=enc.contract_dilation,
        style="pytorch", norm_cfg=_NORM_CFG, norm_eval=False,
    )  # fmt: skip


def resnet_depth(blocks: tuple[int, ...]) -> int:
    """mmseg ResNet's ``depth`` of bottleneck stages with ``blocks`` blocks: 3 convs per
    block plus the stem and the classifier (50, 101, 152 for its own arch settings)."""
    return 3 * sum(blocks) + 2


def _decode_head(model, family: str, num_classes: int, dropout: float) -> dict[str, Any]:
    dims = list(model.encoder.dims)
    common = dict(
        channels=model.head.width, dropout_ratio=dropout, num_classes=num_classes,
        norm_cfg=_NORM_CFG, align_corners=False,
    )  # fmt: skip
    if family == "mit":
        return dict(type="SegformerHead", in_channels=dims, in_index=[0, 1, 2, 3], **common)
    if family == "resnet":
        head = model.head
        return dict(
            type="FCNHead", in_channels=dims[head.in_index], in_index=head.in_index,
            num_convs=len(head.convs), concat_input=head.concat_input, **common,
        )  # fmt: skip
    return dict(
        type="UPerHead", in_channels=dims, in_index=[0, 1, 2, 3],
        pool_scales=model.head.pool_scales, **common,
    )  # fmt: skip


def mmseg_config(segmenter: Segmenter) -> dict[str, Any]:
    """mmseg 1.x's ``model`` config (an ``EncoderDecoder``) of the segmenter's network: the
    backbone's type and architecture, the heads' widths and classes, BatchNorm as SyncBN,
    ``align_corners=False``, normalization and ``test_cfg`` from ``config.eval``."""
    config = segmenter.config
    family = segmentor_family(config.model.name)
    model = segmenter.model()
    dropout = float(config.model.get("dropout", 0.1))
    out = dict(
        type="EncoderDecoder",
        data_preprocessor=dict(
            type="SegDataPreProcessor",
            mean=list(MEAN),
            std=list(STD),
            bgr_to_rgb=True,
            pad_val=0,
            seg_pad_val=255,
            size=tuple(config.data.crop_size),
        ),  # fmt: skip
        backbone=backbone_config(model.encoder.config, family),
        decode_head=_decode_head(model, family, segmenter.num_classes, dropout),
    )
    if model.aux_head is not None:
        aux = model.aux_head
        out["auxiliary_head"] = dict(
            type="FCNHead", in_channels=model.encoder.dims[aux.in_index], in_index=aux.in_index,
            channels=aux.width, num_convs=len(aux.convs), concat_input=aux.concat_input,
            dropout_ratio=dropout, num_classes=segmenter.num_classes, norm_cfg=_NORM_CFG,
            align_corners=False,
            loss_decode=dict(
                type="CrossEntropyLoss", use_sigmoid=False,
                loss_weight=float(config.loss.get("aux_weight", 0.4)),
            ),
        )  # fmt: skip
    out["train_cfg"] = dict()
    if config.eval.mode == "slide":
        out["test_cfg"] = dict(
            mode="slide", crop_size=tuple(config.eval.crop), stride=tuple(config.eval.stride)
        )
    else:
        out["test_cfg"] = dict(mode="whole")
    return out


def _py(value: Any) -> str:
    """``value`` as mmseg config text: dicts as ``dict(k=v)``, tuples, lists, scalars."""
    if isinstance(value, dict):
        return "dict(" + ", ".join(f"{k}={_py(v)}" for k, v in value.items()) + ")"
    if isinstance(value, tuple):
        return "(" + ", ".join(map(_py, value)) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, list):
        return "[" + ", ".join(map(_py, value)) + "]"
    return repr(value.item() if isinstance(value, np.generic) else value)


def config_lines(segmenter: Segmenter) -> list[str]:
    """:func:`mmseg_config` as Python lines to paste into an mmseg config file, with the
    ``custom_imports`` mmpretrain's ConvNeXt needs and the test resize as a comment."""
    cfg = mmseg_config(segmenter)
    data = segmenter.config.data
    lines = []
    if cfg["backbone"]["type"].startswith("mmpretrain."):
        lines.append(
            "custom_imports = dict(imports=['mmpretrain.models'], allow_failed_imports=False)"
        )
    lines.append("model = dict(")
    lines += [f"    {key}={_py(value)}," for key, value in cfg.items()]
    lines.append(")")
    lines.append(
        f"# test pipeline: dict(type='Resize', scale={_py(tuple(data.test_scale))}, "
        f"keep_ratio=True){' + AlignedResize' if data.aligned_resize else ''}"
    )
    return lines


def _notes(segmenter: Segmenter) -> list[str]:
    """What the mmseg config cannot say or a user should know."""
    config = segmenter.config
    enc = segmenter.model().encoder.config
    family = segmentor_family(config.model.name)
    notes = []
    if family == "mit" and enc.patch_norm_eps not in (None, enc.norm_eps):
        notes.append(
            f"mmseg's MixVisionTransformer has one LayerNorm eps (norm_cfg, {enc.norm_eps} "
            f"here); the model's patch-embedding and reduction norms use {enc.patch_norm_eps}, "
            "so mmseg's logits differ slightly"
        )
    depth = resnet_depth(enc.depths) if family == "resnet" else None
    if depth is not None and _RESNET_DEPTHS.get(depth) != tuple(enc.depths):
        notes.append(
            f"mmseg's ResNet has no depth {depth} (blocks {tuple(enc.depths)}); register it "
            f"before building: ResNet.arch_settings[{depth}] = (Bottleneck, "
            f"{tuple(enc.depths)}) (mmseg.models.backbones.resnet)"
        )
    if _is_cbp(segmenter):
        notes.append(
            "decode_head.conv_seg holds the CBP prototypes (bias 0); to keep them frozen "
            "when training it further in mmseg, add paramwise_cfg=dict(custom_keys={'decode_head."
            "conv_seg': dict(lr_mult=0.0, decay_mult=0.0)}) to the optim_wrapper"
        )
    return notes


# ----------------------------------------------------------------------------- the file


def _meta(segmenter: Segmenter, lines: list[str]) -> dict[str, Any]:
    """``meta``: mmseg's ``dataset_meta`` and what cbp_jax knows (plain types only, so
    ``torch.load(weights_only=True)`` reads it)."""
    return {
        "dataset_meta": {
            "classes": list(segmenter.class_names),
            "palette": np.asarray(segmenter.palette).tolist(),
        },
        "cbp_jax": {
            "model": segmenter.config.model.name,
            "classifier": segmenter.config.model.get("classifier", "cbp"),
            "weights": segmenter.loaded_from,
            "mmseg_config": "\n".join(lines),
        },
    }


def _check_file(segmenter: Segmenter, local: str) -> None:
    """Reads ``local`` back through cbp_jax's mmseg import tables into a copy of the model:
    every variable must get a value, and the value it has."""
    model = segmenter.model()
    # segmenter.model() shares its Variables with the segmenter: load into new ones
    state = jax.tree.map(lambda x: x, (segmenter.state["params"], segmenter.state["model_state"]))
    copy = nnx.merge(segmenter.graphdef, *state)
    ignore = []
    if _is_cbp(segmenter):  # conv_seg is written from the prototypes, not through a table
        model.classifier = copy.classifier = None
        ignore = [_CONV_SEG]
    report = weights.load_pretrained(copy, local, ignore=ignore, verbose=False)
    ours = weights.rules.targets(model)
    wrong = [
        name
        for name, var in weights.rules.targets(copy).items()
        if not np.array_equal(var[...], ours[name][...])
    ]
    if report.fresh or wrong:
        raise ValueError(
            f"The mmseg export {local} does not read back to the model (left fresh: "
            f"{report.fresh}, other values: {wrong[:8]}); the mmseg key tables of "
            "cbp_jax.weights and their inverse disagree: please report this."
        )


def export_mmseg(segmenter: Segmenter, path: str) -> dict[str, Any]:
    """Writes the mmseg 1.x checkpoint ``path`` (``torch.save`` of ``{"state_dict", "meta"}``)
    and reads it back through cbp_jax's mmseg import tables.

    Returns:
      ``{"path", "num_tensors", "config_lines", "notes"}``.

    Raises:
      ValueError: mmseg has no such network (see :func:`check_mmseg_exportable`).
      MissingDependencyError: torch is missing.
    """
    check_mmseg_exportable(segmenter.config)
    try:
        import torch
    except ImportError as e:
        raise MissingDependencyError(
            f"Writing an mmseg checkpoint needs torch ({e}): pip install torch (the CPU wheel "
            "is enough)."
        ) from e
    sd = mmseg_state_dict(segmenter)
    lines = config_lines(segmenter)
    tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in sd.items()}
    with storage.staged(path) as local:
        torch.save({"state_dict": tensors, "meta": _meta(segmenter, lines)}, local)
        _check_file(segmenter, local)
    return {"path": path, "num_tensors": len(sd), "config_lines": lines, "notes": _notes(segmenter)}


def check(config) -> None:
    """Raises ValueError unless mmseg can hold the model."""
    check_mmseg_exportable(config)


def run(segmenter: Segmenter, request: Request) -> list[str]:
    """``export.py --to mmseg``: writes the checkpoint and prints the mmseg config to load
    it with."""
    result = export_mmseg(segmenter, request.out)
    lines = [
        f"{request.out}: mmsegmentation 1.x checkpoint ({result['num_tensors']} tensors), read "
        "back through cbp_jax's mmseg tables to the same values; its mmseg model config:"
    ]
    return lines + result["config_lines"] + [f"note: {note}" for note in result["notes"]]
