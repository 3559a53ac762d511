"""``--to hf``: a transformers folder that serves the model in PyTorch.

``export_hf_segformer``: the encoder and decode head map back through the inverse of
``weights.HF_SEGFORMER_HEAD`` / ``HF_MIT_V4``; a CBP classifier becomes the 1x1 conv
``decode_head.classifier`` with the prototypes (N, D) as its weight and bias 0 (logits
``features @ W^T`` are exactly that conv), a learned classifier its own weight and bias.
transformers' SegFormer uses LayerNorm eps 1e-5 everywhere; a model trained with another
eps (mmseg's 1e-6) is exported as it is and the export reports the logit difference it
measured.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from cbp_jax import storage, weights
from cbp_jax.export.common import MissingDependencyError, Request
from cbp_jax.predict import Segmenter

HF_LAYER_NORM_EPS = 1e-5  # transformers' SegFormer ignores config.layer_norm_eps


def check_hf_exportable(config) -> None:
    """Raises ValueError unless ``config`` builds a SegFormer transformers can hold."""
    m = config.model
    problems = []
    if not m.name.startswith("segformer_"):
        problems.append(f"config.model.name={m.name!r} is not a SegFormer")
    if m.get("head") != "mlp":
        problems.append(
            f"config.model.head={m.get('head')!r}: transformers' SegFormer has the HF/NVlabs "
            "all-MLP head, head='mlp' here (train with --config.model.head=mlp)"
        )
    if m.get("classifier", "cbp") == "cbp" and m.get("cbp_normalize_features"):
        problems.append(
            "config.model.cbp_normalize_features=True: a cosine classifier is not a 1x1 conv"
        )
    if problems:
        raise ValueError("Cannot export to transformers: " + "; ".join(problems) + ".")


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


def hf_config(segmenter: Segmenter):
    """The ``transformers.SegformerConfig`` of the segmenter's model."""
    model = segmenter.model()
    return segformer_config(
        model.encoder.config,
        model.head.width,
        segmenter.num_classes,
        class_names=segmenter.class_names,
    )


def hf_state_dict(segmenter: Segmenter) -> dict[str, np.ndarray]:
    """``SegformerForSemanticSegmentation`` tensors (v4 names, PyTorch layouts) of the model;
    CBP prototypes (N, D) become ``decode_head.classifier`` (N, D, 1, 1) with bias 0."""
    check_hf_exportable(segmenter.config)
    model = segmenter.model()
    cbp = segmenter.config.model.get("classifier", "cbp") == "cbp"
    model.aux_head = model.aux_classifier = None  # training-only; HF has none
    if cbp:
        prototypes = np.asarray(model.classifier.class_weights(), np.float32)
        model.classifier = None
    sd = weights.export_state_dict(model, weights.HF_SEGFORMER_EXPORT)
    if cbp:
        sd["decode_head.classifier.weight"] = prototypes[:, :, None, None]
        sd["decode_head.classifier.bias"] = np.zeros(len(prototypes), np.float32)
    sd["decode_head.batch_norm.num_batches_tracked"] = np.zeros((), np.int64)  # unused in eval
    return sd


def export_hf_segformer(
    segmenter: Segmenter, out_dir: str, *, check_size_hw: tuple[int, int] = (128, 128)
) -> dict[str, Any]:
    """Writes a ``SegformerForSemanticSegmentation`` folder (``save_pretrained``) and checks
    it: PyTorch's logits against ours on a fixed random image of ``check_size_hw``.

    Returns:
      ``{"path", "max_abs_logit_diff", "notes"}`` (notes: e.g. a LayerNorm eps that
      transformers cannot express).

    Raises:
      ValueError: the model is not a SegFormer with ``head="mlp"`` or has a cosine classifier.
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

    with storage.staged(out_dir) as local:  # transformers writes local folders only
        os.makedirs(local, exist_ok=True)
        hf_config(segmenter).save_pretrained(local)
        save_file(hf_state_dict(segmenter), os.path.join(local, "model.safetensors"),
                  metadata={"format": "pt"})  # fmt: skip
        hf, info = transformers.SegformerForSemanticSegmentation.from_pretrained(
            local, output_loading_info=True
        )
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

    image = np.random.default_rng(0).normal(size=(1, *check_size_hw, 3)).astype(np.float32)
    ours = np.asarray(segmenter.network(image))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(image.transpose(0, 3, 1, 2).copy())).logits
    diff = float(np.abs(ours - theirs.numpy().transpose(0, 2, 3, 1)).max())
    notes = []
    enc = segmenter.model().encoder.config
    eps = {enc.norm_eps, enc.norm_eps if enc.patch_norm_eps is None else enc.patch_norm_eps}
    if eps != {HF_LAYER_NORM_EPS}:
        notes.append(
            f"the model's LayerNorm eps {sorted(eps)} differs from transformers' fixed "
            f"{HF_LAYER_NORM_EPS}: logits differ by up to {diff:.2g} on the check image"
        )
    return {"path": out_dir, "max_abs_logit_diff": diff, "notes": notes}


OUT_KIND = "folder"  # what --out names


def check(config) -> None:
    """Raises ValueError unless transformers can hold the model."""
    check_hf_exportable(config)


def run(segmenter: Segmenter, request: Request) -> list[str]:
    """``export.py --to hf``: writes the folder and reports PyTorch's logit difference."""
    result = export_hf_segformer(segmenter, request.out)
    lines = [
        f"{request.out}: SegformerForSemanticSegmentation; PyTorch's logits differ from ours "
        f"by at most {result['max_abs_logit_diff']:.2g} on a check image"
    ]
    return lines + [f"note: {note}" for note in result["notes"]]
