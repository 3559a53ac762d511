"""``--to hf``: a transformers folder that serves the model in PyTorch.

SegFormer (``head="mlp"``) becomes ``SegformerForSemanticSegmentation`` through the inverse of
``weights.HF_SEGFORMER_HEAD`` / ``HF_MIT_V4``; UperNet-ConvNeXt and UperNet-Swin become
``UperNetForSemanticSegmentation`` (a ``ConvNextConfig`` / ``SwinConfig`` backbone, mmseg's
UperNet and auxiliary FCN head) through the inverse of the "HF transformers ConvNeXt / Swin /
UperNet" formats. A CBP classifier becomes the 1x1 conv ``decode_head.classifier`` with the
prototypes (N, D) as its weight and bias 0 (logits ``features @ W^T`` are exactly that conv),
a learned classifier its own weight and bias; the auxiliary head (UperNet) keeps its own.
The export loads the folder back with ``from_pretrained`` and measures PyTorch's logits
against ours on a check image. Where transformers differs from the model it reports the
difference it measured: SegFormer's LayerNorm eps is fixed at 1e-5 (mmseg trains with 1e-6),
ConvNeXt's at 1e-6. transformers' UperNet upsamples its logits to the input size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from cbp_jax import resize, storage, weights
from cbp_jax.export import to_mmseg
from cbp_jax.export.common import MissingDependencyError, Request
from cbp_jax.predict import Segmenter
from cbp_jax.weights.formats import HF_UPERNET_EXPORT, segmentor_family

HF_LAYER_NORM_EPS = 1e-5  # transformers' SegFormer ignores config.layer_norm_eps
HF_CONVNEXT_EPS = 1e-6  # transformers' ConvNeXt LayerNorms (hidden_states_norms included)
_STAGES = ["stage1", "stage2", "stage3", "stage4"]


def check_hf_exportable(config) -> None:
    """Raises ValueError unless transformers can hold the model ``config`` builds: SegFormer
    with ``head="mlp"``, UperNet-ConvNeXt or UperNet-Swin, without a cosine classifier."""
    m = config.model
    family = segmentor_family(m.name)
    problems = []
    if family == "resnet":
        problems.append(
            f"config.model.name={m.name!r}: transformers has no FCN head nor ResNetV1c "
            "(deep-stem) backbone"
        )
    if family == "mit" and m.get("head") != "mlp":
        problems.append(
            f"config.model.head={m.get('head')!r}: transformers' SegFormer has the HF/NVlabs "
            "all-MLP head, head='mlp' here (train with --config.model.head=mlp)"
        )
    if family == "convnext" and to_mmseg.encoder_config(config).kernel_size != 7:
        problems.append("transformers' ConvNeXt has 7x7 depthwise convs only")
    if m.get("classifier", "cbp") == "cbp" and m.get("cbp_normalize_features"):
        problems.append(
            "config.model.cbp_normalize_features=True: a cosine classifier is not a 1x1 conv"
        )
    if problems:
        try:
            to_mmseg.check_mmseg_exportable(config)
            others = "`--to mmseg`, `--to onnx` or `--to jax`"
        except ValueError:
            others = "`--to onnx` or `--to jax`"
        raise ValueError(
            "Cannot export to transformers: " + "; ".join(problems) + f". Export with {others}."
        )


def segformer_config(
    encoder,
    head_width: int,
    num_classes: int,
    *,
    class_names: Sequence[str] | None = None,
    dropout: float = 0.1,
):
    """``transformers.SegformerConfig`` of our MiT ``encoder`` config (``MiTConfig``) under
    transformers' all-MLP head of ``head_width`` channels."""
    import transformers

    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    return transformers.SegformerConfig(
        num_channels=encoder.in_channels,
        num_encoder_blocks=len(encoder.depths),
        depths=list(encoder.depths),
        sr_ratios=list(encoder.sr_ratios),
        hidden_sizes=list(encoder.embed_dims),
        patch_sizes=list(encoder.patch_sizes),
        strides=list(encoder.strides),
        num_attention_heads=list(encoder.num_heads),
        mlp_ratios=[encoder.mlp_ratio] * len(encoder.depths),
        hidden_act="gelu",
        decoder_hidden_size=head_width,
        drop_path_rate=encoder.drop_path_rate,
        classifier_dropout_prob=dropout,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=HF_LAYER_NORM_EPS,
        semantic_loss_ignore_index=255,
        num_labels=num_classes,
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )


