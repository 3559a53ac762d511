"""Parity of the encoders, heads and checkpoint conversion against transformers (PyTorch).

HF models get random weights (every parameter and buffer), are written with
``save_pretrained`` (or re-keyed into the NVlabs / mmseg / timm / Facebook layouts by the
independent rename tables below), converted with ``load_pretrained`` and must reproduce
PyTorch's outputs in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx
from safetensors.numpy import save_file
from safetensors.torch import load_file
from torch.nn import functional as F
from torch_refs import assert_close as _close
from torch_refs import forward_eval as _forward
from torch_refs import images, nhwc, randomize_

from cbp_jax import models, resize, weights

pytestmark = pytest.mark.parity
HF_EPS = dict(norm_eps=1e-5, patch_norm_eps=1e-5)  # HF SegFormer uses 1e-5 everywhere


def _hf_stages(hf, xt):
    with torch.no_grad():
        return [nhwc(h) for h in hf(xt, output_hidden_states=True).hidden_states]


# ----------------------------------------------------------------------------- SegFormer


@pytest.fixture(scope="module")
def hf_b0(tmp_path_factory):
    hf = randomize_(T.SegformerModel(T.SegformerConfig()), seed=1)
    path = tmp_path_factory.mktemp("b0")
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def b0_encoder():
    return models.create_encoder("mit_b0", rngs=nnx.Rngs(0), **HF_EPS)


def test_segformer_model_b0_stages(hf_b0, b0_encoder):
    hf, path = hf_b0
    x, xt = images(2, 64, 64)
    enc = b0_encoder
    report = weights.load_pretrained(enc, path)
    assert report.fresh == {} and len(report.loaded) == 192
    for ours, ref in zip(_forward(enc, x), _hf_stages(hf, xt), strict=True):
        _close(ours, ref)


@pytest.mark.slow
def test_segformer_model_b2_shaped_stages(tmp_path):
    depths = [1, 2, 2, 1]
    cfg = T.SegformerConfig(
        hidden_sizes=[64, 128, 320, 512], depths=depths, decoder_hidden_size=768
    )
    hf = randomize_(T.SegformerModel(cfg), seed=2)
    hf.save_pretrained(tmp_path)
    x, xt = images(1, 64, 96, seed=3)
    enc = models.create_encoder("mit_b2", depths=depths, rngs=nnx.Rngs(0), **HF_EPS)
    weights.load_pretrained(enc, tmp_path)
    for ours, ref in zip(_forward(enc, x), _hf_stages(hf, xt), strict=True):
        _close(ours, ref)


@pytest.mark.slow
def test_segformer_for_semantic_segmentation_logits(tmp_path):
    hf = randomize_(T.SegformerForSemanticSegmentation(T.SegformerConfig(num_labels=7)), seed=4)
    hf.save_pretrained(tmp_path)
    x, xt = images(2, 64, 64, seed=5)
    model = models.create(
        "segformer_b0", num_classes=7, head="mlp", classifier="linear", rngs=nnx.Rngs(0), **HF_EPS
    )
    report = weights.load_pretrained(model, tmp_path)
    assert report.fresh == {}
    with torch.no_grad():
        ref = nhwc(hf(xt).logits)
    out = _forward(model, x)
    _close(out["logits"], ref)
    assert out["features"].shape == (2, 16, 16, 256)


def _nvlabs_keys(sd):
    """HF v4 SegformerModel keys -> NVlabs mit_b* keys (kv = cat(key, value))."""
    out = {}
    for k, v in sd.items():
        k = k.replace("encoder.", "")
        parts = k.split(".")
        if parts[0] == "patch_embeddings":
            k = f"patch_embed{int(parts[1]) + 1}." + ".".join(parts[2:]).replace(
                "layer_norm", "norm"
            )
        elif parts[0] == "layer_norm":
            k = f"norm{int(parts[1]) + 1}.{parts[2]}"
        elif parts[0] == "block":
            rest = ".".join(parts[3:])
            for a, b in [
                ("layer_norm_1", "norm1"),
                ("layer_norm_2", "norm2"),
                ("attention.self.query", "attn.q"),
                ("attention.self.sr", "attn.sr"),
                ("attention.self.layer_norm", "attn.norm"),
                ("attention.output.dense", "attn.proj"),
                ("mlp.dense1", "mlp.fc1"),
                ("mlp.dense2", "mlp.fc2"),
            ]:
                rest = rest.replace(a, b)
            if "attention.self.key" in rest or "attention.self.value" in rest:
                continue
            k = f"block{int(parts[1]) + 1}.{parts[2]}.{rest}"
        out[k] = v
    for k in [k for k in sd if "attention.self.key" in k]:
        parts = k.replace("encoder.", "").split(".")
        kv = torch.cat([sd[k], sd[k.replace(".key.", ".value.")]], dim=0)
        out[f"block{int(parts[1]) + 1}.{parts[2]}.attn.kv.{parts[-1]}"] = kv
    out["head.weight"] = torch.zeros(1000, 256)  # the ImageNet classifier, dropped
    return out


def _mmseg_keys(sd):
    """HF v4 SegformerModel keys -> mmseg 1.x MiT keys (in_proj = cat(q, k, v), 1x1 convs)."""
    out = {}
    for k, v in sd.items():
        parts = k.replace("encoder.", "").split(".")
        if parts[0] == "patch_embeddings":
            name = {"proj": "projection", "layer_norm": "norm"}[parts[2]]
            out[f"backbone.layers.{parts[1]}.0.{name}.{parts[3]}"] = v
        elif parts[0] == "layer_norm":
            out[f"backbone.layers.{parts[1]}.2.{parts[2]}"] = v
        else:
            s, j, rest = parts[1], parts[2], ".".join(parts[3:])
            pre = f"backbone.layers.{s}.1.{j}."
            table = {
                "layer_norm_1": "norm1",
                "layer_norm_2": "norm2",
                "attention.self.sr": "attn.sr",
                "attention.self.layer_norm": "attn.norm",
                "attention.output.dense": "attn.attn.out_proj",
                "mlp.dense1": "ffn.layers.0",
                "mlp.dwconv.dwconv": "ffn.layers.1",
                "mlp.dense2": "ffn.layers.4",
            }
            mod, p = rest.rsplit(".", 1)
            if mod.startswith("attention.self.") and mod.split(".")[-1] in (
                "query",
                "key",
                "value",
            ):
                continue
            if mod in ("mlp.dense1", "mlp.dense2") and p == "weight":
                v = v[:, :, None, None]
            out[pre + table[mod] + "." + p] = v
    for k in [k for k in sd if "attention.self.query" in k]:
        parts = k.replace("encoder.", "").split(".")
        qkv = torch.cat([sd[k.replace("query", n)] for n in ("query", "key", "value")], dim=0)
        p = "in_proj_weight" if k.endswith("weight") else "in_proj_bias"
        out[f"backbone.layers.{parts[1]}.1.{parts[2]}.attn.attn.{p}"] = qkv
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["nvlabs", "mmseg", "hf5", "hf_bin"])
def test_mit_other_layouts(hf_b0, b0_encoder, tmp_path, layout):
    hf, hf_path = hf_b0
    sd = load_file(hf_path / "model.safetensors")  # v4 names, as written to disk
    if layout == "nvlabs":
        sd = _nvlabs_keys(sd)
    elif layout == "mmseg":
        sd = {"state_dict": _mmseg_keys(sd)}
    elif layout == "hf5":  # a raw transformers 5.x state_dict(): the in-memory names
        sd = dict(hf.state_dict())
    # else "hf_bin": the v4 names in an HF folder's pytorch_model.bin
    path = tmp_path / "ckpt.pth"
    torch.save(sd, path)
    if layout == "hf_bin":
        path.rename(tmp_path / "pytorch_model.bin")
        path = tmp_path  # an HF folder
    x, xt = images(1, 64, 64, seed=6)
    enc = b0_encoder
    report = weights.load_pretrained(enc, path)
    names = {
        "nvlabs": "NVlabs",
        "mmseg": "mmseg",
        "hf5": "HF transformers SegFormer (5.x",
        "hf_bin": "HF transformers SegFormer (v4",
    }
    assert report.format.startswith(names[layout])
    for ours, ref in zip(_forward(enc, x), _hf_stages(hf, xt), strict=True):
        _close(ours, ref)


class _ConvModule(torch.nn.Module):
    """mmcv ConvModule: conv (no bias) -> BN -> ReLU, with mmcv's attribute names."""

    def __init__(self, din, dout):
        super().__init__()
        self.conv = torch.nn.Conv2d(din, dout, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(dout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class _MMSegSegformerHead(torch.nn.Module):
    """mmseg 1.x SegformerHead written from its layer list (eval mode: no dropout)."""

    def __init__(self, dims, width, num_classes):
        super().__init__()
        self.convs = torch.nn.ModuleList([_ConvModule(d, width) for d in dims])
        self.fusion_conv = _ConvModule(width * len(dims), width)
        self.conv_seg = torch.nn.Conv2d(width, num_classes, 1)

    def forward(self, feats):
        size = feats[0].shape[2:]
        outs = [
            F.interpolate(conv(f), size=size, mode="bilinear", align_corners=False)
            for conv, f in zip(self.convs, feats, strict=True)
        ]
        return self.conv_seg(self.fusion_conv(torch.cat(outs, dim=1)))


@pytest.mark.slow
def test_mmseg_segformer_head_and_checkpoint(hf_b0, tmp_path):
    hf, hf_path = hf_b0
    head = randomize_(_MMSegSegformerHead([32, 64, 160, 256], 256, 6), seed=14)
    sd = _mmseg_keys(load_file(hf_path / "model.safetensors"))
    sd |= {f"decode_head.{k}": v for k, v in head.state_dict().items()}
    torch.save({"state_dict": sd, "meta": {}}, tmp_path / "segformer.pth")
    x, xt = images(2, 64, 64, seed=15)
    model = models.create(
        "segformer_b0", num_classes=6, classifier="linear", rngs=nnx.Rngs(0), **HF_EPS
    )
    report = weights.load_pretrained(model, tmp_path / "segformer.pth")
    assert report.fresh == {}
    with torch.no_grad():
        feats = hf(xt, output_hidden_states=True).hidden_states
        ref = nhwc(head(feats))
    _close(_forward(model, x)["logits"], ref)


# ----------------------------------------------------------------------------- ConvNeXt

TINY = dict(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3])  # ConvNeXt-T
OUT = ["stage1", "stage2", "stage3", "stage4"]


@pytest.fixture(scope="module")
def hf_convnext_tiny(tmp_path_factory):
    hf = randomize_(T.ConvNextBackbone(T.ConvNextConfig(**TINY, out_features=OUT)), seed=7)
    path = tmp_path_factory.mktemp("cnt")
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def convnext_encoder():
    return models.create_encoder("convnext_tiny", depths=TINY["depths"], rngs=nnx.Rngs(0))


def _hf_maps(hf, xt):
    with torch.no_grad():
        return [nhwc(f) for f in hf(xt).feature_maps]


@pytest.mark.slow
def test_convnext_backbone_tiny(hf_convnext_tiny, convnext_encoder):
    hf, path = hf_convnext_tiny
    x, xt = images(1, 64, 64, seed=8)
    enc = convnext_encoder
    report = weights.load_pretrained(enc, path)
    assert report.fresh == {}
    for ours, ref in zip(_forward(enc, x), _hf_maps(hf, xt), strict=True):
        _close(ours, ref)


def _timm_keys(sd):
    out = {}
    for k, v in sd.items():
        k = k.replace("embeddings.patch_embeddings", "stem.0").replace(
            "embeddings.layernorm", "stem.1"
        )
        k = k.replace("encoder.stages", "stages").replace("downsampling_layer", "downsample")
        k = (
            k.replace(".layers.", ".blocks.")
            .replace("dwconv", "conv_dw")
            .replace("layernorm", "norm")
        )
        k = k.replace("pwconv1", "mlp.fc1").replace("pwconv2", "mlp.fc2")
        out[k.replace("layer_scale_parameter", "gamma")] = v
    return out


def _facebook_keys(sd):
    out = {}
    for k, v in sd.items():
        k = k.replace("embeddings.patch_embeddings", "downsample_layers.0.0")
        k = k.replace("embeddings.layernorm", "downsample_layers.0.1")
        parts = k.split(".")
        if parts[0] == "encoder" and parts[3] == "downsampling_layer":
            k = f"downsample_layers.{parts[2]}.{parts[4]}.{parts[5]}"
        elif parts[0] == "encoder":
            k = f"stages.{parts[2]}.{parts[4]}." + ".".join(parts[5:])
            k = k.replace("layernorm", "norm").replace("layer_scale_parameter", "gamma")
        elif parts[0] == "hidden_states_norms":
            k = f"norm{int(parts[1][-1]) - 1}.{parts[2]}"
        out[k] = v
    return out


@pytest.mark.parametrize("layout", ["timm", "facebook", "mmpretrain"])
def test_convnext_other_layouts(hf_convnext_tiny, convnext_encoder, tmp_path, layout):
    hf, hf_path = hf_convnext_tiny
    sd = load_file(hf_path / "model.safetensors")
    if layout == "timm":
        sd = {k: v for k, v in sd.items() if not k.startswith("hidden_states_norms")}
        sd = _timm_keys(sd) | {"head.fc.weight": torch.zeros(1000, 768)}
    elif layout == "facebook":
        sd = {"model": _facebook_keys(sd)}
    else:  # mmseg's UperNet-ConvNeXt checkpoints: mmpretrain block names under backbone.
        sd = {
            "state_dict": {
                "backbone."
                + k.replace("dwconv", "depthwise_conv").replace("pwconv", "pointwise_conv"): v
                for k, v in _facebook_keys(sd).items()
            }
        }
    path = tmp_path / "ckpt.pth"
    torch.save(sd, path)
    x, xt = images(1, 64, 64, seed=9)
    enc = convnext_encoder
    report = weights.load_pretrained(enc, path)
    if layout == "timm":  # an ImageNet checkpoint: the output norms stay fresh
        assert report.fresh == {"encoder.out_norms": 8}
        nnx.update(enc, nnx.state(_hf_out_norms_into(enc, hf)))
    else:
        assert report.fresh == {}
    for ours, ref in zip(_forward(enc, x), _hf_maps(hf, xt), strict=True):
        _close(ours, ref)


def _hf_out_norms_into(enc, hf):
    for i, norm in enumerate(enc.out_norms):
        ref = hf.hidden_states_norms[f"stage{i + 1}"]
        norm.scale[...] = ref.weight.detach().numpy()
        norm.bias[...] = ref.bias.detach().numpy()
    return enc


# ----------------------------------------------------------------------------- UperNet

SMALL_CNX = dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1])


