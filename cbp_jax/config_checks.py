"""Config validation at the edge: ``--config`` overrides and field values, checked before a
run starts, each problem named with its field, its value and the fix.

    args = config_checks.parse_flags(argv)      # app.run(main, flags_parser=...)
    config_checks.validate(config)              # raises ConfigError listing every problem
"""

import difflib
import importlib.util
import math
import os
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import app, flags


class ConfigError(ValueError):
    """One or more config fields have values a run cannot use."""


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def _non_negative(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x >= 0


def _fraction(x) -> bool:  # [0, 1)
    return isinstance(x, int | float) and 0 <= x < 1


def _pair_of_positive_ints(x) -> bool:
    return isinstance(x, list | tuple) and len(x) == 2 and all(_positive(v) for v in x)


def _one_of(*choices) -> Callable[[Any], bool]:
    return lambda x: x in choices


def _remat_setting(x) -> bool:
    from cbp_jax.models.layers import REMAT_POLICIES  # jax: imported only when checking

    return isinstance(x, bool) or x == "" or x in REMAT_POLICIES


# Fields whose valid values include True / False (elsewhere a bool is never a number).
_BOOL_FIELDS = ("model.remat", "model.scan_blocks")


# (field, predicate, what a valid value is). Only fields a run reads before its first step
# are here; model fields are checked by cbp_jax.models.create (remat and scan_blocks also
# here, before a model is built).
RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("total_steps", lambda x: isinstance(x, int) and x >= 1, "an integer >= 1"),
    ("batch_size", lambda x: isinstance(x, int) and x >= 1, "an integer >= 1"),
    ("log_every", lambda x: isinstance(x, int) and x >= 1, "an integer >= 1"),
    ("compilation_cache", lambda x: isinstance(x, str), "'workdir', a folder path or '' (off)"),
    ("workdir_lease_timeout", _positive, "a number of seconds > 0 (default 300)"),
    ("optimizer.name", _one_of("adamw", "sgd"), "'adamw' or 'sgd'"),
    ("optimizer.lr", _positive, "a finite number > 0 (e.g. 6e-5 for AdamW, 0.01 for SGD)"),
    ("optimizer.min_lr", _non_negative, "a number >= 0 and below optimizer.lr"),
    ("optimizer.weight_decay", _non_negative, "a number >= 0"),
    ("optimizer.b1", _fraction, "a number in [0, 1)"),
    ("optimizer.b2", _fraction, "a number in [0, 1)"),
    ("optimizer.eps", _positive, "a number > 0"),
    ("optimizer.momentum", _fraction, "a number in [0, 1)"),
    ("optimizer.head_lr_mult", _positive, "a number > 0"),
    ("optimizer.layer_decay", lambda x: _non_negative(x) and x <= 1, "a number in [0, 1]"),
    ("optimizer.warmup_steps", lambda x: isinstance(x, int) and x >= 0, "an integer >= 0"),
    ("optimizer.warmup_start_factor", lambda x: _non_negative(x) and x <= 1, "in [0, 1]"),
    ("optimizer.poly_power", _positive, "a number > 0"),
    ("optimizer.clip_norm", _non_negative, "a number >= 0 (0: no clipping)"),
    ("data.format", _one_of("folder", "arrayrecord", "tfds"), "'folder', 'arrayrecord' or 'tfds'"),
    ("data.num_classes", lambda x: isinstance(x, int) and x >= 1, "an integer >= 1"),
    ("data.crop_size", _pair_of_positive_ints, "(height, width), both > 0"),
    ("data.base_scale", _pair_of_positive_ints, "(long side, short side), both > 0"),
    ("data.test_scale", _pair_of_positive_ints, "(long side, short side), both > 0"),
    (
        "data.ratio_range",
        lambda x: _pair_of_positive_ints(x) and x[0] <= x[1],
        "(low, high) with 0 < low <= high",
    ),
    ("data.cat_max_ratio", lambda x: _positive(x) and x <= 1, "a number in (0, 1]"),
    ("data.num_workers", lambda x: isinstance(x, int) and x >= 0, "an integer >= 0"),
    ("loss.tau", _positive, "a number > 0 (the paper: 0.07)"),
    ("loss.centroid_weight", _non_negative, "a number >= 0"),
    ("loss.category_weight", _non_negative, "a number >= 0"),
    (
        "loss.views",
        _one_of("batch_halves", "random_pixels", "objects"),
        "'batch_halves', 'random_pixels' or 'objects'",
    ),
    ("loss.single_object", _one_of("one_view", "split_pixels"), "'one_view' or 'split_pixels'"),
    ("loss.ce_average", _one_of("all", "labelled"), "'all' (mmseg) or 'labelled'"),
    ("checkpoint.every", lambda x: isinstance(x, int) and x >= 1, "an integer >= 1"),
    ("checkpoint.keep", lambda x: isinstance(x, int) and x >= 1, "an integer >= 1"),
    ("eval.every", lambda x: isinstance(x, int) and x >= 0, "an integer >= 0 (0: at the end)"),
    ("eval.mode", _one_of("whole", "slide"), "'whole' or 'slide'"),
    ("eval.batch_size", lambda x: isinstance(x, int) and x >= 0, "an integer >= 0 (0: per device)"),
    (
        "eval.ratios",
        lambda x: isinstance(x, list | tuple) and len(x) > 0 and all(_positive(r) for r in x),
        "a non-empty tuple of scales > 0, e.g. (1.0,) or (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)",
    ),
    ("eval.dtype", _one_of("", "float32", "bfloat16", "float16"), "'float32' or '' (model.dtype)"),
    (
        "model.remat",
        _remat_setting,
        "False or '' (off), True (recompute each block, = 'nothing_saveable') or a "
        "jax.checkpoint policy: 'nothing_saveable', 'dots_saveable' or "
        "'dots_with_no_batch_dims_saveable'",
    ),
    ("model.scan_blocks", lambda x: isinstance(x, bool), "True or False"),
)


