"""FCN + ResNet-101 (V1c, D8) + CBP + OCCL on ADE20K, 160k iterations (39.9 -> 41.2 mIoU).

The ImageNet weights are mmcv's ResNetV1c (not on the Hugging Face hub): download
https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth to weights/
(or pass --config.init_from=PATH). torchvision's ResNet-101 does not fit (7x7 stem).

python train.py --config configs/ade20k_fcn_resnet101.py --workdir workdirs/ade20k_fcn_r101
"""

from configs import common

RESNET101_V1C = "weights/resnet101_v1c-e67eebb6.pth"


def get_config(arg=None):
    c = common.base_config()
    common.fcn_recipe(c, "fcn_resnet101_d8")
    c.init_from = RESNET101_V1C
    # ADE20K: "the length is set as 2 by default", 1 only for Swin and SegFormer.
    c.model.cbp_length = 2.0
    return common.apply_variants(c, arg)
