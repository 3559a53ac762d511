"""Parameters, FLOPs and forward time of every segmentor; depthwise-conv formulations.

    python bench/models.py                       # all segmentors, 512x512, 150 classes
    python bench/models.py --models segformer_b0 --size 256 --repeats 3
    python bench/models.py --dwconv              # 'xla' vs 'shifted' depthwise convs only

FLOPs come from XLA's cost analysis of the jitted eval forward (batch 1); XLA counts a
multiply-add as 2 FLOPs, while the paper's "GFLOPs" (mmcv) count multiply-adds, so the
table shows both (GMACs = XLA FLOPs / 2). Times are medians after one compile + warm-up run.
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbp_jax import model_stats, models
from cbp_jax.models import layers

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


def bench_dwconv(repeats):
    print("| depthwise conv, fwd+bwd | xla (ms) | shifted (ms) | max abs diff |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(0)
    for shape, k in (((2, 128, 128, 128), 3), ((2, 128, 128, 96), 7), ((8, 64, 64, 256), 3)):
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        w = jnp.asarray(rng.normal(size=(k, k, 1, shape[-1])), jnp.float32)
        b = jnp.zeros((shape[-1],), jnp.float32)
        res = {}
        for impl in ("xla", "shifted"):

            def loss(x, w, b, impl=impl, k=k):
                return jnp.sum(layers.depthwise_conv2d(x, w, b, padding=k // 2, impl=impl) ** 2)

            fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
            res[impl] = (_median_time(fn, x, w, b, repeats=repeats), fn(x, w, b)[1][0])
        diff = float(jnp.abs(res["xla"][1] - res["shifted"][1]).max())
        print(
            f"| {shape} k={k} | {res['xla'][0] * 1e3:.0f} | {res['shifted'][0] * 1e3:.0f} | "
            f"{diff:.1e} |",
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
    args = ap.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
    if args.dwconv:
        bench_dwconv(max(args.repeats, 1))
        return
    bench_segmentors(args.models, args.size, args.num_classes, args.repeats, args.classifier)


if __name__ == "__main__":
    main()
