"""--to hf for UperNet-ConvNeXt and UperNet-Swin: the UperNetForSemanticSegmentation folder
gives our logits and auxiliary logits in PyTorch (CBP and learned classifiers), a learned one
loads back into cbp_jax, and what transformers cannot hold is refused naming the other
targets."""

import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from export_helpers import random_state, tiny_config, tiny_segmenter
from flax import nnx
from torch.nn import functional as F
from torch_refs import forward_eval, images

from cbp_jax import export, weights


@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.parametrize(
    ("name", "classifier", "overrides"),
    [
        ("ade20k_convnext_base", "cbp", {}),
        ("ade20k_swin_base", "linear", {"depths": (2, 2, 2, 2)}),  # shifted windows too
    ],
)
def test_hf_upernet_export_gives_our_logits_in_pytorch(tmp_path, name, classifier, overrides):
    """The export's own check, then a fresh from_pretrained on another image: logits at the
    input size (ours upsampled by PyTorch) and auxiliary logits within 1e-4. Swin's window
    (12) is larger than its last maps (4 and 3 px): padded alike."""
    seg = tiny_segmenter(name, classifier, seed=4, **overrides)
    result = export.export_hf(seg, str(tmp_path))
    assert result["architecture"] == "UperNetForSemanticSegmentation"
    assert result["max_abs_logit_diff"] <= 1e-4 and result["max_abs_aux_logit_diff"] <= 1e-4
    assert result["notes"] == []

    hf = transformers.UperNetForSemanticSegmentation.from_pretrained(tmp_path).eval()
    x, xt = images(1, 96, 112, seed=5)
    with torch.no_grad():
        theirs = hf(xt).logits
        aux = hf.auxiliary_head(hf.backbone(xt).feature_maps)
    out = forward_eval(seg.model(), x)
    ours = torch.from_numpy(np.asarray(out["logits"]).transpose(0, 3, 1, 2).copy())
    ours = F.interpolate(ours, size=xt.shape[2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    ours_aux = np.asarray(out["aux_logits"]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(aux.numpy(), ours_aux, rtol=0, atol=1e-4)
    assert len(np.unique(theirs.argmax(1).numpy())) >= 3  # not a constant prediction

    head = hf.decode_head.classifier
    class_weights = np.asarray(seg.model().classifier.class_weights())
    np.testing.assert_array_equal(head.weight.detach().numpy()[:, :, 0, 0], class_weights)
    assert hf.config.id2label[6] == "6" and hf.config.use_auxiliary_head
    if classifier == "cbp":  # the frozen prototypes, bias 0
        np.testing.assert_array_equal(head.bias.detach().numpy(), 0.0)
    else:  # the learned classifier loads back into cbp_jax: the same variables
        back = nnx.merge(seg.graphdef, *random_state(seg.config, seed=6).values())
        assert weights.load_pretrained(back, tmp_path, verbose=False).fresh == {}
        variables = (nnx.Param, nnx.BatchStat)
        got, want = nnx.state(back, *variables), nnx.state(seg.model(), *variables)
        jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        (
            "ade20k_fcn_resnet101",
            {},
            r"no FCN head nor ResNetV1c.*Export with `--to mmseg`, `--to onnx` or `--to jax`\.$",
        ),
        (
            "ade20k_mit_b0",
            {"head": "mmseg"},
            r"head='mmseg'.*--config.model.head=mlp.*`--to mmseg`, `--to onnx` or `--to jax`",
        ),
        (
            "ade20k_swin_base",
            {"cbp_normalize_features": True},
            r"cosine classifier is not a 1x1 conv\. Export with `--to onnx` or `--to jax`\.$",
        ),
    ],
)
def test_hf_export_refuses_naming_the_reason_and_the_other_targets(name, overrides, message):
    config = ml_collections.ConfigDict(tiny_config(name, "cbp").to_dict())
    config.model.update(**overrides)
    with pytest.raises(ValueError, match=message):
        export.TARGETS["hf"].check(config)
