"""--to mmseg: the checkpoint reads back into cbp_jax bit for bit (every paper family), equals
the mmseg checkpoint of the PyTorch references the parity tests use and gives their logits,
its printed config is mmseg's model dict, and export.py writes it from a workdir."""

import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers as T
from config_helpers import load_config
from export_helpers import model_workdir, random_state, tiny_config, tiny_segmenter
from flax import nnx
from safetensors.torch import load_file
from test_models_parity import _facebook_keys, _mmseg_keys, _MMSegSegformerHead
from test_parity_swin_resnet import _mmseg_swin_keys, _official_swin_keys
from torch_refs import MMSegFCN, assert_close, forward_eval, images, nhwc, randomize_

from cbp_jax import export, predict, weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_FEATURES = ["stage1", "stage2", "stage3", "stage4"]
FAMILY_TYPES = {  # config -> (backbone type, decode head type) in the printed mmseg config
    "ade20k_mit_b0": ("MixVisionTransformer", "SegformerHead"),
    "ade20k_convnext_base": ("mmpretrain.ConvNeXt", "UPerHead"),
    "ade20k_swin_base": ("SwinTransformer", "UPerHead"),
    "ade20k_fcn_resnet101": ("ResNetV1c", "FCNHead"),
}


def _read(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _model_dict(lines: list[str]) -> dict:
    """The printed config text, run as Python (mmseg configs are Python files)."""
    namespace = {}
    exec("\n".join(lines), namespace)  # noqa: S102 - our own generated text
    return namespace["model"]


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    ("name", "classifier"),
    [
        ("ade20k_mit_b0", "cbp"),
        ("ade20k_convnext_base", "linear"),
        pytest.param("ade20k_swin_base", "cbp", marks=pytest.mark.slow),
        ("ade20k_fcn_resnet101", "linear"),
    ],
)
def test_round_trip_gives_every_variable_back(tmp_path, name, classifier):
    """Export, then load_pretrained into a model with other random values: every variable
    bit-identical; CBP prototypes are conv_seg with bias 0; the config text is mmseg's."""
    seg = tiny_segmenter(name, classifier, seed=1)
    path = tmp_path / "model.pth"
    result = export.export_mmseg(seg, str(path))

    saved = _read(path)
    assert set(saved) == {"state_dict", "meta"}
    assert saved["meta"]["dataset_meta"]["classes"] == list(seg.class_names)
    sd = saved["state_dict"]
    bn = [k for k in sd if k.endswith(".running_mean")]
    assert bn and all(sd[k.replace("running_mean", "num_batches_tracked")] == 0 for k in bn)

    other = nnx.merge(seg.graphdef, *random_state(seg.config, seed=2).values())
    ignore = [r"^decode_head\.conv_seg\."] if classifier == "cbp" else []
    report = weights.load_pretrained(other, path, ignore=ignore, verbose=False)
    assert report.fresh == {}
    got = nnx.state(other, nnx.Param, nnx.BatchStat)
    want = nnx.state(seg.model(), nnx.Param, nnx.BatchStat)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    class_weights = np.asarray(seg.model().classifier.class_weights())
    np.testing.assert_array_equal(sd["decode_head.conv_seg.weight"][:, :, 0, 0], class_weights)
    if classifier == "cbp":
        np.testing.assert_array_equal(sd["decode_head.conv_seg.bias"], 0.0)

    model = _model_dict(result["config_lines"])
    backbone, head = FAMILY_TYPES[name]
    assert (model["backbone"]["type"], model["decode_head"]["type"]) == (backbone, head)
    assert model["decode_head"]["num_classes"] == 7
    assert model["decode_head"]["channels"] == seg.model().head.width
    assert model["decode_head"]["align_corners"] is False
    assert ("auxiliary_head" in model) == (name != "ade20k_mit_b0")
    assert export.to_mmseg.encoder_config(seg.config) == seg.model().encoder.config


