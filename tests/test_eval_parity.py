"""Evaluating a converted HF SegformerForSemanticSegmentation reproduces PyTorch's predictions."""

import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx
from torch.nn import functional as F
from torch_refs import images, randomize_

from cbp_jax import eval_lib, models, weights

pytestmark = pytest.mark.parity


@pytest.mark.slow
def test_converted_hf_segformer_predicts_the_same_classes(tmp_path):
    num_classes = 9
    hf = randomize_(
        T.SegformerForSemanticSegmentation(T.SegformerConfig(num_labels=num_classes)), seed=7
    )
    hf.save_pretrained(tmp_path)
    x, xt = images(3, 96, 128, seed=8)
    with torch.no_grad():
        logits = F.interpolate(hf(xt).logits, size=(96, 128), mode="bilinear", align_corners=False)
    hf_classes = logits.argmax(1).numpy()  # (B, H, W), PyTorch's prediction at input size
    assert len(np.unique(hf_classes)) > 3  # a non-trivial prediction to agree with

    model = models.create(
        "segformer_b0",
        num_classes=num_classes,
        head="mlp",
        classifier="linear",
        norm_eps=1e-5,
        patch_norm_eps=1e-5,
        rngs=nnx.Rngs(0),
    )
    weights.load_pretrained(model, tmp_path, verbose=False)
    logits_fn = nnx.jit(lambda m, images: m(images, train=False)["logits"])

    # The evaluation pipeline, with PyTorch's predictions as ground truth: every pixel agrees.
    examples = [{"image": x[i], "label": hf_classes[i]} for i in range(3)]
    metrics = eval_lib.evaluate(
        lambda images: logits_fn(model, images), examples, num_classes=num_classes, progress=False
    )
    assert metrics["aAcc"] >= 99.99, metrics["aAcc"]
    present = np.unique(hf_classes)
    np.testing.assert_allclose(np.asarray(metrics["IoU"])[present], 100.0, atol=0.05)
