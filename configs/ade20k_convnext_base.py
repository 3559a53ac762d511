"""UperNet + ConvNeXt-B + CBP + OCCL on ADE20K, 160k iterations (paper: 48.9 -> 49.6 mIoU).

python train.py --config configs/ade20k_convnext_base.py --workdir workdirs/ade20k_cnb
"""

from configs import common


def get_config(arg=None):
    c = common.base_config()
    common.upernet_convnext_recipe(c, "upernet_convnext_base", drop_path=0.4)
    c.init_from = "facebook/convnext-base-224"
    c.model.cbp_length = 2.0  # the paper's default T; only Swin and SegFormer use 1 on ADE20K
    return common.apply_variants(c, arg)
