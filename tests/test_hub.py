"""Hugging Face hub ids without the network: a cache folder laid out as huggingface_hub
writes it, holding a transformers-written checkpoint, and ``--config.init_from=ORG/NAME``
loads it through the hub code path (``hf_hub_download`` in offline mode)."""

import hashlib
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from config_helpers import load_config
from safetensors.numpy import load_file

from cbp_jax import export, factories

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ID = "cbp-test/mit-smoke"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(cache: str, repo_id: str, folder: str) -> str:
    """Lays the files of ``folder`` out in ``cache`` as ``huggingface_hub`` does after a
    download of ``repo_id`` at revision main: content-addressed blobs, ``refs/main`` holding
    the commit, and ``snapshots/<commit>/<file>`` links to the blobs. Returns the snapshot."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", COMMIT)
    os.makedirs(os.path.join(repo, "blobs"))
    os.makedirs(os.path.join(repo, "refs"))
    os.makedirs(snapshot)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(COMMIT)
    for name in sorted(os.listdir(folder)):
        data = open(os.path.join(folder, name), "rb").read()
        blob = hashlib.sha256(data).hexdigest()
        with open(os.path.join(repo, "blobs", blob), "wb") as f:
            f.write(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snapshot, name))
    return snapshot


@pytest.mark.slow
def test_init_from_a_hub_id_loads_from_the_offline_cache(tmp_path):
    """train.py with --config.init_from=ORG/NAME, the network off (HF_HUB_OFFLINE=1) and the
    cache laid out by hand: the run starts from the cached SegformerModel's encoder (one step
    at a learning rate of 1e-12 keeps it there)."""
    import torch
    import transformers

    config = load_config("scenes_mit_b0", "smoke")
    encoder = factories.model_from_config(config).encoder.config
    hf_config = export.segformer_config(encoder, 32, config.data.num_classes)
    torch.manual_seed(0)
    written = tmp_path / "written"
    transformers.SegformerModel(hf_config).save_pretrained(written)
    snapshot = write_hub_cache(str(tmp_path / "hub"), REPO_ID, str(written))
    assert sorted(os.listdir(snapshot)) == ["config.json", "model.safetensors"]

    workdir = tmp_path / "run"
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
               os.path.join(ROOT, "configs", "scenes_mit_b0.py:smoke"), "--workdir", str(workdir),
               f"--config.init_from={REPO_ID}", "--config.total_steps=1",
               "--config.optimizer.lr=1e-12", "--config.optimizer.warmup_steps=0",
               "--config.data.scenes_num_images=8", "--config.eval.max_images=1"]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf_home"))
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "HF transformers SegFormer" in output, output[-3000:]

    _, restored = factories.restore(config, str(workdir), 1)
    patch = restored["params"]["encoder"]["stages"][0]["patch_embed"]["proj"]["kernel"][...]
    tensors = load_file(os.path.join(snapshot, "model.safetensors"))
    (key,) = [k for k in tensors if k.endswith("patch_embeddings.0.proj.weight")]
    expected = tensors[key].transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
    np.testing.assert_allclose(np.asarray(jax.device_get(patch)), expected, atol=1e-6)
