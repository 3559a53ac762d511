"""Would a bucketed whole-image mode keep the metrics? Exact vs padded-to-bucket inference.

    python bench/bucketed_eval.py --workdir workdirs/camvid_b0 [--bucket 128]

Whole-image evaluation compiles one program per distinct test size (hundreds on ADE20K). A
bucketed mode would pad each test image bottom/right to the next multiple of ``--bucket``
(the model then sees the padding: normalized zeros), run the model and crop the logits back
to the unpadded output size. This evaluates the workdir's latest checkpoint on its eval
split both ways with the same mmseg metrics and prints both mIoU and the difference; the
mode is only worth offering if the difference stays within 0.1 mIoU on real data.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cbp_jax import cpu  # noqa: E402

cpu.use_cores_as_devices()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cbp_jax import data as data_lib  # noqa: E402
from cbp_jax import eval_lib, factories, sharding, train_lib  # noqa: E402


def padded_logits_fn(predict, bucket: int):
    """``predict`` (B, H, W, 3) -> (B, h, w, N) run on images padded to multiples of
    ``bucket``, its logits cropped to the unpadded input's output size."""

    def logits_fn(images):
        b, h, w, _ = images.shape
        hp, wp = -(-h // bucket) * bucket, -(-w // bucket) * bucket
        out = jax.eval_shape(predict, jax.ShapeDtypeStruct(images.shape, jnp.float32))
        padded = jnp.pad(jnp.asarray(images), ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
        return predict(padded)[:, : out.shape[1], : out.shape[2]]

    return logits_fn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--bucket", type=int, default=128)
    a = p.parse_args()
    config = factories.read_run_config(a.workdir)
    mesh = factories.mesh_from_config(config)
    with jax.set_mesh(mesh):
        step, model_state = factories.restore(config, a.workdir, mesh=mesh)
        batch = sharding.batch_sharding(mesh)
        jitted = jax.jit(train_lib.make_predict_fn(factories.eval_graphdef(config)))

        def predict(images):
            return jitted(model_state, jax.device_put(images, batch))

        source = factories.source_from_config(config, config.data.eval_split)
        transform = data_lib.test_transform(tuple(config.data.test_scale))
        results = {}
        for name, fn in (("exact", predict), ("bucketed", padded_logits_fn(predict, a.bucket))):
            with data_lib.make_eval_loader(
                source,
                transform,
                global_batch_size=eval_lib.eval_batch_size(config, mesh),
                mesh=mesh,
                data_axis=sharding.BATCH_AXES,
            ) as loader:
                results[name] = eval_lib.evaluate(
                    fn, loader, num_classes=config.data.num_classes, progress=False
                )
    ex, bu = results["exact"], results["bucketed"]
    print(f"{a.workdir} step {step}, {ex['num_images']} images of {config.data.eval_split}")
    print("| mode | mIoU | mAcc | aAcc |\n|---|---|---|---|")
    for name, r in results.items():
        label = name if name == "exact" else f"bucketed (multiples of {a.bucket})"
        print(f"| {label} | {r['mIoU']:.2f} | {r['mAcc']:.2f} | {r['aAcc']:.2f} |")
    print(f"mIoU difference (bucketed - exact): {bu['mIoU'] - ex['mIoU']:+.2f}")


if __name__ == "__main__":
    main()
