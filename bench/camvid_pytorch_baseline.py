"""Recipe fidelity of the learned baseline: the same recipe trained in PyTorch (issue 10).

    nice -n 5 python bench/camvid_pytorch_baseline.py --workdir W --steps 300 --seed 0 \\
        [--root /work/shared/datasets/camvid] [--threads 2] [--config FILE:ARG]

Trains transformers' ``SegformerForSemanticSegmentation`` from scratch with the recipe of
``configs/camvid_mit_b0.py:baseline`` (loaded as train.py loads it; ``--config.FIELD=...``
overrides work the same) and evaluates it with our evaluation code:

- model: SegFormer-B0 (hidden sizes 32/64/160/256, depths 2/2/2/2, decoder 256, drop path
  0.1), sized from the config's ``model`` fields and our MiT variant table;
- data: the batches of our loader (``cbp_jax.data.make_train_loader``, same config values
  and seed), so the batch order and every augmentation are those of ``train.py``;
- optimizer: AdamW with mmseg's parameter groups as ``train_lib.param_groups`` forms them
  (head lr x ``head_lr_mult``, no weight decay on encoder norms except MiT's stage-final
  ones) and the learning rate of ``train_lib.learning_rate_schedule`` at every step;
- loss: CE on logits bilinearly upsampled (``align_corners=False``) to the label size,
  ignore 255, divided per ``config.loss.ce_average`` (``"all"``: by every pixel);
- evaluation: ``eval_lib.evaluate`` over our eval loader (the same test transform, logits
  upsampled as ours are, ``cbp_jax.metrics``); ``W/eval/report.json`` is written by
  ``report.write_report`` with ``extra={"step", "framework": "pytorch"}``.

``W/checkpoint.pt`` (model, optimizer, step, loader state, torch RNG) is written every
``--checkpoint_every`` steps and at the end; rerunning the same command resumes from it.
``W/metrics.jsonl`` holds the loss and learning rate every ``config.log_every`` steps.

What differs from ``train.py`` (transformers' model as it ships):

- initialization: transformers draws every Linear and Conv2d weight from N(0, 0.02) with
  zero biases; ours draws Linear kernels from a truncated N(0, 0.02), conv kernels from a
  He-normal fan-out (the 7x7 patch embedding: std 0.036, the depthwise 3x3 convs: 0.47)
  and the classifier from N(0, 0.01);
- decode head: transformers' all-MLP head (a Linear per stage, element-wise dropout)
  where the baseline config's ``model.head="mmseg"`` has conv+BN+ReLU per stage and
  channel dropout; train.py with ``--config.model.head=mlp`` builds our twin of this head;
- LayerNorm eps: 1e-5 in transformers, ``config.model.norm_eps`` (1e-6) in ours.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # cbp_jax

import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from cbp_jax import data as data_lib  # noqa: E402
from cbp_jax import eval_lib, export, factories, inference, metrics, report, train_lib  # noqa: E402
from cbp_jax.logs import JsonlWriter  # noqa: E402
from cbp_jax.models import ModelConfig  # noqa: E402

CHECKPOINT = "checkpoint.pt"
IGNORE_INDEX = data_lib.IGNORE_INDEX
NORM_TYPES = (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)
# MiT's stage-final LayerNorms: mmseg names them ``layers.{i}.2`` (no "norm" in the name),
# so its ``custom_keys={'norm': decay_mult 0}`` leaves them decayed (train_lib.UNNAMED_NORMS).
STAGE_FINAL_NORM = re.compile(r"^segformer\.stages\.\d+\.layer_norm$")
HEAD_PREFIX = "decode_head"


# ----------------------------------------------------------------------------- model


def check_recipe(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError unless ``config`` is a learned SegFormer baseline this script mirrors."""
    m, o = config.model, config.optimizer
    problems = []
    if not m.name.startswith("segformer_"):
        problems.append(f"config.model.name={m.name!r}: only segformer_b* models are mirrored")
    if m.classifier != "linear" or config.loss.occl:
        problems.append(
            f"config.model.classifier={m.classifier!r}, config.loss.occl={config.loss.occl}: "
            "this is the learned baseline; load the config with its ':baseline' variant"
        )
    if (m.dtype or "float32") != "float32":
        problems.append(f"config.model.dtype={m.dtype!r}: PyTorch trains in float32; set float32")
    if o.name != "adamw" or o.layer_decay:
        problems.append(
            f"config.optimizer.name={o.name!r}, layer_decay={o.layer_decay}: only AdamW "
            "without layer decay (the SegFormer recipe) is mirrored"
        )
    if problems:
        raise ValueError("config not mirrored by this script:\n  " + "\n  ".join(problems))


