"""UperNet + Swin-B + CBP + OCCL on ADE20K, 160k iterations (paper: 47.8 -> 48.5 mIoU).

Window 12 with the 384x384 ImageNet-22k weights, as mmseg's ADE20K Swin-B config.

python train.py --config configs/ade20k_swin_base.py --workdir workdirs/ade20k_swin_b
"""

from configs import common


def get_config(arg=None):
    c = common.base_config()
    common.upernet_swin_recipe(c, "upernet_swin_base")
    c.init_from = "microsoft/swin-base-patch4-window12-384-in22k"
    return common.apply_variants(c, arg)