def test_backbone_config_of_the_paper_models():
    """The full paper configs print mmseg's own architecture values (its ConvNeXt-B,
    Swin-B window 12 and ResNet-101 D8 configs), without building the models."""
    expected = {
        "ade20k_mit_b5": dict(embed_dims=64, num_layers=[3, 6, 40, 3], num_heads=[1, 2, 5, 8]),
        "ade20k_convnext_base": dict(
            arch=dict(depths=[3, 3, 27, 3], channels=[128, 256, 512, 1024])
        ),
        "ade20k_swin_base": dict(
            embed_dims=128, window_size=12, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]
        ),
        "ade20k_fcn_resnet101": dict(depth=101, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1)),
    }
    for name, values in expected.items():
        config = load_config(name, None)
        family = weights.formats.segmentor_family(config.model.name)
        got = export.to_mmseg.backbone_config(export.to_mmseg.encoder_config(config), family)
        assert {k: got[k] for k in values} == values, name


def test_a_fused_tensor_with_a_part_missing_is_an_error():
    """mmseg's in_proj_weight is q, k and v concatenated: without v there is no tensor."""
    model = tiny_segmenter("ade20k_mit_b0", "linear").model()
    model.encoder.stages[0].blocks[0].attn.v = None
    with pytest.raises(ValueError, match=r"lack some of their parts.*layers\.0\.1\.0\.attn\.attn"):
        weights.export_state_dict(model, weights.formats.MMSEG_EXPORT["mit"])


# ----------------------------------------------------------------------------- PyTorch references


def _mmseg_heads(sd: dict) -> dict:
    """transformers UperNet head keys -> mmseg's (``bn``, ``conv_seg``)."""
    out = {}
    for k, v in sd.items():
        k = k.replace(".batch_norm.", ".bn.")
        k = k.replace("decode_head.classifier.", "decode_head.conv_seg.")
        out[k.replace("auxiliary_head.classifier.", "auxiliary_head.conv_seg.")] = v
    return out


def _mmpretrain_convnext(sd: dict) -> dict:
    """transformers ConvNextBackbone keys -> mmpretrain's, as in mmseg's UperNet checkpoints."""
    return {
        "backbone." + k.replace("dwconv", "depthwise_conv").replace("pwconv", "pointwise_conv"): v
        for k, v in _facebook_keys(sd).items()
    }


def _mmseg_swin(sd: dict) -> dict:
    """transformers SwinBackbone keys -> mmseg 1.x Swin (swin2mmseg's re-ordering)."""
    return {"backbone." + k: v for k, v in _mmseg_swin_keys(_official_swin_keys(sd)).items()}


def _upernet_reference(tmp_path, backbone_config, seed):
    """A random transformers UperNet and its mmseg checkpoint."""
    cfg = T.UperNetConfig(
        backbone_config=backbone_config, hidden_size=32, auxiliary_channels=16, num_labels=7
    )
    hf = randomize_(T.UperNetForSemanticSegmentation(cfg), seed=seed)
    hf.save_pretrained(tmp_path / "hf")
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    backbone = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    heads = _mmseg_heads({k: v for k, v in sd.items() if not k.startswith("backbone.")})
    return hf, backbone, heads


def _mmseg_relative_position_index(window: int) -> torch.Tensor:
    """mmseg's ``WindowMSA.relative_position_index`` (its double_step_seq construction)."""

    def double_step_seq(step1, len1, step2, len2):
        seq1, seq2 = torch.arange(0, step1 * len1, step1), torch.arange(0, step2 * len2, step2)
        return (seq1[:, None] + seq2[None, :]).reshape(1, -1)

    coords = double_step_seq(2 * window - 1, window, 1, window)
    return (coords + coords.T).flip(1).contiguous()


def _export_of(config, sd: dict, tmp_path):
    """Loads the mmseg checkpoint ``sd`` into ``config``'s model and exports it again."""
    torch.save({"state_dict": sd, "meta": {}}, tmp_path / "reference.pth")
    seg = predict.Segmenter(config, random_state(config, seed=9))
    model = seg.model()
    report = weights.load_pretrained(model, tmp_path / "reference.pth", verbose=False)
    assert report.fresh == {}
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    seg = predict.Segmenter(config, {"params": params, "model_state": model_state})
    export.export_mmseg(seg, str(tmp_path / "export.pth"))
    return seg, _read(tmp_path / "export.pth")["state_dict"]


