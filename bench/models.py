"""Parameters, FLOPs and forward time of every segmentor; depthwise-conv formulations.

    python bench/models.py                       # all segmentors, 512x512, 150 classes
    python bench/models.py --models segformer_b0 --size 256 --repeats 3
    python bench/models.py --dwconv              # 'xla' vs 'shifted' depthwise convs only
    python bench/models.py --formulations --dtype bfloat16   # + 1x1 and patchify convs
    python bench/models.py --resize              # bilinear resize: dense matrices vs ours
    python bench/models.py --ce-bands            # upsampled CE: whole vs bands of rows

FLOPs come from XLA's cost analysis of the jitted eval forward (batch 1); XLA counts a
multiply-add as 2 FLOPs, while the paper's "GFLOPs" (mmcv) count multiply-adds, so the
table shows both (GMACs = XLA FLOPs / 2). Times are medians after one compile + warm-up run.
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # cbp_jax
from cbp_jax import losses, model_stats, models, resize  # noqa: E402
from cbp_jax.models import kernels  # noqa: E402

PAPER = {
    "segformer_b5": "82.1 M / 75.6 (SegFormer-B5 + ours, Table 2)",
    "upernet_swin_base": "121 M (UperNet Swin-B, Swin paper Table 3)",
}


def _median_time(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # warm-up (compiled already)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_segmentors(names, size, num_classes, repeats, classifier):
    print(f"| model | params (M) | XLA GFLOPs | GMACs | forward {size}x{size} (s) | paper |")
    print("|---|---|---|---|---|---|")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, size, size, 3)), jnp.float32)
    for name in names:
        model = models.create(
            name, num_classes=num_classes, classifier=classifier, rngs=nnx.Rngs(0)
        )
        params = model_stats.parameter_count(nnx.state(model, nnx.Param))
        graphdef, state = nnx.split(model)

        @jax.jit
        def forward(state, x, graphdef=graphdef):
            return nnx.merge(graphdef, state)(x, train=False)["logits"]

        compiled = forward.lower(state, x).compile()
        flops = model_stats.xla_flops(compiled)
        secs = _median_time(compiled, state, x, repeats=repeats) if repeats else float("nan")
        print(
            f"| {name} | {params / 1e6:.2f} | {flops / 1e9:.1f} | {flops / 2e9:.1f} | "
            f"{secs:.2f} | {PAPER.get(name, '')} |",
            flush=True,
        )
        del model, state, compiled


def _timed_grad(loss, *args, repeats):
    """Median seconds of a jitted forward + backward of ``loss`` and the input gradient."""
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return _median_time(fn, *args, repeats=repeats), fn(*args)[1][0]


def _diff(a, b):
    return float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max())


def bench_dwconv(repeats, dtype=jnp.float32, shapes=None):
    """``kernels.depthwise_conv2d``: XLA's grouped conv against the sum of shifted slices."""
    print(
        f"| depthwise conv, fwd+bwd, {jnp.dtype(dtype).name} | xla (ms) | shifted (ms) | "
        "max abs diff |"
    )
    print("|---|---|---|---|")
    rng = np.random.default_rng(0)
    shapes = shapes or (((2, 128, 128, 128), 3), ((2, 128, 128, 96), 7), ((8, 64, 64, 256), 3))
    for shape, k in shapes:
        x = jnp.asarray(rng.normal(size=shape), dtype)
        w = jnp.asarray(rng.normal(size=(k, k, 1, shape[-1])), dtype)
        b = jnp.zeros((shape[-1],), dtype)
        res = {}
        for impl in ("xla", "shifted"):

            def loss(x, w, b, impl=impl, k=k):
                y = kernels.depthwise_conv2d(x, w, b, padding=k // 2, impl=impl)
                return jnp.sum(y.astype(jnp.float32) ** 2)

            res[impl] = _timed_grad(loss, x, w, b, repeats=repeats)
        print(
            f"| {shape} k={k} | {res['xla'][0] * 1e3:.2f} | {res['shifted'][0] * 1e3:.2f} | "
            f"{_diff(res['xla'][1], res['shifted'][1]):.1e} |",
            flush=True,
        )


DENSE_CASES = (  # (input, k == stride, Cout): 1x1 fuse/laterals, MiT SR, ConvNeXt stem/downsampling
    ((8, 128, 128, 1024), 1, 256),
    ((8, 128, 128, 256), 1, 256),
    ((8, 128, 128, 64), 8, 64),
    ((8, 512, 512, 3), 4, 128),
    ((8, 128, 128, 128), 2, 256),
)


def bench_dense_convs(repeats, dtype=jnp.float32, cases=DENSE_CASES):
    """``kernels.conv2d``'s matmul forms (1x1 as an einsum, kernel == stride as an einsum over
    patches) against ``lax.conv_general_dilated`` on the same inputs, forward + backward."""
    print(
        f"| conv, fwd+bwd, {jnp.dtype(dtype).name} | conv_general_dilated (ms) | "
        "kernels.conv2d einsum (ms) | max abs diff |"
    )
    print("|---|---|---|---|")
    rng = np.random.default_rng(0)
    for shape, k, cout in cases:
        x = jnp.asarray(rng.normal(size=shape), dtype)
        w = jnp.asarray(
            rng.normal(size=(k, k, shape[-1], cout)) / np.sqrt(k * k * shape[-1]), dtype
        )

        def loss_xla(x, w, k=k):
            y = jax.lax.conv_general_dilated(
                x, w, (k, k), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            return jnp.sum(y.astype(jnp.float32) ** 2)

        def loss_einsum(x, w, k=k):
            return jnp.sum(kernels.conv2d(x, w, stride=k).astype(jnp.float32) ** 2)

        t_xla, g_xla = _timed_grad(loss_xla, x, w, repeats=repeats)
        t_ein, g_ein = _timed_grad(loss_einsum, x, w, repeats=repeats)
        print(
            f"| {shape} {k}x{k}/{k} -> {cout} | {t_xla * 1e3:.2f} | {t_ein * 1e3:.2f} | "
            f"{_diff(g_xla, g_ein):.1e} |",
            flush=True,
        )


def _dense_resize(x, size, axes):
    """The resize as two dense (n_out, n_in) matrix products (the form before 2026-11-26)."""
    for axis, n_out in zip(axes, size, strict=True):
        m = jnp.asarray(resize.bilinear_matrix(x.shape[axis], n_out), x.dtype)
        x = jnp.moveaxis(jnp.tensordot(m, x, axes=(1, axis)), 0, axis)
    return x


RESIZE_CASES = (  # (input, size, axes, with gradient)
    ((8, 11, 64, 64), (256, 256), (2, 3), True),  # CamVid training logits, channels-first
    ((2, 150, 128, 128), (512, 512), (2, 3), True),  # ADE20K training logits
    ((1, 128, 171, 150), (512, 683), (1, 2), False),  # ADE20K eval: logits -> test size
    ((1, 512, 683, 150), (375, 500), (1, 2), False),  # ... -> original size
    ((1, 512, 800, 150), (730, 1140), (1, 2), False),
)


def bench_resize(repeats, cases=RESIZE_CASES):
    """``resize.resize_bilinear`` against the dense-matrix form, float32."""
    print("| input -> size | pass | dense matrices (ms) | ours (ms) | max abs diff |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for shape, size, axes, grad in cases:
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        res = {}
        for name, fn in (("dense", _dense_resize), ("ours", resize.resize_bilinear)):

            def resized(x, fn=fn, size=size, axes=axes):
                return fn(x, size, axes=axes)

            if grad:
                f = jax.jit(jax.grad(lambda x, resized=resized: jnp.sum(resized(x) ** 2)))
            else:
                f = jax.jit(resized)
            res[name] = (_median_time(f, x, repeats=repeats), f(x))
        print(
            f"| {shape} -> {size} | {'fwd+bwd' if grad else 'fwd'} | "
            f"{res['dense'][0] * 1e3:.0f} | {res['ours'][0] * 1e3:.0f} | "
            f"{_diff(res['dense'][1], res['ours'][1]):.1e} |",
            flush=True,
        )


CE_CASES = (  # (B, h, w, N) logits -> label size
    ((8, 64, 64, 11), (256, 256)),  # --quick / CamVid-like
    ((2, 128, 128, 150), (512, 512)),  # ADE20K, batch 2 (the CPU figures)
    ((8, 128, 128, 150), (512, 512)),  # ADE20K, batch 8 (the GPU figures)
)
CE_BANDS_MB = (None, 256, 64, 16, 4, 2)  # None: the whole image at once


def bench_ce_bands(repeats, cases=CE_CASES, bands_mb=CE_BANDS_MB):
    """``losses.upsampled_cross_entropy`` forward + backward, whole against bands of rows
    of the float32 upsampled logits: time and the compiled temporaries."""
    print(f"backend {jax.default_backend()}: default bands {losses.ce_band_bytes() >> 20} MB")
    print("| logits -> labels | bands (MB) | fwd+bwd (ms) | temporaries (MB) | max abs diff |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for shape, size in cases:
        logits = jnp.asarray(rng.normal(size=shape), jnp.float32)
        labels = jnp.asarray(rng.integers(0, shape[-1], (shape[0], *size)), jnp.int32)
        whole_mb = shape[0] * shape[-1] * size[0] * size[1] * 4 / 2**20
        reference = None
        for mb in bands_mb:
            if mb is not None and mb >= whole_mb:
                continue
            band_bytes = 1 << 62 if mb is None else mb << 20

            def loss(z, labels=labels, band_bytes=band_bytes):
                return losses.upsampled_cross_entropy(z, labels, band_bytes=band_bytes)

            f = jax.jit(jax.value_and_grad(loss))
            temps = f.lower(logits).compile().memory_analysis().temp_size_in_bytes / 2**20
            secs, (_, grad) = _median_time(f, logits, repeats=repeats), f(logits)
            reference = grad if reference is None else reference
            print(
                f"| {shape} -> {size} | {'whole' if mb is None else mb} | {secs * 1e3:.0f} | "
                f"{temps:.1f} | {_diff(grad, reference):.1e} |",
                flush=True,
            )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(models.SEGMENTORS))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--num-classes", type=int, default=150)
    ap.add_argument("--classifier", default="cbp", choices=("cbp", "linear"))
    ap.add_argument("--repeats", type=int, default=3, help="timed runs; 0 skips timing")
    ap.add_argument("--dwconv", action="store_true", help="only the depthwise-conv comparison")
    ap.add_argument(
        "--formulations", action="store_true", help="depthwise, 1x1 and patchify conv forms"
    )
    ap.add_argument("--dtype", default="float32", help="for --dwconv / --formulations")
    ap.add_argument("--resize", action="store_true", help="only the bilinear-resize comparison")
    ap.add_argument("--ce-bands", action="store_true", help="only the banded-CE comparison")
    args = ap.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
    dtype = jnp.dtype(args.dtype)
    if args.resize:
        bench_resize(max(args.repeats, 1))
        return
    if args.ce_bands:
        bench_ce_bands(max(args.repeats, 1))
        return
    if args.dwconv or args.formulations:
        bench_dwconv(max(args.repeats, 1), dtype)
    if args.formulations:
        bench_dwconv(
            max(args.repeats, 1),
            dtype,
            (((8, 128, 128, 256), 3), ((8, 32, 32, 1280), 3), ((8, 128, 128, 128), 7)),
        )
        bench_dense_convs(max(args.repeats, 1), dtype)
    if args.dwconv or args.formulations:
        return
    bench_segmentors(args.models, args.size, args.num_classes, args.repeats, args.classifier)


if __name__ == "__main__":
    main()
