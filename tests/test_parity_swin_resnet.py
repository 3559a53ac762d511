"""Parity of Swin (UperNet) and ResNetV1c (FCN) and their checkpoint conversion with PyTorch.

Swin: transformers' ``SwinBackbone`` / ``UperNetForSemanticSegmentation`` with random weights,
written by ``save_pretrained`` (or re-keyed below into the official and mmseg layouts), converted
with ``load_pretrained``. ResNetV1c: transformers has no deep-stem ResNet, so the reference is
written here from ``torch.nn`` layers following mmseg's ``ResNetV1c`` / ``FCNHead``, with
mmseg's attribute names, so its ``state_dict()`` is an mmseg FCN checkpoint.
"""

import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx
from safetensors.torch import load_file
from torch_refs import (
    MMSegFCN,
    MMSegResNetV1c,
    assert_close,
    forward_eval,
    images,
    nhwc,
    randomize_,
)

from cbp_jax import models, resize, weights

pytestmark = pytest.mark.parity

# ----------------------------------------------------------------------------- Swin

OUT = ["stage1", "stage2", "stage3", "stage4"]
SWIN = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=3)
OURS_SWIN = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=3)
# Every map stays larger than the window (transformers shrinks the window of smaller maps;
# mmseg and we pad). 192: maps 48, 24, 12, 6, all multiples of 3. 102 x 130: the image is
# padded to 104 x 132, maps 26x33, 13x17, 7x9, 4x5: padded windows and odd-size merging.
SIZES = {"window_multiple": (192, 192), "padded": (102, 130)}


@pytest.fixture(scope="module")
def hf_swin(tmp_path_factory):
    hf = randomize_(T.SwinBackbone(T.SwinConfig(**SWIN, out_features=OUT)), seed=20)
    path = tmp_path_factory.mktemp("swin")
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def swin_encoder():
    return models.create_encoder("swin_tiny", rngs=nnx.Rngs(0), **OURS_SWIN)


def _hf_maps(hf, xt):
    with torch.no_grad():
        return [nhwc(f) for f in hf(xt).feature_maps]


@pytest.mark.slow
@pytest.mark.parametrize("size", list(SIZES))
def test_swin_backbone_stages(hf_swin, swin_encoder, size):
    hf, path = hf_swin
    report = weights.load_pretrained(swin_encoder, path)
    assert report.fresh == {} and report.format.startswith("HF transformers Swin")
    assert report.dropped == ["swin.layernorm.bias", "swin.layernorm.weight"]
    x, xt = images(1, *SIZES[size], seed=21)
    for ours, ref in zip(forward_eval(swin_encoder, x), _hf_maps(hf, xt), strict=True):
        assert_close(ours, ref)


@pytest.mark.slow
@pytest.mark.parametrize("size", list(SIZES))
def test_upernet_swin_logits_and_aux(tmp_path, size):
    backbone = T.SwinConfig(**SWIN, out_features=OUT)
    cfg = T.UperNetConfig(
        backbone_config=backbone, hidden_size=32, auxiliary_channels=16, num_labels=5
    )
    hf = randomize_(T.UperNetForSemanticSegmentation(cfg), seed=22)
    hf.save_pretrained(tmp_path)
    model = models.create(
        "upernet_swin_tiny",
        num_classes=5,
        classifier="linear",
        head_width=32,
        aux_width=16,
        rngs=nnx.Rngs(0),
        **OURS_SWIN,
    )
    report = weights.load_pretrained(model, tmp_path)
    assert report.fresh == {}
    h, w = SIZES[size]
    x, xt = images(2, h, w, seed=23)
    with torch.no_grad():
        ref = hf(xt).logits
        aux_ref = hf.auxiliary_head(hf.backbone(xt).feature_maps)
    out = forward_eval(model, x)
    up = nnx.jit(lambda a: resize.resize_bilinear(a, (h, w)))
    assert_close(up(out["logits"]), nhwc(ref))
    assert_close(out["aux_logits"], nhwc(aux_ref))


