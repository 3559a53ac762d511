"""Pretrained checkpoint conversion: PyTorch state dicts -> cbp_jax encoders and segmentors.

``load_pretrained(module, path)`` reads a checkpoint (``.safetensors``, ``.bin``, ``.pth``,
``.pt``, an HF ``save_pretrained`` folder, or a Hugging Face hub id), detects its format
from the keys, maps every tensor with a regex key map (transposing Linear (out, in) ->
(in, out) and conv (O, I, kh, kw) -> (kh, kw, I, O)), checks every shape, and writes the
values into the module's variables. Formats:

- HF transformers SegFormer: ``SegformerModel``, ``SegformerForImageClassification``,
  ``SegformerForSemanticSegmentation`` (v4 names, which transformers 5 still writes, and the
  5.x in-memory names), with or without the ``segformer.`` prefix;
- NVlabs ``mit_b*.pth`` (ImageNet) and NVlabs/mmseg-0.x SegFormer checkpoints;
- mmseg 1.x MiT (``layers.{s}.{0,1,2}``) and its SegformerHead;
- HF ConvNeXt: ``ConvNextModel``, ``ConvNextBackbone``, ``ConvNextForImageClassification``,
  and ``UperNetForSemanticSegmentation`` (ConvNeXt backbone, UperNet + auxiliary heads);
- timm and Facebook ConvNeXt (incl. Facebook's segmentation backbone with ``norm{i}``), and
  mmpretrain's (mmseg UperNet-ConvNeXt checkpoints), with mmseg UPerHead / FCNHead;
- HF Swin: ``SwinModel``, ``SwinBackbone``, ``SwinForImageClassification`` and
  ``UperNetForSemanticSegmentation`` (Swin backbone), v4 names (what transformers 5 writes);
- official Swin (microsoft/Swin-Transformer ImageNet ``.pth``, and the Swin-Transformer-
  Semantic-Segmentation UperNet checkpoints) and mmseg 1.x Swin (``stages.{i}``, ``w_msa``,
  patch merging in ``nn.Unfold`` order, re-ordered here), with mmseg UPerHead / FCNHead;
  ``relative_position_index`` / ``attn_mask`` buffers are constants here and are dropped (a
  window size that differs from the checkpoint's fails on the bias tables' shapes);
- mmcv / mmseg ``ResNetV1c`` (``open-mmlab://resnet101_v1c`` and mmseg FCN checkpoints, with
  the FCN head and auxiliary head). torchvision's ResNet (one 7x7 stem conv) is recognized and
  refused with the reason: its stem cannot become V1c's three 3x3 convs.

Never a silent partial load: a checkpoint tensor that maps to nothing, or a module variable
that gets no value, raises an error listing them. The only variables allowed to stay freshly
initialized are whole parts that the checkpoint legitimately lacks: the decode head, the
classifier, the auxiliary head and classifier, and the ConvNeXt / Swin 4 output norms
(absent from ImageNet checkpoints). A one-screen summary says what was loaded and what is fresh.

The package: ``rules`` (the key-map language and the export inverse), one key-map module per
family (``mit``, ``convnext``, ``swin``, ``resnet``, ``heads``), ``formats`` (layouts and their
detection), ``io`` (reading files and hub ids) and ``load`` (``load_pretrained``).
"""

from cbp_jax.weights.formats import FORMATS, HF_SEGFORMER_EXPORT, Format, detect
from cbp_jax.weights.heads import HF_SEGFORMER_HEAD
from cbp_jax.weights.io import read_state_dict
from cbp_jax.weights.load import FRESH_OK, LoadReport, load_pretrained
from cbp_jax.weights.mit import HF_MIT_V4
from cbp_jax.weights.rules import export_state_dict, invert_rules

__all__ = [
    "FORMATS",
    "FRESH_OK",
    "HF_MIT_V4",
    "HF_SEGFORMER_EXPORT",
    "HF_SEGFORMER_HEAD",
    "Format",
    "LoadReport",
    "detect",
    "export_state_dict",
    "invert_rules",
    "load_pretrained",
    "read_state_dict",
]