@pytest.mark.slow
@pytest.mark.parametrize(("aux_convs", "concat"), [(1, False), (2, True)])
def test_upernet_logits_and_aux(tmp_path, aux_convs, concat):
    backbone = T.ConvNextConfig(**SMALL_CNX, out_features=OUT)
    cfg = T.UperNetConfig(
        backbone_config=backbone,
        hidden_size=32,
        auxiliary_channels=16,
        auxiliary_num_convs=aux_convs,
        auxiliary_concat_input=concat,
        num_labels=5,
    )
    hf = randomize_(T.UperNetForSemanticSegmentation(cfg), seed=10)
    hf.save_pretrained(tmp_path)
    # 96 px: the last map is 3x3, so PPM scales 2 and 6 have overlapping / repeated bins.
    x, xt = images(2, 96, 96, seed=11)
    model = models.create(
        "upernet_convnext_tiny",
        num_classes=5,
        classifier="linear",
        head_width=32,
        aux_width=16,
        aux_num_convs=aux_convs,
        aux_concat_input=concat,
        dims=SMALL_CNX["hidden_sizes"],
        depths=SMALL_CNX["depths"],
        rngs=nnx.Rngs(0),
    )
    report = weights.load_pretrained(model, tmp_path)
    assert report.fresh == {}
    with torch.no_grad():
        ref = hf(xt)
    out = _forward(model, x)
    up = nnx.jit(lambda a: resize.resize_bilinear(a, (96, 96)))
    _close(up(out["logits"]), nhwc(ref.logits))
    assert out["aux_logits"].shape == (2, 6, 6, 5)
    with torch.no_grad():
        aux_ref = hf.auxiliary_head(hf.backbone(xt).feature_maps)
    _close(out["aux_logits"], nhwc(aux_ref))