def _official_swin_keys(sd):
    """HF v4 SwinBackbone keys -> official Swin keys (qkv = cat(q, k, v), ``norm{i}``)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("swin.layernorm."):  # transformers' unused final norm
            continue
        if k.startswith("hidden_states_norms."):
            stage, p = k.split(".")[1:]
            out[f"norm{int(stage[-1]) - 1}.{p}"] = v
            continue
        k = k.replace("embeddings.patch_embeddings.projection", "patch_embed.proj")
        k = k.replace("embeddings.norm", "patch_embed.norm").replace("encoder.layers", "layers")
        for a, b in [
            ("layernorm_before", "norm1"),
            ("layernorm_after", "norm2"),
            ("attention.output.dense", "attn.proj"),
            ("attention.self.relative_position_bias_table", "attn.relative_position_bias_table"),
            ("intermediate.dense", "mlp.fc1"),
            ("output.dense", "mlp.fc2"),
        ]:
            k = k.replace(a, b)
        if ".attention.self." in k:
            continue
        out[k] = v
    for k in [k for k in sd if "attention.self.query" in k]:
        qkv = torch.cat([sd[k.replace("query", n)] for n in ("query", "key", "value")], dim=0)
        out[k.replace("encoder.layers", "layers").replace("attention.self.query", "attn.qkv")] = qkv
    return out


def _mmseg_swin_keys(official):
    """Official Swin keys -> mmseg 1.x keys, as mmseg's tools/model_converters/swin2mmseg.py
    does (PatchMerging weights re-ordered for ``nn.Unfold``)."""
    out = {}
    for k, v in official.items():
        if k.startswith("layers"):
            if "attn." in k:
                k = k.replace("attn.", "attn.w_msa.")
            elif "mlp.fc1." in k:
                k = k.replace("mlp.fc1.", "ffn.layers.0.0.")
            elif "mlp.fc2." in k:
                k = k.replace("mlp.fc2.", "ffn.layers.1.")
            elif "downsample.reduction" in k:
                o, i = v.shape
                v = v.reshape(o, 4, i // 4)[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(o, i)
            elif "downsample.norm" in k:
                v = v.reshape(4, -1)[[0, 2, 1, 3], :].transpose(0, 1).reshape(-1)
            k = k.replace("layers", "stages", 1)
        elif k.startswith("patch_embed.proj"):
            k = k.replace("proj", "projection")
        out[k] = v
    return out


def _buffers(sd):
    """The buffers real checkpoints carry: ``relative_position_index`` and ``attn_mask``."""
    extra = {}
    for k in [k for k in sd if k.endswith("relative_position_bias_table")]:
        extra[k.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(
            9, 9, dtype=torch.int64
        )
        block = k.split("attn.")[0]
        extra[block + "attn_mask"] = torch.zeros(4, 9, 9)
    return extra


@pytest.mark.parametrize("layout", ["official_seg", "official_imagenet", "mmseg"])
def test_swin_official_and_mmseg_layouts(hf_swin, swin_encoder, tmp_path, layout):
    hf, hf_path = hf_swin
    official = _official_swin_keys(load_file(hf_path / "model.safetensors"))
    if layout == "official_seg":  # Swin-Transformer-Semantic-Segmentation: backbone. + norm{i}
        sd = {"state_dict": {"backbone." + k: v for k, v in official.items()}}
    elif layout == "official_imagenet":  # classification .pth: no output norms, a head
        sd = {k: v for k, v in official.items() if not k.startswith("norm")}
        sd |= _buffers(sd) | {
            "norm.weight": torch.ones(128),
            "norm.bias": torch.zeros(128),
            "head.weight": torch.zeros(1000, 128),
            "head.bias": torch.zeros(1000),
        }
        sd = {"model": sd}
    else:
        mm = _mmseg_swin_keys(official)
        sd = {"state_dict": {"backbone." + k: v for k, v in (mm | _buffers(mm)).items()}}
    torch.save(sd, tmp_path / "swin.pth")
    report = weights.load_pretrained(swin_encoder, tmp_path / "swin.pth")
    if layout == "official_imagenet":
        assert report.fresh == {"encoder.out_norms": 8}
        assert any(k.endswith("attn_mask") for k in report.dropped)
        for i, norm in enumerate(swin_encoder.out_norms):
            ref = hf.hidden_states_norms[f"stage{i + 1}"]
            norm.scale[...] = ref.weight.detach().numpy()
            norm.bias[...] = ref.bias.detach().numpy()
    else:
        assert report.fresh == {}
    assert report.format.startswith("mmseg" if layout == "mmseg" else "official")
    x, xt = images(1, *SIZES["padded"], seed=24)
    for ours, ref in zip(forward_eval(swin_encoder, x), _hf_maps(hf, xt), strict=True):
        assert_close(ours, ref)


def test_swin_window_mismatch_fails_on_the_bias_tables(hf_swin):
    enc = models.create_encoder("swin_tiny", rngs=nnx.Rngs(0), **{**OURS_SWIN, "window_size": 4})
    with pytest.raises(ValueError, match=r"relative_position_bias_table \(25, 1\) != \(49, 1\)"):
        weights.load_pretrained(enc, hf_swin[1])


# ----------------------------------------------------------------------------- ResNetV1c

SMALL_RESNET = dict(depths=(1, 2, 2, 2), stem_channels=16, base_channels=8)


@pytest.fixture(scope="module")
def torch_fcn():
    ref = MMSegFCN(SMALL_RESNET["depths"], 16, 8, width=24, aux_width=12, num_classes=6)
    return randomize_(ref, seed=30)


@pytest.fixture(scope="module")
def fcn_model():
    return models.create(
        "fcn_resnet101_d8",
        num_classes=6,
        classifier="linear",
        head_width=24,
        aux_width=12,
        rngs=nnx.Rngs(0),
        **SMALL_RESNET,
    )


@pytest.mark.slow
def test_fcn_resnet_v1c_matches_mmseg_reference(torch_fcn, fcn_model, tmp_path):
    torch.save({"state_dict": torch_fcn.state_dict(), "meta": {}}, tmp_path / "fcn.pth")
    report = weights.load_pretrained(fcn_model, tmp_path / "fcn.pth")
    assert report.fresh == {} and report.format.startswith("mmcv / mmseg ResNetV1c")
    x, xt = images(2, 65, 97, seed=31)  # odd sizes: PyTorch's padding arithmetic
    with torch.no_grad():
        feats = torch_fcn.backbone(xt)
        logits, aux = torch_fcn.decode_head(feats), torch_fcn.auxiliary_head(feats)
    out = forward_eval(fcn_model, x)
    enc = forward_eval(fcn_model.encoder, x)
    assert [f.shape[1:3] for f in enc] == [(17, 25), (9, 13), (9, 13), (9, 13)]  # 1/4, 1/8 x 3
    for ours, ref in zip(enc, feats, strict=True):
        assert_close(ours, nhwc(ref))
    assert_close(out["logits"], nhwc(logits))
    assert_close(out["aux_logits"], nhwc(aux))


def test_resnet_v1c_train_mode_batch_statistics(torch_fcn, fcn_model, tmp_path):
    """BatchNorm with batch statistics (train mode) as in PyTorch; running stats move alike."""
    torch.save(torch_fcn.state_dict(), tmp_path / "fcn.pth")
    weights.load_pretrained(fcn_model, tmp_path / "fcn.pth")
    enc = nnx.clone(fcn_model.encoder)
    ref = MMSegResNetV1c(SMALL_RESNET["depths"], 16, 8)
    ref.load_state_dict(torch_fcn.backbone.state_dict())
    ref.train()
    x, xt = images(4, 33, 40, seed=32)
    with torch.no_grad():
        feats = ref(xt)
    ours = nnx.jit(lambda m, a: m(a, train=True))(enc, x)
    for a, b in zip(ours, feats, strict=True):
        assert_close(a, nhwc(b), 2e-4)
    np.testing.assert_allclose(
        enc.stem[0].bn.mean[...], ref.stem[1].running_mean.numpy(), rtol=1e-4, atol=1e-5
    )


def test_torchvision_resnet_into_v1c_fails_loudly(fcn_model, tmp_path):
    sd = {
        "conv1.weight": torch.zeros(64, 3, 7, 7),
        "bn1.weight": torch.ones(64),
        "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
        "fc.weight": torch.zeros(1000, 2048),
    }
    torch.save(sd, tmp_path / "resnet101-torchvision.pth")
    with pytest.raises(ValueError, match=r"one 7x7 conv.*open-mmlab://resnet101_v1c"):
        weights.load_pretrained(fcn_model, tmp_path / "resnet101-torchvision.pth")


def test_imagenet_v1c_into_fcn_leaves_only_heads_fresh(torch_fcn, fcn_model, tmp_path):
    sd = dict(torch_fcn.backbone.state_dict()) | {"fc.weight": torch.zeros(1000, 256)}
    torch.save(sd, tmp_path / "resnet_v1c.pth")
    model = nnx.clone(fcn_model)
    report = weights.load_pretrained(model, tmp_path / "resnet_v1c.pth")
    assert set(report.fresh) == {"head", "classifier", "aux_head", "aux_classifier"}
    assert "fc.weight" in report.dropped
    ref = torch_fcn.backbone.stem[3].weight.detach().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(model.encoder.stem[1].conv.kernel[...], ref)


def test_swin_checkpoint_into_resnet_names_the_family(hf_swin, fcn_model):
    with pytest.raises(ValueError, match="encoder is ResNetV1c.*fcn_resnet101_d8"):
        weights.load_pretrained(fcn_model, hf_swin[1])
