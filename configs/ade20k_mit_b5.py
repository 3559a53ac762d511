"""SegFormer-B5 + CBP + OCCL on ADE20K, 160k iterations (paper: 48.9 -> 49.9 mIoU).

    python train.py --config configs/ade20k_mit_b5.py --workdir workdirs/ade20k_b5
    python train.py --config configs/ade20k_mit_b5.py:640 ...    # crop 640, base (2048, 640)

Variants (comma-separated): ``640``, ``baseline``, ``smoke``.
"""

from configs import common


def get_config(arg=None):
    c = common.base_config()
    common.segformer_recipe(c, "segformer_b5")
    c.init_from = "nvidia/mit-b5"
    variants = [v for v in (arg or "").split(",") if v]
    if "640" in variants:
        c.data.update(crop_size=(640, 640), base_scale=(2048, 640), test_scale=(2048, 640))
        variants.remove("640")
    return common.apply_variants(c, ",".join(variants))