# ----------------------------------------------------------------------------- pure layers


RESIZES = [  # integer upsampling (shifted slices), any other size (gathers), mixed, identity
    ((5, 7), (20, 14)),
    ((1, 3), (4, 24)),
    ((5, 7), (16, 9)),
    ((16, 12), (5, 7)),
    ((6, 5), (12, 8)),
    ((4, 4), (4, 4)),
]


@pytest.mark.parametrize(("hw", "size"), RESIZES)
def test_resize_bilinear_matches_torch(hw, size):
    x = np.random.default_rng(0).normal(size=(2, *hw, 3)).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    ref = F.interpolate(xt, size=size, mode="bilinear", align_corners=False)
    _close(resize.resize_bilinear(x, size), nhwc(ref), 1e-5)
    # Gradients too: the shifted-slice and gather forms have their own backward passes.
    g = np.random.default_rng(1).normal(size=(2, *size, 3)).astype(np.float32)
    ref.backward(torch.from_numpy(g).permute(0, 3, 1, 2))
    _, vjp = jax.vjp(lambda a: resize.resize_bilinear(a, size), jnp.asarray(x))
    _close(vjp(jnp.asarray(g))[0], nhwc(xt.grad), 1e-5)
    # Channels-first (the CE's logits): W is the minor axis, resized as a matrix product.
    nchw = jnp.asarray(x.transpose(0, 3, 1, 2))
    y, vjp = jax.vjp(lambda a: resize.resize_bilinear(a, size, axes=(2, 3)), nchw)
    _close(y, ref.detach().numpy(), 1e-5)
    _close(vjp(jnp.asarray(g.transpose(0, 3, 1, 2)))[0], xt.grad.numpy(), 1e-5)