def _assert_same_checkpoint(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.slow
@pytest.mark.parity
def test_fcn_export_loads_strictly_into_the_mmseg_reference(tmp_path):
    """Our random FCN-R101-D8 (tiny) -> mmseg checkpoint -> torch_refs.MMSegFCN (mmseg's
    module names, load_state_dict strict): its logits and auxiliary logits are ours."""
    seg = tiny_segmenter("ade20k_fcn_resnet101", "linear", seed=3, depths=(1, 2, 2, 2))
    export.export_mmseg(seg, str(tmp_path / "fcn.pth"))
    ref = MMSegFCN((1, 2, 2, 2), 16, 8, width=24, aux_width=12, num_classes=7)
    ref.load_state_dict(_read(tmp_path / "fcn.pth")["state_dict"], strict=True)
    ref.eval()
    x, xt = images(2, 65, 97, seed=4)
    with torch.no_grad():
        feats = ref.backbone(xt)
        logits, aux = ref.decode_head(feats), ref.auxiliary_head(feats)
    out = forward_eval(seg.model(), x)
    assert_close(out["logits"], nhwc(logits))
    assert_close(out["aux_logits"], nhwc(aux))


@pytest.mark.slow
@pytest.mark.parity
def test_segformer_export_is_the_mmseg_reference_checkpoint(tmp_path):
    """transformers' SegformerModel + mmseg's SegformerHead (test_models_parity), keyed as
    mmseg 1.x: loading it and exporting again gives the same file; logits are theirs."""
    hf_cfg = T.SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 160, 256])
    hf = randomize_(T.SegformerModel(hf_cfg), seed=5)
    hf.save_pretrained(tmp_path / "hf")
    head = randomize_(_MMSegSegformerHead([32, 64, 160, 256], 256, 7), seed=6)
    want = _mmseg_keys(load_file(tmp_path / "hf" / "model.safetensors"))
    want |= {f"decode_head.{k}": v for k, v in head.state_dict().items()}
    config = tiny_config("ade20k_mit_b0", "linear", norm_eps=1e-5, patch_norm_eps=1e-5)
    seg, got = _export_of(config, want, tmp_path)
    _assert_same_checkpoint(got, want)

    x, xt = images(2, 64, 64, seed=7)
    with torch.no_grad():
        ref = head(hf(xt, output_hidden_states=True).hidden_states)
    assert_close(forward_eval(seg.model(), x)["logits"], nhwc(ref))


@pytest.mark.slow
@pytest.mark.parity
def test_upernet_convnext_export_is_the_mmseg_reference_checkpoint(tmp_path):
    """transformers' UperNet-ConvNeXt keyed as mmseg (mmpretrain ConvNeXt, UPerHead, FCNHead):
    loading it and exporting again gives the same file; logits and aux logits are theirs."""
    backbone_cfg = T.ConvNextConfig(
        hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], out_features=OUT_FEATURES
    )
    hf, backbone, heads = _upernet_reference(tmp_path, backbone_cfg, seed=8)
    want = _mmpretrain_convnext(backbone) | heads
    seg, got = _export_of(tiny_config("ade20k_convnext_base", "linear"), want, tmp_path)
    _assert_same_checkpoint(got, want)
    _assert_upernet_logits(seg, hf, (96, 96))


@pytest.mark.slow
@pytest.mark.parity
def test_upernet_swin_export_is_the_mmseg_reference_checkpoint(tmp_path):
    """transformers' UperNet-Swin keyed as mmseg 1.x Swin: the same file again plus mmseg's
    relative_position_index buffers; logits and aux logits are theirs (shifted windows)."""
    backbone_cfg = T.SwinConfig(
        embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=3,
        out_features=OUT_FEATURES,
    )  # fmt: skip
    hf, backbone, heads = _upernet_reference(tmp_path, backbone_cfg, seed=10)
    backbone.pop("swin.layernorm.weight"), backbone.pop("swin.layernorm.bias")  # unused
    want = _mmseg_swin(backbone) | heads
    config = tiny_config("ade20k_swin_base", "linear", window_size=3, depths=(2, 2, 2, 2))
    seg, got = _export_of(config, want, tmp_path)
    index = {k: got.pop(k) for k in list(got) if k.endswith("relative_position_index")}
    assert len(index) == 8
    for v in index.values():
        torch.testing.assert_close(v, _mmseg_relative_position_index(3), rtol=0, atol=0)
    _assert_same_checkpoint(got, want)
    _assert_upernet_logits(seg, hf, (128, 160))  # 1/32 maps (4, 5): larger than the window