def hf_config(config: ml_collections.ConfigDict) -> transformers.SegformerConfig:
    """transformers' SegformerConfig with the encoder our ``config`` builds and the width
    of our twin of transformers' head (``model.head="mlp"``)."""
    encoder = nnx.eval_shape(lambda: factories.model_from_config(config)).encoder.config
    model_fields = {k: v for k, v in config.model.items() if k in ModelConfig.field_names()}
    width = ModelConfig(**(model_fields | {"head": "mlp"})).resolved_head_width(config.model.name)
    return export.segformer_config(
        encoder, width, config.data.num_classes, dropout=config.model.get("dropout", 0.1)
    )


def create_model(
    config: ml_collections.ConfigDict, init: str = "hf"
) -> transformers.SegformerForSemanticSegmentation:
    """transformers' segmentor (seed ``config.seed``), initialized as transformers does it
    (``init="hf"``: every Linear and Conv2d weight N(0, 0.02)) or as NVlabs / mmseg and
    cbp_jax do (``init="mmseg"``, :func:`mmseg_init`)."""
    torch.manual_seed(config.seed)
    model = transformers.SegformerForSemanticSegmentation(hf_config(config))
    if init == "mmseg":
        mmseg_init(model)
    elif init != "hf":
        raise ValueError(f"init must be 'hf' or 'mmseg', got {init!r}.")
    return model


@torch.no_grad()
def mmseg_init(model: nn.Module) -> None:
    """NVlabs SegFormer's init (which ours follows): Linear weights truncated N(0, 0.02),
    convs He fan-out N(0, 2 / (k * k * out / groups)) -- std 0.47 for the 3x3 depthwise
    convs instead of transformers' 0.02 --, norms 1 / 0, biases 0, classifier N(0, 0.01)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
        elif isinstance(module, nn.Conv2d):
            k0, k1 = module.kernel_size
            fan_out = k0 * k1 * module.out_channels // module.groups
            module.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(module, NORM_TYPES):
            module.weight.fill_(1.0)
        if getattr(module, "bias", None) is not None and not isinstance(module, NORM_TYPES):
            module.bias.zero_()
        elif isinstance(module, NORM_TYPES) and module.bias is not None:
            module.bias.zero_()
    model.decode_head.classifier.weight.normal_(0.0, 0.01)


# ----------------------------------------------------------------------------- optimizer


def param_groups(model: nn.Module, opt: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """torch parameter groups with ``train_lib.param_groups``' multipliers and decay mask.

    Each group holds ``lr_mult`` (the head's ``head_lr_mult``, else 1) and its
    ``weight_decay`` (``opt.weight_decay``, or 0 for encoder norms other than the stage-final
    ones with ``no_decay_norm``, 1-D parameters with ``no_decay_1d`` and parameters with a
    name part in ``no_decay_names``).
    """
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            parts = f"{module_name}.{param_name}".split(".")
            is_head = parts[0] == HEAD_PREFIX
            mmseg_norm = (
                isinstance(module, NORM_TYPES)
                and not is_head
                and not STAGE_FINAL_NORM.match(module_name)
            )
            decay = not (opt.no_decay_norm and mmseg_norm) and not (
                opt.no_decay_1d and param.ndim <= 1
            )
            decay = decay and not any(n in parts for n in opt.get("no_decay_names", ()))
            key = (float(opt.head_lr_mult) if is_head else 1.0, decay)
            groups.setdefault(key, []).append(param)
    return [
        {"params": params, "lr_mult": mult, "weight_decay": opt.weight_decay if decay else 0.0}
        for (mult, decay), params in sorted(groups.items())
    ]


def make_optimizer(model: nn.Module, opt: ml_collections.ConfigDict) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; :func:`set_learning_rate` sets each step's rate."""
    return torch.optim.AdamW(
        param_groups(model, opt), lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps
    )


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Sets every group's rate to ``lr`` times its ``lr_mult``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]


# ----------------------------------------------------------------------------- loss


def upsampled_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, average: str = "all"
) -> torch.Tensor:
    """CE of ``logits`` (B, N, h, w) bilinearly upsampled to ``labels`` (B, H, W), pixels
    ``IGNORE_INDEX`` left out, the sum divided by ``"all"`` pixels or the ``"labelled"`` ones
    (``losses.upsampled_cross_entropy``)."""
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if average == "all":
        return total / labels.numel()
    if average == "labelled":
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)
    raise ValueError(f"config.loss.ce_average={average!r}; use 'all' or 'labelled'.")