@pytest.mark.parametrize(("hw", "s"), [((7, 5), 3), ((2, 3), 6), ((16, 16), 6), ((5, 5), 1)])
def test_adaptive_avg_pool_matches_torch(hw, s):
    x = np.random.default_rng(0).normal(size=(2, *hw, 3)).astype(np.float32)
    ref = F.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), s)
    _close(resize.adaptive_avg_pool(x, s), nhwc(ref), 1e-5)


# ----------------------------------------------------------------------------- loud failures


def _edited(hf_path, tmp_path, edit):
    sd = {k: v.numpy() for k, v in load_file(hf_path / "model.safetensors").items()}
    edit(sd)
    save_file(sd, tmp_path / "edited.safetensors")
    return tmp_path / "edited.safetensors"


def test_renamed_key_fails_loudly_and_writes_nothing(hf_b0, b0_encoder, tmp_path):
    def rename(sd):
        sd["encoder.block.0.0.mlp.dense_1.weight"] = sd.pop("encoder.block.0.0.mlp.dense1.weight")

    before = np.asarray(b0_encoder.stages[0].blocks[0].mlp.fc2.kernel[...]).copy()
    with pytest.raises(ValueError) as err:
        weights.load_pretrained(b0_encoder, _edited(hf_b0[1], tmp_path, rename))
    msg = str(err.value)
    assert "encoder.block.0.0.mlp.dense_1.weight" in msg  # the unexpected key
    assert "stages.0.blocks.0.mlp.fc1.kernel" in msg  # the variable left without a value
    assert "nothing was written" in msg
    np.testing.assert_array_equal(b0_encoder.stages[0].blocks[0].mlp.fc2.kernel[...], before)


