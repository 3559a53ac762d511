"""Training library: optimizer recipes, schedules, the train state and the jitted steps.

The state is a plain pytree ``{"step", "nonfinite_steps", "params", "opt_state",
"model_state"}``: ``params``
are the model's ``nnx.Param`` leaves, ``model_state`` everything else NNX tracks (BatchNorm
statistics, dropout RNG counters, frozen prototypes). The model's graph definition is static
and closed over by the step functions.
"""

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from cbp_jax import classifier, losses
from cbp_jax.sharding import STACKED, path_name

State = dict[str, Any]

HEAD_MODULES = ("head", "classifier", "aux_head", "aux_classifier")
NORM_TYPES = (nnx.LayerNorm, nnx.BatchNorm, nnx.GroupNorm, nnx.RMSNorm)
# Norms whose mmseg name holds no "norm": MiT's stage-final LayerNorms (``layers.{i}.2``).
UNNAMED_NORMS = re.compile(r"^encoder/stages/\d+/norm/")


# ----------------------------------------------------------------------------- schedules


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """mmseg's schedule: linear warm-up from ``warmup_start_factor * lr``, then poly decay.

    ``lr(t) = lr * start + (lr - lr * start) * t / warmup`` for ``t < warmup``, then
    ``(lr - min_lr) * (1 - (t - warmup) / (total - warmup)) ** power + min_lr``.
    """
    warmup = int(cfg.warmup_steps)
    poly = optax.polynomial_schedule(
        init_value=cfg.lr,
        end_value=cfg.min_lr,
        power=cfg.poly_power,
        transition_steps=max(total_steps - warmup, 1),
    )
    if warmup <= 0:
        return poly
    ramp = optax.linear_schedule(cfg.lr * cfg.warmup_start_factor, cfg.lr, warmup)
    return optax.join_schedules([ramp, poly], [warmup])


# ----------------------------------------------------------------------------- param groups


def _norm_paths(model: nnx.Module) -> list[tuple]:
    return [tuple(path) for path, m in nnx.iter_modules(model) if isinstance(m, NORM_TYPES)]


def _convnext_layer_id(parts: tuple[str, ...], num_layers: int) -> int | None:
    """mmseg's stage-wise id for a ConvNeXt encoder parameter (None: not in the encoder)."""
    if parts[0] != "encoder":
        return None
    if parts[1] in ("stem_conv", "stem_norm"):
        return 0
    if parts[1] == "stages":
        return 0 if parts[3].startswith("down") else int(parts[2]) + 1
    return num_layers + 1  # output norms: new layers, trained at the head's rate


def param_groups(model: nnx.Module, params, cfg: ml_collections.ConfigDict):
    """Per-parameter learning-rate multipliers and weight-decay mask (pytrees like ``params``).

    - ``head_lr_mult`` for the decode head and classifiers (SegFormer recipe: x10);
    - ``layer_decay`` (ConvNeXt stage-wise, mmseg): ``decay ** (L + 1 - id)`` with id 0 for
      the stem and downsampling layers, ``i + 1`` for stage i, ``L + 1`` for the heads;
    - ``no_decay_norm``: no weight decay on normalization layers, exactly as mmseg's SegFormer
      recipe (``custom_keys={'head': lr_mult 10, 'norm': decay_mult 0}``) does it: keys match
      mmseg's parameter names by substring, 'head' first, so the heads' norms ARE decayed
      (at the head's rate), and so are MiT's stage-final norms, named ``layers.{i}.2``;
    - ``no_decay_1d``: no weight decay on any 1-D parameter (biases, norms, layer scales;
      mmseg's ``LearningRateDecayOptimizerConstructor`` for ConvNeXt);
    - ``no_decay_names``: no weight decay on parameters whose path contains one of these
      names (mmseg's Swin recipe: ``relative_position_bias_table``).
    """
    norm_paths = _norm_paths(model)

    def group(path, leaf):
        parts = tuple(str(p) for p in path_name(path).split("/"))
        is_head = parts[0] in HEAD_MODULES
        lr_mult = cfg.head_lr_mult if is_head else 1.0
        if cfg.layer_decay:
            layer_id = _convnext_layer_id(parts, cfg.layer_decay_num_layers)
            layer_id = cfg.layer_decay_num_layers + 1 if layer_id is None else layer_id
            lr_mult *= cfg.layer_decay ** (cfg.layer_decay_num_layers + 1 - layer_id)
        in_norm = any(parts[: len(p)] == tuple(map(str, p)) for p in norm_paths)
        mmseg_norm = in_norm and not is_head and not UNNAMED_NORMS.match("/".join(parts))
        named = any(name in parts for name in cfg.get("no_decay_names", ()))
        block_ndim = np.ndim(leaf) - (STACKED in parts)  # a stacked block's own ndim
        decay = not (cfg.no_decay_norm and mmseg_norm) and not (cfg.no_decay_1d and block_ndim <= 1)
        decay = decay and not named
        return float(lr_mult), bool(decay)

    groups = jax.tree_util.tree_map_with_path(group, params)
    lr_mults = jax.tree_util.tree_map(
        lambda g: g[0], groups, is_leaf=lambda x: isinstance(x, tuple)
    )
    decay_mask = jax.tree_util.tree_map(
        lambda g: g[1], groups, is_leaf=lambda x: isinstance(x, tuple)
    )
    return lr_mults, decay_mask