# ----------------------------------------------------------------------------- checkpoints


def _run_key(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What a checkpoint must share with the run resuming it."""
    return {"total_steps": config.total_steps, "seed": config.seed, "batch_size": config.batch_size}


def save_checkpoint(path: str, model, optimizer, step: int, loader_state: dict, key: dict) -> None:
    """Writes the run's state to ``path`` atomically (a kill mid-write keeps the old one)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "loader": loader_state,
        "torch_rng": torch.get_rng_state(),
        "run": key,
    }
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path: str, model, optimizer, key: dict) -> tuple[int, dict | None]:
    """Restores ``path`` into ``model`` and ``optimizer``; ``(step, loader state)``, or
    ``(0, None)`` when there is no checkpoint."""
    if not os.path.exists(path):
        return 0, None
    state = torch.load(path, weights_only=False)
    if state["run"] != key:
        raise ValueError(
            f"{path} belongs to a run with {state['run']}, not {key}; rerun with the same "
            "--steps/--seed/config or use another --workdir."
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), state["loader"]


# ----------------------------------------------------------------------------- evaluation


def evaluate(model: nn.Module, config: ml_collections.ConfigDict, source) -> dict[str, Any]:
    """``eval_lib.evaluate`` of the torch ``model`` (eval mode, float32) on ``source`` with
    the config's test transform and inference mode, as ``eval_lib.Evaluator`` runs it."""
    d, e = config.data, config.eval
    model.eval()

    def logits_fn(images):  # (B, h, w, 3) -> (B, h/4, w/4, N)
        x = torch.from_numpy(np.array(images, np.float32)).permute(0, 3, 1, 2)
        with torch.no_grad():
            logits = model(pixel_values=x).logits
        return jnp.asarray(logits.permute(0, 2, 3, 1).numpy())

    transform = data_lib.test_transform(tuple(d.test_scale), aligned=d.aligned_resize)
    with data_lib.make_eval_loader(
        source,
        transform,
        global_batch_size=e.batch_size or 1,
        num_examples=e.max_images or None,
        num_workers=d.num_workers,
    ) as loader:
        return eval_lib.evaluate(
            logits_fn,
            loader,
            num_classes=d.num_classes,
            settings=inference.Settings.from_config(config),
        )


