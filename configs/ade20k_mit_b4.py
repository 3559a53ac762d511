"""SegFormer-B4 + CBP + OCCL on ADE20K, 160k iterations, crop 512.

python train.py --config configs/ade20k_mit_b4.py --workdir workdirs/ade20k_b4
"""

from configs import common


def get_config(arg=None):
    c = common.base_config()
    common.segformer_recipe(c, "segformer_b4")
    c.init_from = "nvidia/mit-b4"
    return common.apply_variants(c, arg)