def group_labels(lr_mults, decay_mask) -> tuple[Any, dict[str, tuple[float, bool]]]:
    """``optax.partition`` labels: ``"group_i"`` per distinct (lr multiplier, decay) pair.

    Returns the labels (a pytree like ``lr_mults``) and ``{label: (lr_mult, decay)}``; groups
    are numbered in sorted (lr_mult, decay) order.
    """
    pairs = zip(jax.tree.leaves(lr_mults), jax.tree.leaves(decay_mask), strict=True)
    names = {pair: f"group_{i}" for i, pair in enumerate(sorted(set(pairs)))}
    labels = jax.tree.map(lambda m, d: names[(m, d)], lr_mults, decay_mask)
    return labels, {name: pair for pair, name in names.items()}


def make_optimizer(
    model: nnx.Module, params, cfg: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """AdamW (transformers) or SGD with momentum (convolutional models), mmseg param groups.

    Each parameter group (:func:`param_groups`, :func:`group_labels`) is one branch of
    ``optax.partition``: decoupled decay as in PyTorch, ``p -= lr * mult * (adam(g) + wd * p)``,
    for AdamW; L2 decay added to the gradient before momentum for SGD. Gradient clipping
    (global norm) comes first, over all groups. The schedule's learning rate goes through
    ``optax.inject_hyperparams``, so the state holds the rate of the last update
    (:func:`current_lr`).
    """
    lr_mults, decay_mask = param_groups(model, params, cfg)
    labels, groups = group_labels(lr_mults, decay_mask)
    if cfg.name not in ("adamw", "sgd"):
        raise ValueError(f"optimizer.name={cfg.name!r}; use 'adamw' or 'sgd'.")

    def group(lr_mult: float, decay: bool, learning_rate) -> optax.GradientTransformation:
        wd = optax.add_decayed_weights(cfg.weight_decay) if decay else optax.identity()
        if cfg.name == "adamw":
            core = [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps), wd]
        else:
            core = [wd, optax.trace(decay=cfg.momentum, nesterov=False)]
        return optax.chain(*core, optax.scale(lr_mult), optax.scale_by_learning_rate(learning_rate))

    def build(learning_rate) -> optax.GradientTransformation:
        # The clipping slot is always there (stateless either way), so turning clip_norm on
        # when resuming after a non-finite stop keeps the optimizer state's layout.
        clip = (
            optax.clip_by_global_norm(cfg.clip_norm) if cfg.get("clip_norm") else optax.identity()
        )
        branches = {name: group(*pair, learning_rate) for name, pair in groups.items()}
        return optax.chain(clip, optax.partition(branches, labels))

    return optax.inject_hyperparams(build)(learning_rate=learning_rate_schedule(cfg, total_steps))


def current_lr(opt_state) -> jax.Array:
    """The base learning rate of the last update (before any group's multiplier), from the
    state of :func:`make_optimizer`; the first step's rate before any update."""
    return opt_state.hyperparams["learning_rate"]


