"""Parameter counts of every encoder and segmentor against references.

References: transformers models built on PyTorch's meta device (no memory, no init) for the
encoders, the original/HF SegFormer head and UperNet + auxiliary FCN head; the mmseg 1.x
SegFormer head and mmseg's FCN-R101-D8 by closed formulas written here from mmseg's layer
lists, the latter also by the torch.nn reference in ``torch_refs``. Our models are built for
real (float32 parameters, counted with ``nnx.state(model, nnx.Param)``), or abstractly with
``nnx.eval_shape`` for Swin and ResNet.
"""

import gc

import jax
import pytest
import torch
import transformers as T
from flax import nnx
from torch_refs import MMSegFCN

from cbp_jax import models
from cbp_jax.models.heads import SegFormerHead

pytestmark = [pytest.mark.parity, pytest.mark.slow]

MIT = {
    "b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256),
    "b1": ([64, 128, 320, 512], [2, 2, 2, 2], 256),
    "b2": ([64, 128, 320, 512], [3, 4, 6, 3], 768),
    "b3": ([64, 128, 320, 512], [3, 4, 18, 3], 768),
    "b4": ([64, 128, 320, 512], [3, 8, 27, 3], 768),
    "b5": ([64, 128, 320, 512], [3, 6, 40, 3], 768),
}
CONVNEXT = {
    "tiny": ([96, 192, 384, 768], [3, 3, 9, 3]),
    "small": ([96, 192, 384, 768], [3, 3, 27, 3]),
    "base": ([128, 256, 512, 1024], [3, 3, 27, 3]),
    "large": ([192, 384, 768, 1536], [3, 3, 27, 3]),
}
N = 150
OUT = ["stage1", "stage2", "stage3", "stage4"]


def _torch_count(cls, config):
    with torch.device("meta"):
        model = cls(config)
    return sum(p.numel() for p in model.parameters())


def _count(module):
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _mmseg_segformer_head(dims, width=256, num_classes=N):
    """mmseg SegformerHead: 4 x (1x1 conv no bias + BN), fuse (1x1 conv no bias + BN), conv_seg."""
    per_stage = sum(c * width + 2 * width for c in dims)
    fuse = len(dims) * width * width + 2 * width
    return per_stage + fuse + width * num_classes + num_classes


@pytest.mark.parametrize("variant", list(MIT))
def test_segformer_counts(variant):
    dims, depths, width = MIT[variant]
    cfg = T.SegformerConfig(
        hidden_sizes=dims, depths=depths, decoder_hidden_size=width, num_labels=N
    )
    ref_encoder = _torch_count(T.SegformerModel, cfg)
    ref_hf = _torch_count(T.SegformerForSemanticSegmentation, cfg)
    model = models.create(
        f"segformer_{variant}", num_classes=N, head="mlp", classifier="linear", rngs=nnx.Rngs(0)
    )
    assert _count(model.encoder) == ref_encoder
    assert _count(model) == ref_hf
    # The paper's mmseg head (width 256) with a learned classifier; CBP adds no parameter.
    head = SegFormerHead(dims, 256, rngs=nnx.Rngs(0))
    assert _count(head) + 256 * N + N == _mmseg_segformer_head(dims)
    del model
    gc.collect()


@pytest.mark.parametrize("variant", list(CONVNEXT))
def test_upernet_convnext_counts(variant):
    dims, depths = CONVNEXT[variant]
    backbone = T.ConvNextConfig(hidden_sizes=dims, depths=depths, out_features=OUT)
    ref_encoder = _torch_count(T.ConvNextBackbone, backbone)
    ref_upernet = _torch_count(
        T.UperNetForSemanticSegmentation, T.UperNetConfig(backbone_config=backbone, num_labels=N)
    )
    model = models.create(
        f"upernet_convnext_{variant}", num_classes=N, classifier="linear", rngs=nnx.Rngs(0)
    )
    assert _count(model.encoder) == ref_encoder
    assert _count(model) == ref_upernet
    del model
    gc.collect()


SWIN = {  # mmseg's ADE20K UperNet configs (B and L: window 12, the 384 ImageNet-22k weights)
    "tiny": (96, [2, 2, 6, 2], [3, 6, 12, 24], 7),
    "small": (96, [2, 2, 18, 2], [3, 6, 12, 24], 7),
    "base": (128, [2, 2, 18, 2], [4, 8, 16, 32], 12),
    "large": (192, [2, 2, 18, 2], [6, 12, 24, 48], 12),
}


@pytest.mark.parametrize("variant", list(SWIN))
def test_upernet_swin_counts(variant):
    dim, depths, heads, window = SWIN[variant]
    backbone = T.SwinConfig(
        embed_dim=dim, depths=depths, num_heads=heads, window_size=window, out_features=OUT
    )
    # transformers' SwinBackbone also holds SwinModel's final LayerNorm, which it never uses
    # and mmseg's backbone does not have.
    unused_final_norm = 2 * dim * 8
    ref_encoder = _torch_count(T.SwinBackbone, backbone) - unused_final_norm
    ref_upernet = (
        _torch_count(
            T.UperNetForSemanticSegmentation,
            T.UperNetConfig(backbone_config=backbone, num_labels=N),
        )
        - unused_final_norm
    )
    model = nnx.eval_shape(
        lambda: models.create(
            f"upernet_swin_{variant}", num_classes=N, classifier="linear", rngs=nnx.Rngs(0)
        )
    )
    assert model.encoder.config.window_size == window
    assert _count(model.encoder) == ref_encoder
    assert _count(model) == ref_upernet
    if variant == "base":
        assert round(_count(model) / 1e6) == 121  # the Swin paper's UperNet Swin-B


def _mmseg_fcn_resnet_d8(depths, num_classes=N):
    """mmseg FCN-D8 (ResNetV1c + FCNHead(2048 -> 512, 2 convs, concat) + aux FCNHead(1024 ->
    256)): every conv without bias except conv_seg; BN counts its weight and bias."""

    def conv_bn(din, dout, k):
        return din * dout * k * k + 2 * dout

    n = conv_bn(3, 32, 3) + conv_bn(32, 32, 3) + conv_bn(32, 64, 3)
    din = 64
    for i, depth in enumerate(depths):
        p = 64 * 2**i
        for j in range(depth):
            d = din if j == 0 else 4 * p
            n += conv_bn(d, p, 1) + conv_bn(p, p, 3) + conv_bn(p, 4 * p, 1)
            n += conv_bn(d, 4 * p, 1) if j == 0 else 0  # the projection shortcut
        din = 4 * p
    head = conv_bn(2048, 512, 3) + conv_bn(512, 512, 3) + conv_bn(2048 + 512, 512, 3)
    aux = conv_bn(1024, 256, 3)
    return n + head + aux + (512 + 256) * num_classes + 2 * num_classes


@pytest.mark.parametrize(
    ("variant", "depths", "millions"),
    [("resnet101", (3, 4, 23, 3), 68.59), ("resnet50", (3, 4, 6, 3), 49.60)],
)
def test_fcn_resnet_d8_counts(variant, depths, millions):
    expected = _mmseg_fcn_resnet_d8(depths)
    assert round(expected / 1e6, 2) == millions
    with torch.device("meta"):
        ref = MMSegFCN(depths, 64, 64, width=512, aux_width=256, num_classes=N)
    assert sum(p.numel() for p in ref.parameters()) == expected
    model = nnx.eval_shape(
        lambda: models.create(
            f"fcn_{variant}_d8", num_classes=N, classifier="linear", rngs=nnx.Rngs(0)
        )
    )
    assert _count(model) == expected