# ----------------------------------------------------------------------------- training


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    threads: int = 2,
    checkpoint_every: int = 100,
    init: str = "hf",
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Trains ``config``'s baseline in PyTorch in ``workdir`` (resuming), then evaluates.

    Args:
      config: a learned-baseline config (``configs/camvid_mit_b0.py:baseline``).
      workdir: checkpoint, ``metrics.jsonl`` and ``eval/report.json``.
      threads: torch intra-op threads.
      checkpoint_every: steps between checkpoints (the last step is always saved).
      stop_after: stop once this step is trained and saved, as an interrupted run would.

    Returns:
      ``{"step", "losses" (by step), "seconds" (training of this call)}`` and, when the run
      reached ``config.total_steps``, ``"eval"`` (the metrics of :func:`evaluate`).
    """
    check_recipe(config)
    torch.set_num_threads(threads)
    os.makedirs(workdir, exist_ok=True)
    d, total = config.data, config.total_steps
    model = create_model(config, init)
    optimizer = make_optimizer(model, config.optimizer)
    key = _run_key(config)
    start, loader_state = load_checkpoint(os.path.join(workdir, CHECKPOINT), model, optimizer, key)
    if start:
        print(f"Resuming from step {start} of {os.path.join(workdir, CHECKPOINT)}")
    last = total if stop_after is None else min(stop_after, total)
    losses: dict[int, float] = {}
    began = time.perf_counter()
    if start < last:
        source = factories.source_from_config(config, d.train_split)
        transform = data_lib.train_transform(
            tuple(d.crop_size), tuple(d.base_scale), tuple(d.ratio_range), d.cat_max_ratio
        )
        with data_lib.make_train_loader(
            source,
            transform,
            global_batch_size=config.batch_size,
            seed=config.seed,
            num_workers=d.num_workers,
        ) as loader:
            if loader_state is not None:
                loader.set_state(loader_state)
            losses = _train_steps(config, workdir, model, optimizer, loader, start, last,
                                  checkpoint_every, key)  # fmt: skip
    seconds = time.perf_counter() - began
    summary: dict[str, Any] = {"step": max(start, last), "losses": losses, "seconds": seconds}
    if summary["step"] < total:
        return summary
    source = factories.source_from_config(config, d.eval_split)
    result = evaluate(model, config, source)
    out = os.path.join(workdir, "eval", "report.json")
    report.write_report(
        out, result, source.class_names, extra={"step": total, "framework": "pytorch"}
    )
    print(metrics.format_class_table(result, source.class_names))
    print(
        f"step {total}: mIoU {result['mIoU']:.2f}  mAcc {result['mAcc']:.2f}  "
        f"aAcc {result['aAcc']:.2f}  (report: {out})"
    )
    summary["eval"] = {k: result[k] for k in ("mIoU", "mAcc", "aAcc")}
    return summary


def _train_steps(config, workdir, model, optimizer, loader, start, last, every, key):
    """Steps ``start + 1 .. last``; returns the logged losses by step."""
    total = config.total_steps
    path = os.path.join(workdir, CHECKPOINT)
    jsonl = os.path.join(workdir, "metrics.jsonl")
    JsonlWriter(jsonl, resume_step=start).close()  # drops the rows after start
    schedule = train_lib.learning_rate_schedule(config.optimizer, total)
    losses = {}
    model.train()
    began = time.perf_counter()
    with open(jsonl, "a") as log:
        for step in range(start + 1, last + 1):
            batch = next(loader)
            images = torch.from_numpy(np.array(batch["image"], np.float32)).permute(0, 3, 1, 2)
            labels = torch.from_numpy(np.array(batch["label"], np.int64))
            # optax evaluates the schedule at the count of updates already applied.
            lr = float(schedule(step - 1))
            set_learning_rate(optimizer, lr)
            logits = model(pixel_values=images).logits
            loss = upsampled_cross_entropy(logits, labels, config.loss.ce_average)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.optimizer.clip_norm:
                nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.clip_norm)
            optimizer.step()
            value = float(loss.detach())
            if not np.isfinite(value):
                raise FloatingPointError(
                    f"non-finite loss {value} at step {step}; the checkpoint in {path} is "
                    "kept. Lower --config.optimizer.lr or set --config.optimizer.clip_norm=1.0."
                )
            if step % config.log_every == 0 or step == last:
                losses[step] = value
                log.write(json.dumps({"step": step, "loss": value, "lr": lr}) + "\n")
                log.flush()
                rate = (time.perf_counter() - began) / (step - start)
                print(
                    f"step {step}/{total}  loss {value:.4f}  lr {lr:.2e}  {rate:.2f} s/step",
                    flush=True,
                )
            if step % every == 0 or step == last:
                save_checkpoint(path, model, optimizer, step, loader.get_state(), key)
    return losses


# ----------------------------------------------------------------------------- command line


def main(argv) -> None:
    from absl import flags, logging

    del argv
    f = flags.FLAGS
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config = f.config
    config.total_steps = f.steps or config.total_steps
    config.seed = config.seed if f.seed is None else f.seed
    config.data.root = f.root or config.data.root
    from cbp_jax import config_checks

    config_checks.validate(config)
    began = time.perf_counter()
    summary = train_and_evaluate(
        config, f.workdir, threads=f.threads, checkpoint_every=f.checkpoint_every, init=f.init
    )
    print(f"wall time {time.perf_counter() - began:.0f} s (training {summary['seconds']:.0f} s)")


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    here = os.path.dirname(os.path.abspath(__file__))
    default = os.path.join(os.path.dirname(here), "configs", "camvid_mit_b0.py") + ":baseline"
    config_flags.DEFINE_config_file("config", default, "Experiment config file (FILE:ARG).")
    flags.DEFINE_string("workdir", None, "Checkpoint, metrics and eval/report.json.")
    flags.DEFINE_integer("steps", None, "Training steps (default: config.total_steps).")
    flags.DEFINE_integer("seed", None, "Data and init seed (default: config.seed).")
    flags.DEFINE_string("root", None, "CamVid folder (default: config.data.root).")
    flags.DEFINE_integer("threads", 2, "torch intra-op threads.")
    flags.DEFINE_integer("checkpoint_every", 100, "Steps between checkpoints.")
    flags.DEFINE_enum("init", "hf", ["hf", "mmseg"], "transformers' init or NVlabs/mmseg's.")
    flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
    from absl import app

    from cbp_jax import config_checks

    _define_flags()
    app.run(main, flags_parser=config_checks.parse_flags)
