"""SegFormer-B5 + CBP + OCCL on COCO-Stuff-10K, 80k iterations (paper: 43.4 -> 44.9 mIoU).

python train.py --config configs/cocostuff10k_mit_b5.py --workdir workdirs/coco_b5
"""

from configs import common


def get_config(arg=None):
    c = common.base_config()
    common.segformer_recipe(c, "segformer_b5")
    c.init_from = "nvidia/mit-b5"
    c.total_steps = 80_000
    c.data.update(dataset="cocostuff10k", root="data/coco_stuff10k", num_classes=171)
    c.data.update(train_split="train", eval_split="test")
    return common.apply_variants(c, arg)