def _assert_upernet_logits(seg, hf, size_hw) -> None:
    x, xt = images(2, *size_hw, seed=11)
    with torch.no_grad():
        feats = hf.backbone(xt).feature_maps
        logits, aux = hf.decode_head(feats), hf.auxiliary_head(feats)
    out = forward_eval(seg.model(), x)
    assert_close(out["logits"], nhwc(logits))
    assert_close(out["aux_logits"], nhwc(aux))


# ----------------------------------------------------------------------------- refusals, CLI


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("ade20k_mit_b0", {"head": "mlp"}, r"head='mlp'.*`--to hf`, `--to onnx` or `--to jax`"),
        (
            "ade20k_convnext_base",
            {"cbp_normalize_features": True},
            r"cosine classifier.*Export with `--to onnx` or `--to jax`\.$",
        ),
        (
            "ade20k_mit_b0",
            {"embed_dims": (32, 64, 128, 256)},
            r"embed_dims \(32, 64, 128, 256\) are not embed_dims\[0\] x num_heads \(1, 2, 5, 8\)",
        ),
    ],
)
def test_mmseg_export_refuses_what_mmseg_cannot_hold(name, overrides, message):
    config = ml_collections.ConfigDict(tiny_config(name, "cbp").to_dict())
    config.model.update(**overrides)
    with pytest.raises(ValueError, match=message):
        export.TARGETS["mmseg"].check(config)


@pytest.mark.slow
def test_export_py_to_mmseg_from_a_workdir(tmp_path):
    """export.py --to mmseg on a workdir (SegFormer-B0 smoke, CBP, ADE20K's 150 classes):
    prints the mmseg config, writes the checkpoint with the prototypes as conv_seg, and the
    file loads back into cbp_jax as the workdir's model."""
    config = tiny_config("ade20k_mit_b0", "cbp", num_classes=150)  # = the smoke config
    workdir = model_workdir(config, random_state(config, seed=12), str(tmp_path / "run"))
    out = str(tmp_path / "segformer.pth")
    command = [sys.executable, os.path.join(REPO, "export.py"), "--workdir", workdir]
    command += ["--config", os.path.join(REPO, "configs", "ade20k_mit_b0.py:smoke")]
    command += ["--to", "mmseg", "--out", out]
    cache = {"JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | cache)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[1].startswith(f"{out}: mmsegmentation 1.x checkpoint")
    model = _model_dict(lines[2 : lines.index(")") + 1])
    assert model["backbone"]["num_layers"] == [1, 1, 1, 1]
    assert model["decode_head"]["num_classes"] == 150
    assert any(line.startswith("note: decode_head.conv_seg holds the CBP") for line in lines)

    saved = _read(out)
    assert saved["meta"]["dataset_meta"]["classes"][0] == "wall"  # ADE20K's names
    seg = predict.Segmenter.from_workdir(config, workdir)
    conv_seg = saved["state_dict"]["decode_head.conv_seg.weight"][:, :, 0, 0]
    np.testing.assert_array_equal(conv_seg, np.asarray(seg.model().classifier.class_weights()))
    other = nnx.merge(seg.graphdef, *random_state(config, seed=13).values())
    weights.load_pretrained(other, out, ignore=[r"^decode_head\.conv_seg\."], verbose=False)
    got = nnx.state(other, nnx.Param, nnx.BatchStat)
    jax.tree.map(
        np.testing.assert_array_equal, got, nnx.state(seg.model(), nnx.Param, nnx.BatchStat)
    )
