"""Exports: the jax.export artifact runs in a process that imports only jax and numpy and
gives our logits; the transformers folder gives our logits in PyTorch (CBP and learned
classifiers), and loads back into cbp_jax."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
from config_helpers import load_config, perturbed_state, perturbed_workdir

from cbp_jax import export, predict, weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_CONSUMER = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    exported = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
    np.save(sys.argv[3], np.asarray(exported.call(np.load(sys.argv[2]))))
    print("in", exported.in_avals[0].str_short(), "modules",
          sorted({m.split(".")[0] for m in sys.modules} & {"cbp_jax", "flax", "torch"}))
    """
)


@pytest.mark.slow
def test_jax_export_runs_without_cbp_jax(tmp_path):
    """export.py --to jax from a workdir; a fresh process that imports only jax and numpy
    runs the artifact on a batch of 3 (the batch is symbolic) and gets the Segmenter's
    logits for those images."""
    config = load_config("scenes_mit_b0", "smoke")  # test_scale (128, 64): 64 x 128 stays
    workdir = perturbed_workdir(config, str(tmp_path / "run"))
    artifact = str(tmp_path / "model.jaxexport")
    command = [sys.executable, os.path.join(REPO, "export.py"), "--workdir", workdir]
    command += ["--config", os.path.join(REPO, "configs", "scenes_mit_b0.py:smoke")]
    command += ["--to", "jax", "--out", artifact, "--height", "64", "--width", "128"]
    cache = {"JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "for cpu, cuda" in done.stdout
    meta = json.load(open(artifact + ".json"))
    assert meta["input"]["shape"] == ["B", 64, 128, 3] and meta["class_names"][0] == "sky"

    images = np.random.default_rng(0).integers(0, 256, (3, 64, 128, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ran = subprocess.run(
        [sys.executable, "-c", _CONSUMER, artifact, "images.npy", "logits.npy"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "in uint8[b,64,128,3] modules []" in ran.stdout

    ours = predict.Segmenter.from_workdir(config, workdir).logits(images)
    got = np.load(tmp_path / "logits.npy")
    assert got.shape == ours.shape == (3, 64, 128, config.data.num_classes)
    np.testing.assert_allclose(got, ours, atol=1e-4, rtol=0)
    assert len(np.unique(ours.argmax(-1))) >= 2  # not a constant prediction


def _hf_config(classifier: str):
    config = load_config("ade20k_mit_b0", "smoke")
    config.data.num_classes = 12  # not ADE20K's 150: the ids stand in for class names
    config.model.update(head="mlp", classifier=classifier, norm_eps=1e-5, patch_norm_eps=1e-5)
    return config


@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.parametrize("classifier", ["cbp", "linear"])
def test_hf_export_gives_our_logits_in_pytorch(tmp_path, classifier):
    import torch
    import transformers

    config = _hf_config(classifier)
    seg = predict.Segmenter(config, perturbed_state(config, seed=5))
    result = export.export_hf_segformer(seg, str(tmp_path), check_size_hw=(64, 64))
    assert result["notes"] == [] and result["max_abs_logit_diff"] <= 1e-4

    hf = transformers.SegformerForSemanticSegmentation.from_pretrained(tmp_path).eval()
    x = np.random.default_rng(1).normal(size=(1, 64, 64, 3)).astype(np.float32)  # compiled
    with torch.no_grad():
        theirs = hf(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).logits.numpy()
    ours = np.asarray(seg.network(x))
    np.testing.assert_allclose(theirs.transpose(0, 2, 3, 1), ours, atol=1e-4, rtol=0)
    assert len(np.unique(ours.argmax(-1))) >= 3

    head = hf.decode_head.classifier
    class_weights = np.asarray(seg.model().classifier.class_weights())
    np.testing.assert_array_equal(head.weight.detach().numpy()[:, :, 0, 0], class_weights)
    if classifier == "cbp":  # the frozen prototypes, bias 0
        np.testing.assert_array_equal(head.bias.detach().numpy(), 0.0)
        assert hf.config.id2label[11] == "11"
    else:  # the learned classifier loads back into cbp_jax: the same classes
        back = predict.Segmenter.from_weights(config, str(tmp_path))
        np.testing.assert_array_equal(np.asarray(back.network(x)), ours)


def test_export_state_dict_inverts_the_import_tables():
    """Ours -> HF keys -> load_pretrained's forward tables: every variable maps back to
    itself with the same value."""
    config = _hf_config("linear")
    seg = predict.Segmenter(config, perturbed_state(config, seed=6))
    sd = export.hf_state_dict(seg)
    assert "segformer.encoder.block.0.0.attention.self.query.weight" in sd
    assert sd["segformer.encoder.patch_embeddings.0.proj.weight"].shape == (32, 3, 7, 7)
    model = seg.model()
    targets = weights.rules.targets(model)
    rules = weights.HF_MIT_V4 + weights.HF_SEGFORMER_HEAD
    for key, value in sd.items():
        stripped = key.removeprefix("segformer.")
        mapped = weights.rules.match(rules, stripped)
        assert mapped is not None, key
        for dst, fn in mapped:
            name = ("encoder." if key.startswith("segformer.") else "") + dst
            np.testing.assert_array_equal(fn(value), np.asarray(targets[name][...]), err_msg=key)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"head": "mmseg"}, "head='mmseg'.*--config.model.head=mlp"),
        ({"head": "mlp", "cbp_normalize_features": True}, "cosine classifier"),
    ],
)
def test_hf_export_refuses_what_transformers_cannot_hold(overrides, message):
    config = ml_collections.ConfigDict(_hf_config("cbp").to_dict())
    config.model.update(**overrides)
    with pytest.raises(ValueError, match=message):
        export.check_hf_exportable(config)