def test_missing_key_and_wrong_shape_fail_loudly(hf_b0, b0_encoder, tmp_path):
    def drop(sd):
        del sd["encoder.layer_norm.3.bias"]

    with pytest.raises(ValueError, match=r"get no value.*stages\.3\.norm\.bias"):
        weights.load_pretrained(b0_encoder, _edited(hf_b0[1], tmp_path, drop))

    def reshape(sd):
        sd["encoder.layer_norm.3.weight"] = np.ones(7, np.float32)

    with pytest.raises(
        ValueError, match=r"shape mismatch.*stages\.3\.norm\.scale \(7,\) != \(256,\)"
    ):
        weights.load_pretrained(b0_encoder, _edited(hf_b0[1], tmp_path, reshape))


def test_family_mismatch_names_the_fix(hf_b0):
    convnext = nnx.eval_shape(
        lambda: models.create_encoder("convnext_tiny", depths=(1, 1, 1, 1), rngs=nnx.Rngs(0))
    )
    with pytest.raises(ValueError, match="encoder is ConvNeXt"):
        weights.load_pretrained(convnext, hf_b0[1])


def test_imagenet_convnext_into_segmentor_leaves_only_new_parts_fresh(tmp_path):
    cfg = T.ConvNextConfig(**SMALL_CNX, num_labels=10)
    hf = randomize_(T.ConvNextForImageClassification(cfg), seed=12)
    hf.save_pretrained(tmp_path)
    model = models.create(
        "upernet_convnext_tiny",
        num_classes=5,
        head_width=32,
        aux_width=16,
        dims=SMALL_CNX["hidden_sizes"],
        depths=SMALL_CNX["depths"],
        rngs=nnx.Rngs(0),
    )
    report = weights.load_pretrained(model, tmp_path)
    assert set(report.fresh) == {"head", "aux_head", "aux_classifier", "encoder.out_norms"}
    assert {"convnext.layernorm.weight", "classifier.weight"} <= set(report.dropped)
    ref = hf.convnext.embeddings.patch_embeddings.weight.detach().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(model.encoder.stem_conv.kernel[...], ref)


