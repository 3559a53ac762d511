"""Confusion-matrix update throughput: jitted segment_sum vs NumPy bincount.

Run from the repository root:

    python bench/evaluation.py                 # default cases, 150 classes
    python bench/evaluation.py --repeats 20 --num-classes 171

Prints one row per (batch, H, W) case: pixels/s of ``confusion_matrix_update`` under jit
(device-resident inputs, compile excluded, ``block_until_ready``, median of ``--repeats``), of
the same plus the argmax over (B, H, W, N) float32 scores (reading N floats per pixel), and
of a NumPy ``bincount`` on host arrays.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cbp_jax import metrics as ev  # noqa: E402


def numpy_update(conf, labels, preds, n, ignore=255):
    mask = labels != ignore
    idx = labels[mask].astype(np.int64) * n + preds[mask]
    return conf + np.bincount(idx, minlength=n * n).reshape(n, n)


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_case(b, h, w, n, repeats, rng):
    """Returns (jit update, jit argmax + update or None, numpy) pixels/s for one case."""
    labels = rng.integers(0, n, size=(b, h, w)).astype(np.int32)
    labels[rng.random((b, h, w)) < 0.1] = 255
    preds = rng.integers(0, n, size=(b, h, w)).astype(np.int32)
    pix = b * h * w

    conf_d = jnp.zeros((n, n), jnp.int32)
    lab_d, pred_d = jnp.asarray(labels), jnp.asarray(preds)

    def upd():
        return ev.confusion_matrix_update(conf_d, lab_d, pred_d, num_classes=n).block_until_ready()

    np.testing.assert_array_equal(np.asarray(upd()), numpy_update(0, labels, preds, n))
    jit_rate = pix / median_time(upd, repeats)

    # float32 scores, as ``inference`` returns them; skipped above 1 GiB of scores.
    arg_rate = None
    if pix * n * 4 <= 2**30:
        logits = jax.random.normal(jax.random.key(0), (b, h, w, n), jnp.float32)

        def ups():
            conf, _ = ev._update_from_scores(
                conf_d, jnp.zeros((), jnp.int32), lab_d, logits, None, num_classes=n,
                ignore_index=255,
            )  # fmt: skip
            return conf.block_until_ready()

        ups()
        arg_rate = pix / median_time(ups, repeats)

    conf_h = np.zeros((n, n), np.int64)
    np_rate = pix / median_time(lambda: numpy_update(conf_h, labels, preds, n), repeats)
    return jit_rate, arg_rate, np_rate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--cases", default="1x512x683,4x512x512,16x512x512", help="comma list of BxHxW"
    )
    args = parser.parse_args()
    n = args.num_classes
    rng = np.random.default_rng(0)
    print(f"backend={jax.default_backend()} devices={jax.device_count()} N={n}")
    cols = ("case BxHxW", "jit update", "jit argmax+update", "NumPy bincount")
    print(f"| {cols[0]:>12} | {cols[1]:>12} | {cols[2]:>17} | {cols[3]:>14} |")
    print(f"| {'':>12} | {'Mpix/s':>12} | {'Mpix/s':>17} | {'Mpix/s':>14} |")
    for case in args.cases.split(","):
        b, h, w = (int(v) for v in case.split("x"))
        jit_rate, arg_rate, np_rate = bench_case(b, h, w, n, args.repeats, rng)
        arg = "-" if arg_rate is None else f"{arg_rate / 1e6:.1f}"
        print(f"| {case:>12} | {jit_rate / 1e6:12.1f} | {arg:>17} | {np_rate / 1e6:14.1f} |")


if __name__ == "__main__":
    main()
