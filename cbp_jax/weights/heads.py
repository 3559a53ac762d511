"""Key maps of the decode and auxiliary heads with their classifiers (SegFormer, UperNet, FCN)."""

from cbp_jax.weights.rules import (
    B,
    Rule,
    batch_norm,
    conv,
    conv_bn,
    linear,
    linear_1x1,
    one_based,
    rules,
)

HF_SEGFORMER_HEAD = rules(
    linear(rf"decode_head\.(?:linear_c|linear_projections)\.{B}\.proj", "head.linear_c.{}"),
    conv(r"decode_head\.linear_fuse", "head.linear_fuse"),
    batch_norm(r"decode_head\.batch_norm", "head.bn"),
    linear_1x1(r"decode_head\.classifier", "classifier.linear"),
)
NVLABS_SEGFORMER_HEAD = rules(
    linear(r"decode_head\.linear_c(\d)\.proj", one_based("head.linear_c.{}")),
    conv(r"decode_head\.linear_fuse\.conv", "head.linear_fuse"),
    batch_norm(r"decode_head\.linear_fuse\.bn", "head.bn"),
    linear_1x1(r"decode_head\.linear_pred", "classifier.linear"),
)


def _aux_fcn(bn: str = "bn", cls: str = "conv_seg") -> list:
    """The auxiliary FCN head (mmseg ``FCNHead``, transformers ``UperNetFCNHead``)."""
    cb = dict(bn_name=bn)
    return [
        *conv_bn(rf"auxiliary_head\.convs\.{B}", "aux_head.convs.{}", **cb),
        *conv_bn(r"auxiliary_head\.conv_cat", "aux_head.conv_cat", **cb),
        *linear_1x1(rf"auxiliary_head\.{cls}", "aux_classifier.linear"),
    ]


MMSEG_SEGFORMER_HEAD = rules(
    conv_bn(rf"decode_head\.convs\.{B}", "head.convs.{}"),
    conv_bn(r"decode_head\.fusion_conv", "head.fuse"),
    linear_1x1(r"decode_head\.conv_seg", "classifier.linear"),
    _aux_fcn(),  # only with config.model.aux=True
)


def _uper_rules(bn: str, cls: str) -> list[Rule]:
    cb = dict(bn_name=bn)
    return rules(
        conv_bn(rf"decode_head\.psp_modules\.{B}\.1", "head.psp.{}", **cb),
        conv_bn(r"decode_head\.bottleneck", "head.bottleneck", **cb),
        conv_bn(rf"decode_head\.lateral_convs\.{B}", "head.lateral.{}", **cb),
        conv_bn(rf"decode_head\.fpn_convs\.{B}", "head.fpn.{}", **cb),
        conv_bn(r"decode_head\.fpn_bottleneck", "head.fpn_bottleneck", **cb),
        linear_1x1(rf"decode_head\.{cls}", "classifier.linear"),
        _aux_fcn(bn, cls),
    )


MMSEG_UPERNET_HEADS = _uper_rules("bn", "conv_seg")
HF_UPERNET_HEADS = _uper_rules("batch_norm", "classifier")
# mmseg FCNHead as the decode head (convs, conv_cat) + the auxiliary FCN head.
MMSEG_FCN_HEADS = rules(
    conv_bn(rf"decode_head\.convs\.{B}", "head.convs.{}"),
    conv_bn(r"decode_head\.conv_cat", "head.conv_cat"),
    linear_1x1(r"decode_head\.conv_seg", "classifier.linear"),
    _aux_fcn(),
)