def upernet_config(segmenter: Segmenter):
    """``transformers.UperNetConfig`` of the segmenter's UperNet-ConvNeXt / UperNet-Swin:
    backbone architecture, head width and pooling scales, the auxiliary head, the classes."""
    import transformers

    model = segmenter.model()
    enc = model.encoder.config
    if segmentor_family(segmenter.config.model.name) == "convnext":
        backbone = transformers.ConvNextConfig(
            num_channels=enc.in_channels, patch_size=4, num_stages=len(enc.depths),
            hidden_sizes=list(enc.dims), depths=list(enc.depths), hidden_act="gelu",
            layer_scale_init_value=enc.layer_scale_init, drop_path_rate=enc.drop_path_rate,
            out_features=_STAGES,
        )  # fmt: skip
    else:
        backbone = transformers.SwinConfig(
            patch_size=enc.patch_size, num_channels=enc.in_channels, embed_dim=enc.embed_dim,
            depths=list(enc.depths), num_heads=list(enc.num_heads),
            window_size=enc.window_size, mlp_ratio=float(enc.mlp_ratio), qkv_bias=True,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            drop_path_rate=enc.drop_path_rate, hidden_act="gelu",
            use_absolute_embeddings=False, layer_norm_eps=enc.norm_eps, out_features=_STAGES,
        )  # fmt: skip
    aux = model.aux_head
    names = list(segmenter.class_names)
    return transformers.UperNetConfig(
        backbone_config=backbone,
        hidden_size=model.head.width,
        pool_scales=list(model.head.pool_scales),
        use_auxiliary_head=aux is not None,
        auxiliary_loss_weight=float(segmenter.config.loss.get("aux_weight", 0.4)),
        auxiliary_channels=aux.width if aux is not None else 256,
        auxiliary_num_convs=len(aux.convs) if aux is not None else 1,
        auxiliary_concat_input=bool(aux.concat_input) if aux is not None else False,
        loss_ignore_index=255,
        num_labels=segmenter.num_classes,
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )


def hf_config(segmenter: Segmenter):
    """The transformers config of the segmenter's model (``SegformerConfig`` or
    ``UperNetConfig``)."""
    if segmentor_family(segmenter.config.model.name) != "mit":
        return upernet_config(segmenter)
    model = segmenter.model()
    return segformer_config(
        model.encoder.config,
        model.head.width,
        segmenter.num_classes,
        class_names=segmenter.class_names,
    )


def hf_state_dict(segmenter: Segmenter) -> dict[str, np.ndarray]:
    """``SegformerForSemanticSegmentation`` / ``UperNetForSemanticSegmentation`` tensors (v4
    names, PyTorch layouts) of the model; CBP prototypes (N, D) become
    ``decode_head.classifier`` (N, D, 1, 1) with bias 0."""
    check_hf_exportable(segmenter.config)
    family = segmentor_family(segmenter.config.model.name)
    model = segmenter.model()
    cbp = segmenter.config.model.get("classifier", "cbp") == "cbp"
    if family == "mit":
        model.aux_head = model.aux_classifier = None  # training-only; HF's SegFormer has none
    if cbp:
        prototypes = np.asarray(model.classifier.class_weights(), np.float32)
        model.classifier = None
    table = weights.HF_SEGFORMER_EXPORT if family == "mit" else HF_UPERNET_EXPORT[family]
    sd = weights.export_state_dict(model, table)
    if cbp:
        sd["decode_head.classifier.weight"] = prototypes[:, :, None, None]
        sd["decode_head.classifier.bias"] = np.zeros(len(prototypes), np.float32)
    if family == "swin":  # SwinBackbone keeps the classifier's final LayerNorm; UperNet skips it
        width = model.encoder.dims[-1]
        sd["backbone.swin.layernorm.weight"] = np.ones(width, np.float32)
        sd["backbone.swin.layernorm.bias"] = np.zeros(width, np.float32)
    return weights.rules.with_batch_norm_counters(sd)  # unused in eval


@nnx.jit
def _forward(model, x):
    return model(x, train=False)


def _notes(segmenter: Segmenter, diff: float) -> list[str]:
    """LayerNorm eps that transformers cannot express, with the difference measured."""
    family = segmentor_family(segmenter.config.model.name)
    enc = segmenter.model().encoder.config
    if family == "mit":
        eps = {enc.norm_eps, enc.norm_eps if enc.patch_norm_eps is None else enc.patch_norm_eps}
        fixed = HF_LAYER_NORM_EPS
    elif family == "convnext":
        eps, fixed = {enc.norm_eps}, HF_CONVNEXT_EPS
    else:
        return []
    if eps == {fixed}:
        return []
    return [
        f"the model's LayerNorm eps {sorted(eps)} differs from transformers' fixed {fixed}: "
        f"logits differ by up to {diff:.2g} on the check image"
    ]


