"""Benchmark of the core: Gram-Schmidt construction and OCCL cost.

    python bench/core.py
    python bench/core.py --centroids   # only segment_sum vs one-hot matmul

Prints two tables (median wall time of several runs, after compilation).
"""

import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cbp_jax import losses
from cbp_jax import prototypes as cbp


def timeit(fn, *args, repeats=5):
    fn(*args)  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def algorithm1_python_loop(w):
    """Algorithm 1 as written: Python loops over rows and previous rows (classical GS)."""
    w = np.array(w, np.float32)
    out = np.zeros_like(w)
    for i in range(len(w)):
        v = w[i].copy()
        for j in range(i):
            v -= (w[i] @ out[j]) / (out[j] @ out[j]) * out[j]
        out[i] = v
    return out


def bench_gram_schmidt():
    print("| (N, C) | jit MGS x2 (ms) | max abs cos | NumPy QR (ms) | Python loop (ms) |", end="")
    print(" loop max abs cos |")
    print("|---|---|---|---|---|---|")
    for n, c in [(150, 256), (171, 768), (1000, 1024)]:
        w0 = cbp.kaiming_normal(jax.random.key(0), n, c)
        jit_ms = 1e3 * timeit(lambda w: cbp.gram_schmidt(w).block_until_ready(), w0)
        w_np = np.asarray(w0)
        qr_ms = 1e3 * timeit(lambda w: np.linalg.qr(w.T), w_np)
        loop_ms = 1e3 * timeit(algorithm1_python_loop, w_np, repeats=1)
        ours = float(cbp.max_abs_cosine(cbp.gram_schmidt(w0)))
        loop = float(cbp.max_abs_cosine(jnp.asarray(algorithm1_python_loop(w_np))))
        print(
            f"| ({n}, {c}) | {jit_ms:.1f} | {ours:.1e} | {qr_ms:.1f} | {loop_ms:.0f} | {loop:.1e} |"
        )


def bench_occl(shape=(16, 128, 128, 256), num_classes=150):
    b, h, w, c = shape
    kf, ky, kw = jax.random.split(jax.random.key(0), 3)
    features = jax.random.normal(kf, shape)
    labels = jax.random.randint(ky, (b, h, w), 0, num_classes)
    protos = cbp.category_basis_prototypes(kw, num_classes, c)

    def ce(f):
        return losses.pixel_cross_entropy(jnp.einsum("bhwc,nc->bhwn", f, protos), labels)

    def ce_occl(f):
        return ce(f) + losses.occl(f, labels, protos)

    occl_only = jax.jit(jax.value_and_grad(lambda f: losses.occl(f, labels, protos)))
    ce_grad = jax.jit(jax.value_and_grad(ce))
    both = jax.jit(jax.value_and_grad(ce_occl))
    print(f"\nforward+backward, features {shape}, {num_classes} classes")
    print("| loss | time (ms) |")
    print("|---|---|")
    for name, fn in [
        ("pixel CE (logits = F W^T)", ce_grad),
        ("OCCL", occl_only),
        ("CE + OCCL", both),
    ]:
        ms = 1e3 * timeit(lambda f, fn=fn: jax.block_until_ready(fn(f)), features)
        print(f"| {name} | {ms:.0f} |")


def bench_centroid_sums():
    """Per-(view, class) feature sums of OCCL: ``segment_sum`` against a one-hot matmul."""
    print("\nview-centroid sums, forward+backward (the part of OCCL that reads every pixel)")
    print("| features | classes | segment_sum (ms) | one-hot matmul (ms) | max abs diff |")
    print("|---|---|---|---|---|")
    for shape, n in (((8, 64, 64, 256), 11), ((8, 64, 64, 256), 150), ((16, 128, 128, 256), 150)):
        kf, ky = jax.random.split(jax.random.key(0))
        flat = jax.random.normal(kf, shape).reshape(-1, shape[-1])
        segments = jax.random.randint(ky, (flat.shape[0],), 0, 2 * n + 1)

        def by_segment_sum(f, segments=segments, n=n):
            return jax.ops.segment_sum(f, segments, num_segments=2 * n + 1)

        def by_one_hot(f, segments=segments, n=n):
            return jax.nn.one_hot(segments, 2 * n + 1, dtype=f.dtype).T @ f

        times, values = [], []
        for fn in (by_segment_sum, by_one_hot):
            grad = jax.jit(jax.value_and_grad(lambda f, fn=fn: jnp.sum(jnp.sin(fn(f)))))
            times.append(1e3 * timeit(lambda f, g=grad: jax.block_until_ready(g(f)), flat))
            values.append(jax.jit(fn)(flat))
        diff = float(jnp.abs(values[0] - values[1]).max())
        print(f"| {shape} | {n} | {times[0]:.1f} | {times[1]:.1f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    print(
        f"{platform.processor() or platform.machine()}, {jax.devices()[0].platform}, "
        f"jax {jax.__version__}, {jax.device_count()} device(s)\n"
    )
    if "--centroids" not in sys.argv:
        bench_gram_schmidt()
        bench_occl()
    bench_centroid_sums()
