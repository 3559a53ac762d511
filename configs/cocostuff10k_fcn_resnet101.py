"""FCN + ResNet-101 (V1c, D8) + CBP + OCCL on COCO-Stuff-10K, 80k iterations (32.5 -> 33.0).

Weights as in ``ade20k_fcn_resnet101.py`` (mmcv's resnet101_v1c-e67eebb6.pth in weights/).

python train.py --config configs/cocostuff10k_fcn_resnet101.py --workdir workdirs/coco_fcn_r101
"""

from configs import common

RESNET101_V1C = "weights/resnet101_v1c-e67eebb6.pth"


def get_config(arg=None):
    c = common.base_config()
    common.fcn_recipe(c, "fcn_resnet101_d8")
    c.init_from = RESNET101_V1C
    c.model.cbp_length = 0.3  # T = 0.3 for FCN on COCO-Stuff (method.md)
    c.total_steps = 80_000
    c.data.update(dataset="cocostuff10k", root="data/coco_stuff10k", num_classes=171)
    c.data.update(train_split="train", eval_split="test")
    c.loss.update(centroid_weight=1.0, category_weight=0.3)
    return common.apply_variants(c, arg)
