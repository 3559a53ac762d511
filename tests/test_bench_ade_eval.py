"""bench/ade_eval.py: ADE20K-sized validation images in the exact ADE20K layout."""

import numpy as np
from config_helpers import load_bench, load_config

from cbp_jax import factories, inference

bench = load_bench("ade_eval")


def test_sizes_follow_the_stated_spread():
    sizes = bench.ade20k_sizes(400)
    assert sizes == bench.ade20k_sizes(400)  # seeded
    short = np.array([min(hw) for hw in sizes])
    aspect = np.array([w / h for h, w in sizes])
    assert short.min() >= 384 and short.max() <= 768
    assert aspect.min() >= 0.5 - 1e-2 and aspect.max() <= 2.0 + 1e-2
    share_43 = np.mean(np.abs(aspect - 4 / 3) < 4e-3)
    assert 0.33 < share_43 < 0.5, share_43
    # Whole mode's test sizes: short side 512, so the distinct sizes follow the aspects.
    tests = {
        tuple((inference.eval_resize_sizes(hw, scale=(2048, 512)) or [hw])[-1]) for hw in sizes
    }
    assert all(min(t) == 512 for t in tests)
    assert len(tests) > 100


def test_generated_validation_split_reads_as_ade20k(tmp_path):
    sizes = [(40, 53), (60, 45), (48, 48)]
    root = bench.write_ade20k_validation(str(tmp_path), sizes)
    config = load_config("ade20k_mit_b0", "smoke")
    config.data.root = root
    source = factories.source_from_config(config, "val")
    assert len(source) == 3
    for i, (h, w) in enumerate(sizes):
        example = source[i]
        assert example["image"].shape == (h, w, 3)
        assert example["label"].shape == (h, w)
        labels = np.unique(example["label"])
        assert labels.max() < 150 or labels.max() == 255  # 0 -> ignore, 1..150 -> 0..149
