"""The mesh evaluator: the same confusion matrix as the single-device path, on one process
with 8 devices and on two JAX processes (gloo on CPU), odd image counts and mixed sizes."""

import jax
import jax.numpy as jnp
import ml_collections
import multiprocess
import numpy as np
import pytest
from config_helpers import load_config
from data_helpers import make_ade20k
from flax import nnx

from cbp_jax import data, eval_lib, factories, inference, train_lib


def _config(root: str, num_devices: int = 0, **eval_overrides):
    config = load_config("ade20k_mit_b0", "smoke")
    config.data.update(root=root, num_workers=0)
    config.mesh.num_devices = num_devices
    config.eval.update(max_images=0, num_panels=0, **eval_overrides)
    return config


def _scenes_config(num_devices: int = 0):
    """Five generated scenes: an odd count, so the last chunk of 4 slots holds one image."""
    config = load_config("scenes_mit_b0", "smoke")
    config.data.update(scenes_num_images=5, num_workers=0)
    config.mesh.num_devices = num_devices
    config.eval.update(max_images=0, num_panels=0)
    return config


def _fresh_state(config):
    """A fresh (seeded) sharded train state: ``(mesh, setup, state)``."""
    mesh = factories.mesh_from_config(config)
    with jax.set_mesh(mesh):
        setup = factories.TrainSetup(config, mesh)
        return mesh, setup, setup.init_state()


def _evaluate_on_mesh(config, mesh, setup, state):
    source = factories.source_from_config(config, config.data.eval_split)
    evaluator = eval_lib.Evaluator(config, mesh, setup.state_shardings, source)
    result = evaluator(state, progress=False)
    if config.eval.mode == "slide":  # the run's later evaluations reuse every program
        assert evaluator(state, progress=False)["compilations"] == 0
    return result


def _mesh_metrics(config):
    """The Evaluator on a fresh (seeded) state over the config's mesh."""
    mesh, setup, state = _fresh_state(config)
    return _evaluate_on_mesh(config, mesh, setup, state), state


def _single_device_metrics(config, state):
    """Per-image evaluation on one device with a host copy of the state (mmseg's batch 1)."""
    host_state = jax.device_get({k: state[k] for k in ("params", "model_state")})
    device = jax.devices()[0]
    local_state = jax.device_put(host_state, device)
    predict = jax.jit(train_lib.make_predict_fn(factories.eval_graphdef(config)))
    source = factories.source_from_config(config, config.data.eval_split)
    transform = data.test_transform(tuple(config.data.test_scale))
    examples = [
        {"image": transform(source[i])["image"], "label": source[i]["label"]}
        for i in range(len(source))
    ]
    return eval_lib.evaluate(
        lambda images: predict(local_state, jax.device_put(images, device)),
        examples,
        num_classes=config.data.num_classes,
        settings=inference.Settings.from_config(config),
        progress=False,
    )


@pytest.fixture(scope="module")
def ade20k_run(tmp_path_factory):
    """Three ADE20K-layout images of three sizes (odd: one chunk of 8 slots, three padded
    batches) and a fresh state of the smoke SegFormer-B0 over the 8 devices."""
    root = tmp_path_factory.mktemp("ade20k")
    make_ade20k(str(root), n_train=1, n_val=3)
    config = _config(str(root / "ADEChallengeData2016"))
    return config, *_fresh_state(config)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode",
    [
        {"mode": "whole"},
        {"mode": "slide", "crop": (48, 48), "stride": (32, 32)},
        {"mode": "whole", "ratios": (0.75, 1.0), "flip": True},
    ],
    ids=["whole", "slide", "multiscale_flip"],
)
def test_mesh_evaluation_matches_the_single_device_path(ade20k_run, mode):
    config, mesh, setup, state = ade20k_run
    config = ml_collections.ConfigDict(config.to_dict())
    config.eval.update(**mode)
    got = _evaluate_on_mesh(config, mesh, setup, state)
    ref = _single_device_metrics(config, state)
    assert got["num_images"] == ref["num_images"] == 3
    assert ref["confusion_matrix"].sum() > 0
    np.testing.assert_array_equal(got["confusion_matrix"], ref["confusion_matrix"])
    for key in ("mIoU", "mAcc", "aAcc"):
        assert got[key] == ref[key]


def test_eval_batch_size_must_fill_the_mesh(tmp_path):
    config = _config(str(tmp_path), num_devices=8, batch_size=6)
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        eval_lib.eval_batch_size(config, factories.mesh_from_config(config))


_SCRIPT = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
import jax
import jax.numpy as jnp
from test_eval_lib import _mesh_metrics, _scenes_config

config = _scenes_config()
config.distributed.update(coordinator_address=f"localhost:{sys.argv[1]}", num_processes=2,
                          process_id=int(sys.argv[2]))
from cbp_jax import sharding
sharding.initialize_distributed(**config.distributed)
metrics, _ = _mesh_metrics(config)
print("RESULT" + json.dumps({"conf": metrics["confusion_matrix"].tolist(),
                             "num_images": metrics["num_images"], "mIoU": metrics["mIoU"]}))
jax.distributed.shutdown()
"""


@pytest.mark.slow
def test_two_processes_score_the_whole_split():
    # Process 1 holds no image of the last chunk and still joins its global batch. Mixed
    # image sizes are covered on 8 devices above (one compile per size is costly here).
    outs = [multiprocess.result(out) for out in multiprocess.run_processes(_SCRIPT)]
    assert outs[0] == outs[1]  # every process reads the same global matrix
    ref, _ = _mesh_metrics(_scenes_config(num_devices=4))  # one process, same 4 devices
    assert outs[0]["num_images"] == ref["num_images"] == 5
    np.testing.assert_array_equal(outs[0]["conf"], ref["confusion_matrix"])
    assert outs[0]["mIoU"] == ref["mIoU"]


def test_evaluation_computes_in_float32_whatever_the_training_dtype():
    config = load_config("scenes_mit_b0", "smoke")
    config.model.dtype = "bfloat16"
    _, params, model_state = train_lib.split_model(
        nnx.eval_shape(lambda: factories.model_from_config(config))
    )
    image = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)

    def compute_dtype(graphdef):
        def forward(params, model_state, x):  # the training state fits the graph as it is
            return nnx.merge(graphdef, params, model_state).encoder(x)[-1]

        return jax.eval_shape(forward, params, model_state, image).dtype

    assert compute_dtype(factories.eval_graphdef(config)) == jnp.float32
    config.eval.dtype = ""  # the training compute dtype
    assert compute_dtype(factories.eval_graphdef(config)) == jnp.bfloat16