def test_segmentation_checkpoint_into_cbp_segmentor(tmp_path):
    hf = randomize_(T.SegformerForSemanticSegmentation(T.SegformerConfig(num_labels=7)), seed=13)
    hf.save_pretrained(tmp_path)
    model = models.create("segformer_b0", num_classes=7, rngs=nnx.Rngs(0), **HF_EPS)
    with pytest.raises(
        ValueError, match=r"decode_head\.linear_c\.0\.proj\.weight -> head\.linear_c"
    ):
        weights.load_pretrained(model, tmp_path)  # mmseg head + CBP: the HF head does not fit
    report = weights.load_pretrained(model, tmp_path, ignore=[r"^decode_head\."])
    assert set(report.fresh) == {"head"} and len(report.loaded) == 192


class TrainingMeta:
    """Stands for the non-tensor objects mmengine pickles into checkpoints."""


def test_pickled_metadata_needs_trust(hf_b0, b0_encoder, tmp_path):
    sd = {"state_dict": _mmseg_keys(load_file(hf_b0[1] / "model.safetensors"))}
    torch.save(sd | {"message_hub": TrainingMeta()}, tmp_path / "mmseg.pth")
    with pytest.raises(ValueError, match="trust_pickle=True"):
        weights.load_pretrained(b0_encoder, tmp_path / "mmseg.pth")
    report = weights.load_pretrained(b0_encoder, tmp_path / "mmseg.pth", trust_pickle=True)
    assert report.format.startswith("mmseg") and len(report.loaded) == 192


def test_hub_id_offline_says_how_to_pass_a_file(b0_encoder, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="pass its local path"):
        weights.load_pretrained(b0_encoder, "nvidia/mit-b0")
