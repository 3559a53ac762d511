"""An ADE20K-sized validation pass: images/s and XLA compilations, cold and warm.

    python bench/ade_eval.py                      # 32 images, SegFormer-B0, whole mode
    python bench/ade_eval.py --images 64 --config configs/ade20k_mit_b5.py

Writes generated images in the exact ADE20K layout (``ADEChallengeData2016/images/
validation``, JPEG; 150-class PNG labels) with ADE20K's spread of sizes, then evaluates a
fresh (untrained: speed does not depend on the weights) model of ``--config`` on them with
the run's ``Evaluator`` twice: the first pass compiles one program per distinct test size
(whole mode resizes every image to short side 512, long side at most 2048, so the sizes
follow the aspect ratios), the second reuses them, as periodic evaluations of one run do.

The size spread is a stated assumption, not read off ADE20K (docs/reference.md has no size
table): short side uniform in [384, 768]; 40 % landscape 4:3, 15 % portrait 3:4, 10 %
square, 35 % any aspect ratio in [0.5, 2.0].
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cbp_jax import cpu  # noqa: E402

cpu.use_cores_as_devices()

import cv2  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from cbp_jax import config_checks, eval_lib, factories, inference  # noqa: E402


def ade20k_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` original (h, w) sizes with the spread of the module docstring."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(4, size=n, p=[0.40, 0.15, 0.10, 0.35])
    aspects = np.where(
        kinds == 0, 4 / 3, np.where(kinds == 1, 3 / 4, np.where(kinds == 2, 1.0, 0.0))
    )
    aspects = np.where(kinds == 3, rng.uniform(0.5, 2.0, size=n), aspects)  # w / h
    short = rng.integers(384, 769, size=n)
    return [
        (int(s), int(round(s * a))) if a >= 1 else (int(round(s / a)), int(s))
        for s, a in zip(short, aspects, strict=True)
    ]


def write_ade20k_validation(root: str, sizes: list[tuple[int, int]], seed: int = 0) -> str:
    """``root/ADEChallengeData2016`` with one validation image per size (and one training
    image, which the layout requires); labels are 0..150 blocks (0 is ignored)."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "ADEChallengeData2016")
    for folder, folder_sizes in (("training", sizes[:1]), ("validation", sizes)):
        os.makedirs(os.path.join(base, "images", folder), exist_ok=True)
        os.makedirs(os.path.join(base, "annotations", folder), exist_ok=True)
        for i, (h, w) in enumerate(folder_sizes):
            name = f"ADE_{'train' if folder == 'training' else 'val'}_{i + 1:08d}"
            small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            image = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
            cv2.imwrite(os.path.join(base, "images", folder, name + ".jpg"), image)
            grid = rng.integers(0, 151, (8, 8), dtype=np.uint8)
            label = cv2.resize(grid, (w, h), interpolation=cv2.INTER_NEAREST)
            cv2.imwrite(os.path.join(base, "annotations", folder, name + ".png"), label)
    return base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/ade20k_mit_b0.py", help="FILE[:ARG]")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--passes", type=int, default=2)
    a = p.parse_args()
    sizes = ade20k_sizes(a.images)
    config = config_checks.load_config_file(a.config)
    scale = tuple(config.data.test_scale)
    test_sizes = {tuple((inference.eval_resize_sizes(hw, scale=scale) or [hw])[-1]) for hw in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        config.data.update(root=write_ade20k_validation(tmp, sizes), num_workers=0)
        config.eval.update(max_images=0, num_panels=0)
        mesh = factories.mesh_from_config(config)
        print(
            f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices); "
            f"{config.model.name}, eval mode {config.eval.mode}, {config.eval.dtype}; "
            f"{a.images} images, {len(test_sizes)} distinct test sizes",
            flush=True,
        )
        with jax.set_mesh(mesh):
            setup = factories.TrainSetup(config, mesh)
            state = setup.init_state()
            source = factories.source_from_config(config, config.data.eval_split)
            evaluator = eval_lib.Evaluator(config, mesh, setup.state_shardings, source)
            print("| pass | seconds | images/s | compilations |\n|---|---|---|---|")
            for i in range(a.passes):
                t = time.perf_counter()
                result = evaluator(state, progress=False)
                secs = time.perf_counter() - t
                print(
                    f"| {i + 1} | {secs:.1f} | {result['num_images'] / secs:.2f} | "
                    f"{result['compilations']} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
