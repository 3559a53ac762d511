"""bench/camvid_pytorch_baseline.py: the learned baseline's recipe trained in PyTorch."""

import json
import math
import os

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from config_helpers import load_bench, load_config
from data_helpers import write_image
from flax import nnx

from cbp_jax import factories, losses, train_lib

bench = load_bench("camvid_pytorch_baseline")


def make_camvid(root: str, n_train: int = 4, n_val: int = 2, seed: int = 0) -> str:
    """A CamVid folder in the SegNet layout: 48x64 PNGs, labels 0..10 and 11 (void)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        os.makedirs(os.path.join(root, split + "annot"), exist_ok=True)
        for i in range(n):
            name = f"0001TP_{i:06d}.png"
            write_image(
                os.path.join(root, split, name), rng.integers(0, 256, (48, 64, 3), np.uint8)
            )
            grid = rng.integers(0, 12, (4, 4)).astype(np.uint8)
            label = np.kron(grid, np.ones((12, 16), np.uint8))
            cv2.imwrite(os.path.join(root, split + "annot", name), label)
    return root


def tiny_config(root: str):
    """The CamVid baseline's smoke variant (one block per stage, 64x64 crops, batch 4)."""
    c = load_config("camvid_mit_b0", "baseline,smoke")
    c.data.root = root
    c.total_steps = 2
    c.model.drop_path_rate = 0.1  # random draws: the resume must restore the RNG
    c.eval.max_images = 0
    return c


@pytest.fixture(scope="module")
def camvid(tmp_path_factory):
    return make_camvid(str(tmp_path_factory.mktemp("camvid")))


@pytest.fixture(scope="module")
def uninterrupted(camvid, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("straight"))
    summary = bench.train_and_evaluate(tiny_config(camvid), workdir, threads=1)
    return workdir, summary


@pytest.mark.slow
def test_two_steps_write_a_report(uninterrupted):
    workdir, summary = uninterrupted
    with open(os.path.join(workdir, "eval", "report.json")) as f:
        written = json.load(f)
    assert written["extra"] == {"step": 2, "framework": "pytorch"}
    assert written["summary"]["num_images"] == 2
    assert math.isfinite(written["summary"]["mIoU"])
    assert summary["eval"]["mIoU"] == pytest.approx(written["summary"]["mIoU"])
    assert sorted(summary["losses"]) == [1, 2]


def test_resume_from_step_1_gives_the_same_weights(uninterrupted, camvid, tmp_path):
    straight, summary = uninterrupted
    config = tiny_config(camvid)
    first = bench.train_and_evaluate(config, str(tmp_path), threads=1, stop_after=1)
    assert first["step"] == 1 and "eval" not in first
    assert not os.path.exists(tmp_path / "eval")
    resumed = bench.train_and_evaluate(config, str(tmp_path), threads=1)
    assert sorted(resumed["losses"]) == [2]
    assert resumed["losses"][2] == summary["losses"][2]
    a = torch.load(os.path.join(straight, bench.CHECKPOINT), weights_only=False)
    b = torch.load(tmp_path / bench.CHECKPOINT, weights_only=False)
    assert a["step"] == b["step"] == 2
    assert a["loader"] == b["loader"]
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name


def test_checkpoint_of_another_run_is_refused(uninterrupted, camvid):
    workdir, _ = uninterrupted
    config = tiny_config(camvid)
    config.total_steps = 3
    with pytest.raises(ValueError, match="belongs to a run with"):
        bench.train_and_evaluate(config, workdir, threads=1)


def test_param_groups_mirror_train_lib(camvid):
    """Parameters per (lr multiplier, decayed) group: the same counts as ours with the
    same (all-MLP) head, so every tensor is in the group train_lib puts it in."""
    config = tiny_config(camvid)
    config.model.head = "mlp"
    model = nnx.eval_shape(lambda: factories.model_from_config(config))
    _, params, _ = train_lib.split_model(model)
    lr_mults, decay = train_lib.param_groups(model, params, config.optimizer)
    ours: dict = {}
    for p, m, d in zip(*(jax.tree.leaves(t) for t in (params, lr_mults, decay)), strict=True):
        ours[(m, d)] = ours.get((m, d), 0) + math.prod(p.shape)
    torch_model = bench.create_model(config)
    theirs: dict = {}
    for group in bench.param_groups(torch_model, config.optimizer):
        key = (group["lr_mult"], group["weight_decay"] > 0)
        theirs[key] = sum(p.numel() for p in group["params"])
    assert theirs == ours
    assert set(ours) == {(1.0, True), (1.0, False), (10.0, True)}


@pytest.mark.parametrize("average", ["all", "labelled"])
def test_cross_entropy_matches_train_lib(average):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 11, 5, 7)).astype(np.float32)
    labels = rng.integers(0, 11, (2, 20, 28)).astype(np.int32)
    labels[0, :6] = 255
    ours = losses.upsampled_cross_entropy(
        jnp.asarray(logits).transpose(0, 2, 3, 1), jnp.asarray(labels), average=average
    )
    theirs = bench.upsampled_cross_entropy(
        torch.from_numpy(logits), torch.from_numpy(labels.astype(np.int64)), average
    )
    np.testing.assert_allclose(float(theirs), float(ours), rtol=1e-5)


def test_mmseg_init_draws_convs_by_fan_out_and_the_classifier_at_0_01():
    config = load_config("camvid_mit_b0", "baseline")
    hf, mm = bench.create_model(config, "hf"), bench.create_model(config, "mmseg")
    dw_hf = hf.segformer.stages[0].blocks[0].mlp.dwconv.dwconv.weight  # 3x3 depthwise, 128 ch
    dw_mm = mm.segformer.stages[0].blocks[0].mlp.dwconv.dwconv.weight
    assert abs(float(dw_hf.detach().std()) - 0.02) < 0.005
    assert abs(float(dw_mm.detach().std()) - math.sqrt(2 / 9)) < 0.05
    assert abs(float(mm.decode_head.classifier.weight.detach().std()) - 0.01) < 0.002
    assert float(mm.decode_head.classifier.bias.detach().abs().max()) == 0.0
    with pytest.raises(ValueError, match="init must be"):
        bench.create_model(config, "xavier")
