"""Parameter counts of every encoder and segmentor against references.

References: transformers models built on PyTorch's meta device (no memory, no init) for the
encoders, the original/HF SegFormer head and UperNet + auxiliary FCN head; the mmseg 1.x
SegFormer head by a closed formula written here from mmseg's layer list. Our models are
built for real (float32 parameters, counted with ``nnx.state(model, nnx.Param)``).
"""

import gc

import jax
import pytest
import torch
import transformers as T
from flax import nnx

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