def export_hf(
    segmenter: Segmenter, out_dir: str, *, check_size_hw: tuple[int, int] = (128, 128)
) -> dict[str, Any]:
    """Writes a transformers folder (``save_pretrained``) and checks it: PyTorch's logits
    (and auxiliary logits) against ours on a fixed random image of ``check_size_hw``.
    UperNet's logits are compared at the input size, where transformers returns them (ours
    upsampled as ``align_corners=False`` does).

    Returns:
      ``{"path", "architecture", "max_abs_logit_diff", "max_abs_aux_logit_diff" (None
      without an auxiliary head), "notes"}`` (notes: e.g. a LayerNorm eps that transformers
      cannot express).

    Raises:
      ValueError: transformers cannot hold the model (see :func:`check_hf_exportable`).
      MissingDependencyError: torch or transformers is missing (the message says what to install).
    """
    check_hf_exportable(segmenter.config)
    try:
        import torch
        import transformers
    except ImportError as e:
        raise MissingDependencyError(
            f"Exporting to transformers needs torch and transformers ({e}): pip install "
            "torch transformers (the CPU wheel of torch is enough)."
        ) from e
    # transformers 5 keeps other names in memory than on disk; the v4 names written here are
    # what both versions read, so load them as a user would and let save_pretrained rewrite.
    from safetensors.numpy import save_file

    upernet = segmentor_family(segmenter.config.model.name) != "mit"
    cls = (
        transformers.UperNetForSemanticSegmentation
        if upernet
        else transformers.SegformerForSemanticSegmentation
    )
    with storage.staged(out_dir) as local:  # transformers writes local folders only
        os.makedirs(local, exist_ok=True)
        hf_config(segmenter).save_pretrained(local)
        save_file(hf_state_dict(segmenter), os.path.join(local, "model.safetensors"),
                  metadata={"format": "pt"})  # fmt: skip
        hf, info = cls.from_pretrained(local, output_loading_info=True)
        wrong = [*info["missing_keys"], *info["unexpected_keys"], *info.get("mismatched_keys", [])]
        if wrong:
            raise ValueError(
                f"transformers {transformers.__version__} did not load every tensor of the "
                f"export in {out_dir} (missing, unexpected or mismatched: "
                f"{sorted(map(str, wrong))[:8]}); the key tables of cbp_jax.weights need "
                "updating for this version."
            )
        hf.eval()
        hf.save_pretrained(local)

    size = tuple(check_size_hw)
    image = np.random.default_rng(0).normal(size=(1, *size, 3)).astype(np.float32)
    ours = _forward(segmenter.model(), jax.device_put(image, segmenter.device))
    logits = resize.resize_bilinear(ours["logits"], size) if upernet else ours["logits"]
    pixels = torch.from_numpy(image.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        theirs = hf(pixels).logits.numpy().transpose(0, 2, 3, 1)
        aux = None
        if upernet and hf.auxiliary_head is not None:
            aux = hf.auxiliary_head(hf.backbone(pixels).feature_maps).numpy()
    diff = float(np.abs(np.asarray(logits) - theirs).max())
    aux_diff = None
    if aux is not None:
        aux_diff = float(np.abs(np.asarray(ours["aux_logits"]) - aux.transpose(0, 2, 3, 1)).max())
    return {
        "path": out_dir,
        "architecture": cls.__name__,
        "max_abs_logit_diff": diff,
        "max_abs_aux_logit_diff": aux_diff,
        "notes": _notes(segmenter, max(diff, aux_diff or 0.0)),
    }


export_hf_segformer = export_hf  # its name from when SegFormer was the only architecture


OUT_KIND = "folder"  # what --out names


def check(config) -> None:
    """Raises ValueError unless transformers can hold the model."""
    check_hf_exportable(config)


def run(segmenter: Segmenter, request: Request) -> list[str]:
    """``export.py --to hf``: writes the folder and reports PyTorch's logit difference."""
    result = export_hf(segmenter, request.out)
    aux = result["max_abs_aux_logit_diff"]
    lines = [
        f"{request.out}: {result['architecture']}; PyTorch's logits differ from ours by at "
        f"most {result['max_abs_logit_diff']:.2g}"
        + ("" if aux is None else f" (auxiliary head: {aux:.2g})")
        + " on a check image"
    ]
    return lines + [f"note: {note}" for note in result["notes"]]
