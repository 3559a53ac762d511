"""Compile time, step time and compiled memory of the train step, unrolled against scanned
block stacks (``config.model.scan_blocks``), in one process.

    python bench/compile_time.py                                   # B5 and UperNet-ConvNeXt-B
    python bench/compile_time.py --models segformer_b5 --steps 5 --remat ",True,dots_saveable"

For each model (batch ``--batch`` of ``--size`` x ``--size``, 150 classes, CBP + OCCL, the
model's paper recipe, float32) and each layout: the seconds ``jit(train_step).lower(...)
.compile()`` takes (the persistent compilation cache is off, so every compile is real), the
median step time over ``--steps`` alternating rounds (p10-p90), and XLA's compiled memory
analysis (arguments + temporaries + outputs not aliased to arguments) for each ``--remat``
setting of the scanned layout (compile only). Prints markdown tables.
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from cbp_jax import cpu  # noqa: E402

cpu.use_cores_as_devices()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import train_step as bench_step  # noqa: E402  (bench/train_step.py: configs and batches)

from cbp_jax import factories, sharding  # noqa: E402

jax.config.update("jax_enable_compilation_cache", False)


def build(name, scan, remat, batch, size):
    """``(setup, state, batch)`` of the model's CBP + OCCL train step on one mesh."""
    config = bench_step.jax_config(name, 150, cbp=True, dtype="float32", remat=remat)
    config.model.scan_blocks = scan
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    setup = factories.TrainSetup(config, mesh)
    images, labels = bench_step.batch_arrays(batch, size, 150)
    data = jax.device_put({"image": images, "label": labels}, setup.batch_sharding)
    return setup, setup.init_state(), data


def memory_mb(compiled) -> float:
    mem = compiled.memory_analysis()
    out_extra = mem.output_size_in_bytes - mem.alias_size_in_bytes
    return (mem.argument_size_in_bytes + mem.temp_size_in_bytes + out_extra) / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="segformer_b5,upernet_convnext_base")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed rounds per layout (0: none)")
    ap.add_argument("--remat", default=",True,dots_saveable", help="scanned memory settings")
    args = ap.parse_args()
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s); "
          f"batch {args.batch}, {args.size}x{args.size}, 150 classes, float32")  # fmt: skip
    for name in args.models.split(","):
        print(f"\n{name}\n")
        print("| layout | compile (s) | step median (s) | step p10-p90 (s) | memory (MB) |")
        print("|---|---|---|---|---|")
        runs = {}
        for scan in (False, True):
            setup, state, data = build(name, scan, False, args.batch, args.size)
            start = time.perf_counter()
            compiled = setup.train_step().lower(state, data).compile()
            runs[scan] = {"compile": time.perf_counter() - start, "compiled": compiled,
                          "state": state, "data": data, "times": []}  # fmt: skip
        for _ in range(args.steps + 1):  # the first round warms up
            for run in runs.values():
                start = time.perf_counter()
                run["state"], metrics = run["compiled"](run["state"], run["data"])
                jax.block_until_ready(metrics["loss"])
                run["times"].append(time.perf_counter() - start)
        for scan, run in runs.items():
            times = np.asarray(run["times"][1:]) if args.steps else np.asarray([np.nan])
            p10, p50, p90 = np.percentile(times, [10, 50, 90])
            layout = "scanned" if scan else "unrolled"
            print(
                f"| {layout} | {run['compile']:.1f} | {p50:.3f} | {p10:.3f}-{p90:.3f} | "
                f"{memory_mb(run['compiled']):.0f} |",
                flush=True,
            )
        runs.clear()
        print(f"\n{name}, scanned: compiled memory by remat setting\n")
        print("| remat | compile (s) | memory (MB) |\n|---|---|---|")
        for remat in args.remat.split(","):
            value = {"": False, "True": True}.get(remat, remat)
            setup, state, data = build(name, True, value, args.batch, args.size)
            start = time.perf_counter()
            compiled = setup.train_step().lower(state, data).compile()
            seconds = time.perf_counter() - start
            print(f"| {value!r} | {seconds:.1f} | {memory_mb(compiled):.0f} |", flush=True)


if __name__ == "__main__":
    main()
