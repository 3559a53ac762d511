"""SegFormer-B0 + CBP + OCCL on ADE20K, 40k iterations: the paper's ablation model (Table 3).

    python train.py --config configs/ade20k_mit_b0.py --workdir workdirs/ade20k_b0
    python train.py --config configs/ade20k_mit_b0.py:baseline ...   # learned classifier
    python train.py --config configs/ade20k_mit_b0.py:smoke ...      # seconds on a CPU

Table 3: baseline 33.4 / 44.4, CBP + OCCL 35.1 / 48.1 (mIoU / mAcc). Ablation settings:
T = 2 (Table 9), (lambda, phi) = (1, 0.3).
"""

from configs import common


def get_config(arg=None):
    c = common.base_config()
    common.segformer_recipe(c, "segformer_b0")
    c.total_steps = 40_000
    c.init_from = "nvidia/mit-b0"
    c.model.cbp_length = 2.0
    c.loss.update(centroid_weight=1.0, category_weight=0.3)
    return common.apply_variants(c, arg)
