"""The built-in default: SegFormer-B0 + CBP + OCCL on the generated 'scenes' data set.

    python train.py                      # = --config configs/scenes_mit_b0.py

Needs no download (cbp_jax.data makes the images); a short CPU run (a few minutes) that
trains, checkpoints, evaluates and writes a report with example panels.
"""

from configs import common


def get_config(arg=None):
    c = common.base_config()
    common.segformer_recipe(c, "segformer_b0")
    c.init_from = ""
    c.total_steps = 300
    c.batch_size = 8
    c.model.dtype = "float32"
    c.model.depths = (1, 1, 1, 1)
    c.model.drop_path_rate = 0.0
    c.model.cbp_length = 2.0
    c.data.update(dataset="scenes", root="", num_classes=8, scenes_num_images=0)
    c.data.update(crop_size=(96, 96), base_scale=(160, 120), ratio_range=(0.75, 1.25))
    c.data.update(test_scale=(160, 120), num_workers=0, train_split="train", eval_split="val")
    c.optimizer.update(lr=1e-3, warmup_steps=20, head_lr_mult=1.0)
    c.checkpoint.every = 100
    c.log_every = 10
    c.eval.update(every=0, max_images=64, num_panels=4)
    return common.apply_variants(c, arg)