def _get(config: ml_collections.ConfigDict, name: str):
    value = config
    for part in name.split("."):
        value = value[part]
    return value


def problems(config: ml_collections.ConfigDict) -> list[str]:
    """One line per invalid field: ``config.FIELD=VALUE: must be ...; pass --config.FIELD=...``."""
    out = []
    for name, valid, expected in RULES:
        try:
            value = _get(config, name)
        except (KeyError, AttributeError):
            continue  # a config without this field does not use it
        if (isinstance(value, bool) and name not in _BOOL_FIELDS) or not valid(value):
            out.append(f"config.{name}={value!r}: must be {expected}; fix --config.{name}=...")
    opt = config.get("optimizer")
    if opt is not None and _positive(opt.get("lr")) and _non_negative(opt.get("min_lr")):
        if opt.min_lr > opt.lr:
            out.append(
                f"config.optimizer.min_lr={opt.min_lr!r} is above config.optimizer.lr="
                f"{opt.lr!r}: the poly schedule would raise the rate; lower min_lr."
            )
    return out


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` listing every invalid field of ``config``."""
    found = problems(config)
    if found:
        raise ConfigError("invalid config:\n  " + "\n  ".join(found))


# ----------------------------------------------------------------------------- overrides


def field_names(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every field of ``config`` as a dotted path (``optimizer.lr``, ...)."""
    out = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out += field_names(value, f"{name}.")
        else:
            out.append(name)
    return out


def nearest_fields(name: str, fields: list[str], n: int = 5) -> list[str]:
    """Up to ``n`` names in ``fields`` spelled like ``name`` (whole path or last part)."""
    leaf = name.rsplit(".", 1)[-1]
    by_path = difflib.get_close_matches(name, fields, n=n, cutoff=0.6)
    by_leaf = [f for f in fields if difflib.get_close_matches(leaf, [f.rsplit(".", 1)[-1]])]
    return list(dict.fromkeys(by_path + by_leaf))[:n]


def unknown_override_message(argv: list[str], config: ml_collections.ConfigDict) -> str | None:
    """The message for the first ``--config.FIELD=...`` in ``argv`` naming no field."""
    fields = field_names(config)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        name = arg[len("--config.") :].split("=", 1)[0]
        if name in fields or any(f.startswith(name + ".") for f in fields):
            continue
        near = nearest_fields(name, fields)
        hint = f"nearest: {', '.join(near)}" if near else "configs/common.py lists every field"
        return f"--config.{name}: the config has no field {name!r} ({hint})."
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for ``app.run(main, flags_parser=parse_flags)``. Exits with one
    line for a config file that does not load (its file:line and error, or the variants it
    knows) and for an override of a field that does not exist (naming the nearest ones)."""
    if "config" in flags.FLAGS:
        problem = config_file_problem(_config_spec_in(argv))  # the default one loads
        if problem:
            raise SystemExit(f"error: {problem}")
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        message = None
        if "config" in flags.FLAGS:
            config = _config_named_in(argv, flags.FLAGS["config"].default)
            message = unknown_override_message(argv, config)
        raise SystemExit(f"error: {message or e}") from None


def _config_spec_in(argv: list[str]) -> str | None:
    """The ``FILE[:ARG]`` of ``--config`` in ``argv`` (None without one)."""
    spec = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
        elif arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
    return spec


def _config_named_in(argv: list[str], default) -> ml_collections.ConfigDict:
    """The config ``--config FILE[:ARG]`` in ``argv`` names (the flag's ``default`` config
    without one)."""
    spec = _config_spec_in(argv)
    return default if spec is None else load_config_file(spec)


def config_file_problem(spec: str | None) -> str | None:
    """One line saying why ``--config FILE[:ARG]`` does not give a config, or None: the file
    is missing, does not compile (file:line and the error), or its ``get_config(ARG)``
    raises (an unknown variant: the known ones)."""
    if not spec:
        return None
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        return f"--config {spec}: no such file {path}."
    try:
        load_config_file(spec)
    except SyntaxError as e:
        return f"--config {spec}: {e.filename}:{e.lineno}: {type(e).__name__}: {e.msg}"
    except Exception as e:  # noqa: BLE001 - the config's own error, said in one line
        return f"--config {spec}: {type(e).__name__}: {e}"
    return None


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """The config of ``FILE[:ARG]`` (as ``--config`` takes it): ``FILE``'s ``get_config(ARG)``."""
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant or None)