# ----------------------------------------------------------------------------- state


def split_model(model: nnx.Module):
    """``(graphdef, params, model_state)``: params are ``nnx.Param``, the rest everything else."""
    return nnx.split(model, nnx.Param, ...)


def init_state(model: nnx.Module, tx: optax.GradientTransformation) -> State:
    """The initial train state for ``model`` and optimizer ``tx``."""
    _, params, model_state = split_model(model)
    return {
        "step": jnp.zeros((), jnp.int32),  # optimizer updates applied
        "nonfinite_steps": jnp.zeros((), jnp.int32),  # steps skipped for a NaN / inf
        "params": params,
        "opt_state": tx.init(params),
        "model_state": model_state,
    }


# ----------------------------------------------------------------------------- steps


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def keep_if_finite(finite: jax.Array, new, old):
    """``new`` where ``finite`` (a scalar bool) holds, else ``old``, leaf by leaf.

    An element-wise select that XLA fuses into the producers of ``new`` (the optimizer
    update), so the donated state buffers are updated in place; a ``lax.cond`` over the
    whole state measured slower (docs/benchmarks.md). Typed PRNG keys are constants of the
    step and pass through.
    """

    def select(n, o):
        if jax.dtypes.issubdtype(n.dtype, jax.dtypes.prng_key):
            return n
        return jnp.where(finite, n, o)

    return jax.tree.map(select, new, old)


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: losses.LossConfig
) -> Callable[[State, dict[str, jax.Array]], tuple[State, dict[str, jax.Array]]]:
    """``train_step(state, batch) -> (state, metrics)``, to be wrapped in ``jax.jit``.

    A step whose loss, gradient or updated parameters are not finite leaves the state
    untouched (the step counter too) and increments ``state["nonfinite_steps"]``, reported
    in the metrics, so the host can stop with the last good state at its next look. The
    metrics also hold ``lr``, the base learning rate the update used (:func:`current_lr`).
    """

    def train_step(state: State, batch: dict[str, jax.Array]):
        images, labels = batch["image"], batch["label"]
        key = jax.random.fold_in(jax.random.key(cfg.seed), state["step"])

        # copy=True: the step mutates the model (BatchNorm statistics, the update), and
        # `state` must keep its own values for a skipped, non-finite step.
        model = nnx.merge(graphdef, state["params"], state["model_state"], copy=True)

        def loss_fn(model):
            out = model(images, train=True)
            loss, metrics = losses.segmentation_loss(
                out, labels, model.classifier.class_weights(), cfg, key,
                view_map=batch.get("views"),
            )  # fmt: skip
            loss += model.classifier.orthogonality_loss()
            metrics["loss"] = loss
            return loss, (metrics, out["features"])

        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)
        (loss, (metrics, features)), grads = grad_fn(model)  # BatchNorm statistics updated
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        nnx.update(model, optax.apply_updates(state["params"], updates))
        classifier.update_prototypes(
            model.classifier, features, labels, ignore_index=cfg.ignore_index
        )
        _, params, model_state = split_model(model)

        new_state = {
            "step": state["step"] + 1,
            "nonfinite_steps": state["nonfinite_steps"],
            "params": params,
            "opt_state": opt_state,
            "model_state": model_state,
        }
        grad_norm, param_norm = _global_norm(grads), _global_norm(params)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
        new_state = keep_if_finite(finite, new_state, state)
        new_state["nonfinite_steps"] = state["nonfinite_steps"] + (~finite).astype(jnp.int32)
        metrics |= {"grad_norm": grad_norm, "param_norm": param_norm}
        metrics["lr"] = current_lr(opt_state)  # the base rate this update used
        metrics["nonfinite_steps"] = new_state["nonfinite_steps"]
        return new_state, metrics

    return train_step


def make_predict_fn(graphdef: nnx.GraphDef) -> Callable[[State, jax.Array], jax.Array]:
    """``predict(state, images (B, H, W, 3)) -> logits (B, H/4, W/4, N)`` in eval mode."""

    def predict(state: State, images: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, state["params"], state["model_state"])
        return model(images, train=False)["logits"]

    return predict
