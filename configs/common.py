"""Shared pieces of the experiment configs: the defaults and the paper's two recipes.

Each experiment file in this folder is one row of the paper; it starts from
``base_config()``, applies a recipe and ends with ``apply_variants(config, arg)``.
"""

from typing import Any

import ml_collections

from cbp_jax.losses import LossConfig
from cbp_jax.models import ModelConfig

VARIANTS = ("smoke", "baseline", "paper")


# The ModelConfig / LossConfig fields an experiment config carries (with their defaults).
_MODEL_FIELDS = (
    "classifier",
    "cbp_length",
    "cbp_update",
    "cbp_init",
    "cbp_normalize_features",
    "cbp_ema_momentum",
    "cbp_penalty_weight",
)
_LOSS_FIELDS = (
    "occl",
    "tau",
    "centroid_weight",
    "category_weight",
    "views",
    "aux_weight",
    "ce_average",
)


def base_config() -> ml_collections.ConfigDict:
    """Every field a run reads, with the SegFormer-on-ADE20K values of the paper."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 160_000
    c.batch_size = 16  # global, over all devices and hosts (mmseg: 8 GPUs x 2)
    c.init_from = ""  # pretrained encoder: local file or hub id (e.g. "nvidia/mit-b5")
    c.trust_pickle = False  # let an init_from .pth with non-tensor objects run its pickle code

    # model: `name` + overrides of cbp_jax.models.create
    c.model = ml_collections.ConfigDict()
    c.model.name = "segformer_b0"
    # classifier: "cbp" (frozen prototypes) | "linear" (learned baseline); cbp_length: T
    # (Table 9); cbp_update: "frozen" | "gradient" | "ema" | "penalty" (Table 4); cbp_init:
    # "equal_ortho" | "ortho" | "equal" (Table 5). Defaults: cbp_jax.models.ModelConfig.
    for name in _MODEL_FIELDS:
        c.model[name] = getattr(ModelConfig, name)
    c.model.drop_path_rate = 0.1
    c.model.dtype = "bfloat16"  # compute dtype; parameters stay float32
    # remat: recompute encoder block activations in the backward pass (saves memory on
    # GPU/TPU; XLA:CPU merges the recomputation back): False / "" off, True the whole block
    # ("nothing_saveable"), or a jax.checkpoint policy naming what each block keeps:
    # "dots_saveable", "dots_with_no_batch_dims_saveable" (cbp_jax.models.layers).
    # (Any type: --config.model.remat takes True, False and the policy names alike.)
    c.model.remat = ml_collections.FieldReference(False, field_type=object)
    # scan_blocks: each stage's repeated encoder blocks stacked (a leading block axis on their
    # parameters) and applied by one jax.lax.scan, so the step compiles one body per stage
    # instead of every block; remat applies to that body. The same weights either way:
    # importers, exports and eval/predict restores convert between the layouts.
    c.model.scan_blocks = ModelConfig.scan_blocks

    # data (cbp_jax.data)
    c.data = ml_collections.ConfigDict()
    c.data.dataset = "ade20k"
    c.data.root = "data/ADEChallengeData2016"
    c.data.format = "folder"  # "folder" | "arrayrecord" | "tfds"
    c.data.num_classes = 150
    c.data.train_split = "train"
    c.data.eval_split = "val"
    c.data.crop_size = (512, 512)
    c.data.base_scale = (2048, 512)  # (long, short) of the random resize
    c.data.ratio_range = (0.5, 2.0)
    c.data.cat_max_ratio = 0.75
    c.data.test_scale = (2048, 512)
    c.data.aligned_resize = False  # NVlabs' AlignedResize at test time
    c.data.num_workers = 4  # grain worker processes per host
    c.data.skip_bad_examples = False
    c.data.scenes_num_images = 0  # "scenes" only: images per split (0: its default)

    # loss (Eq. 7)
    # occl; tau; centroid_weight: lambda; category_weight: phi; views: "batch_halves" |
    # "random_pixels" | "objects" (the paper's split, half the objects of each class per view:
    # cbp_jax/data/views.py); aux_weight: the auxiliary FCN head's CE; ce_average: the CE
    # divided by "all" pixels of the batch, ignored ones included (mmseg's default,
    # avg_non_ignore=False, which the paper trained with) or by the "labelled" ones.
    # Defaults: losses.LossConfig.
    c.loss = ml_collections.ConfigDict({name: getattr(LossConfig, name) for name in _LOSS_FIELDS})
    # views="objects": a class with one object in a crop goes whole to one random view
    # ("one_view") or has its pixels split at random ("split_pixels").
    c.loss.single_object = "one_view"

    # optimizer and schedule (mmseg SegFormer recipe)
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"  # "adamw" | "sgd"
    c.optimizer.lr = 6e-5
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.momentum = 0.9  # sgd
    c.optimizer.weight_decay = 0.01
    c.optimizer.head_lr_mult = 10.0
    c.optimizer.no_decay_norm = True
    c.optimizer.no_decay_1d = False
    c.optimizer.layer_decay = 0.0  # ConvNeXt stage-wise decay rate (0: off)
    c.optimizer.layer_decay_num_layers = 12
    c.optimizer.no_decay_names = ()  # parameter names with no weight decay (Swin: bias tables)
    c.optimizer.warmup_steps = 1500
    c.optimizer.warmup_start_factor = 1e-6
    c.optimizer.poly_power = 1.0
    c.optimizer.min_lr = 0.0
    c.optimizer.clip_norm = 0.0  # 0: no clipping (mmseg's recipes do not clip)

    # devices: mesh axes ("data", "fsdp"); -1 takes the remaining devices
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "num_devices": 0})  # 0: all
    # (regex on the parameter path, rule): "replicate" | "fsdp" | "None,fsdp,..."
    c.partition_rules = (
        (r"(^|/)(head|classifier|aux_head|aux_classifier)/", "replicate"),  # small; whole
        (".*", "fsdp"),
    )
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # empty: auto-detect (TPU pods, SLURM) or 1 process
    c.distributed.num_processes = 0
    c.distributed.process_id = -1

    # checkpoints, logging, evaluation
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 4000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    c.log_every = 50
    # XLA's compiled programs are kept here so a rerun (resume, eval.py) compiles nothing it
    # compiled before: "workdir" (<workdir>/compilation_cache), a path, or "" (off).
    c.compilation_cache = "workdir"
    # A gs:// workdir's lock is a lease its run renews every workdir_lease_timeout / 4 s; a
    # lease without a heartbeat for workdir_lease_timeout s is a dead run's, taken over.
    c.workdir_lease_timeout = 300.0
    c.eval = ml_collections.ConfigDict()
    c.eval.every = 16000  # 0: only at the end
    c.eval.mode = "whole"  # "whole" | "slide"
    c.eval.crop = (512, 512)
    c.eval.stride = (341, 341)
    c.eval.ratios = (1.0,)
    c.eval.flip = False
    c.eval.batch_size = 0  # global images per evaluation step; 0: one per device
    c.eval.dtype = "float32"  # compute dtype at test time (mmseg: float32); "": model.dtype
    c.eval.max_images = 0  # 0: the whole split
    c.eval.num_panels = 8
    c.eval.frequency_groups = 3  # Fig. 5: F1 by class-frequency groups (paper: 15 on ADE20K)
    return c


def segformer_recipe(c: ml_collections.ConfigDict, name: str) -> None:
    """mmseg SegFormer: AdamW 6e-5, wd 0.01, head lr x10, no decay on norms, whole inference."""
    c.model.name = name
    c.model.head = "mmseg"  # the 256-wide conv+BN+ReLU head the paper builds on
    c.model.norm_eps = 1e-6
    c.optimizer.update(lr=6e-5, weight_decay=0.01, head_lr_mult=10.0, layer_decay=0.0)
    c.optimizer.update(no_decay_norm=True, no_decay_1d=False)
    c.eval.mode = "whole"
    c.loss.update(centroid_weight=1.0, category_weight=0.1)


def upernet_convnext_recipe(c: ml_collections.ConfigDict, name: str, drop_path: float) -> None:
    """mmseg UperNet-ConvNeXt: AdamW 1e-4, wd 0.05, stage-wise decay 0.9, slide inference."""
    c.model.name = name
    c.model.drop_path_rate = drop_path
    c.optimizer.update(lr=1e-4, weight_decay=0.05, head_lr_mult=1.0, layer_decay=0.9)
    c.optimizer.update(layer_decay_num_layers=12, no_decay_norm=True, no_decay_1d=True)
    c.eval.update(mode="slide", crop=(512, 512), stride=(341, 341))
    c.loss.update(centroid_weight=1.0, category_weight=0.2, aux_weight=0.4)


def upernet_swin_recipe(c: ml_collections.ConfigDict, name: str) -> None:
    """mmseg UperNet-Swin: AdamW 6e-5, wd 0.01 (none on norms and relative position bias
    tables), drop-path 0.3, whole inference."""
    c.model.name = name
    c.model.drop_path_rate = 0.3
    c.model.cbp_length = 1.0  # T = 1 for Swin (method.md)
    c.optimizer.update(lr=6e-5, weight_decay=0.01, head_lr_mult=1.0, layer_decay=0.0)
    c.optimizer.update(no_decay_norm=True, no_decay_1d=False)
    c.optimizer.no_decay_names = ("relative_position_bias_table",)
    c.eval.mode = "whole"
    c.loss.update(centroid_weight=1.0, category_weight=0.2, aux_weight=0.4)


def fcn_recipe(c: ml_collections.ConfigDict, name: str) -> None:
    """mmseg FCN-D8: SGD lr 0.01, momentum 0.9, wd 5e-4 on every parameter, no warm-up,
    poly power 0.9 down to 1e-4, whole inference; no stochastic depth."""
    c.model.name = name
    c.model.drop_path_rate = 0.0
    c.optimizer.update(name="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4)
    c.optimizer.update(head_lr_mult=1.0, layer_decay=0.0, no_decay_norm=False, no_decay_1d=False)
    c.optimizer.update(warmup_steps=0, poly_power=0.9, min_lr=1e-4)
    c.eval.mode = "whole"
    c.loss.update(centroid_weight=0.4, category_weight=0.1, aux_weight=0.4)


def apply_variants(
    c: ml_collections.ConfigDict, arg: str | None, paper: dict[str, Any] | None = None
) -> ml_collections.ConfigDict:
    """Applies the comma-separated variants in ``arg``: ``smoke``, ``baseline``, ``paper``.

    ``baseline``: the learned 1x1 classifier and no OCCL (the paper's "reimpl." column).
    ``smoke``: tiny and CPU-fast, the same code path (a few steps on tiny crops).
    ``paper``: the paper's choices where the config's defaults depart from them: ``paper``
    maps dotted fields to the paper's values (a config that departs nowhere passes none).
    """
    for variant in [v for v in (arg or "").split(",") if v]:
        if variant == "baseline":
            c.model.classifier = "linear"
            c.loss.occl = False
        elif variant == "smoke":
            smoke(c)
        elif variant == "paper":
            for key, value in (paper or {}).items():
                *parents, leaf = key.split(".")
                target = c
                for part in parents:
                    target = target[part]
                if leaf not in target:
                    raise ValueError(f"paper={{{key!r}: ...}}: the config has no field {key}.")
                target[leaf] = value
        elif variant not in VARIANTS:
            raise ValueError(f"unknown config variant {variant!r}; known: {VARIANTS}")
    return c


def smoke(c: ml_collections.ConfigDict) -> None:
    """Seconds on a CPU: tiny crops, a handful of steps, small eval, float32."""
    c.total_steps = 6
    c.batch_size = 4
    c.init_from = ""  # offline: no hub download in a smoke run
    c.model.dtype = "float32"
    c.model.drop_path_rate = 0.0
    c.model.depths = (1, 1, 1, 1)  # same architecture family, one block per stage
    c.data.crop_size = (64, 64)
    c.data.base_scale = (256, 64)
    c.data.test_scale = (128, 64)
    c.data.num_workers = 0
    c.optimizer.warmup_steps = 2
    c.checkpoint.every = 3
    c.log_every = 1
    c.eval.every = 0
    c.eval.max_images = 4
    c.eval.num_panels = 2
    c.eval.crop = (64, 64)
    c.eval.stride = (48, 48)
