"""Command line of the data package: ``python -m cbp_jax.data COMMAND -h``.

Commands: check, convert-cocostuff10k, write-arrayrecord, prepare-tfds.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbp_jax.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="scan a data set and list every bad file")
    p.add_argument("--dataset", required=True, choices=["ade20k", "cocostuff10k", "camvid"])
    p.add_argument("--root", required=True)
    p.add_argument("--split", action="append", help="only these splits (repeatable)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("convert-cocostuff10k", help="raw cocostuff-10k-v1.1 -> mmseg layout")
    p.add_argument("--raw", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=4)

    p = sub.add_parser("write-arrayrecord", help="write a split as ArrayRecord shards")
    p.add_argument(
        "--dataset", required=True, choices=["ade20k", "cocostuff10k", "camvid", "scenes"]
    )
    p.add_argument("--root", help="data folder (not for scenes)")
    p.add_argument("--split", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--examples-per-shard", type=int, default=1000)
    p.add_argument("--skip-bad-examples", action="store_true")

    p = sub.add_parser("prepare-tfds", help="prepare the TFDS builder from a manual dir")
    p.add_argument("--dataset", required=True, choices=["ade20k", "cocostuff10k"])
    p.add_argument("--manual-dir", required=True)
    p.add_argument("--data-dir", required=True)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if args.command == "check":
        from cbp_jax.data.doctor import check

        status, text, _ = check(
            args.dataset, args.root, args.split, args.workers, progress=not args.no_progress
        )
        print(text)
        return status
    if args.command == "convert-cocostuff10k":
        from cbp_jax.data.cocostuff import convert_cocostuff10k

        print(convert_cocostuff10k(args.raw, args.out, args.workers))
        return 0
    if args.command == "write-arrayrecord":
        from cbp_jax.data import make_source
        from cbp_jax.data.arrayrecord import write_arrayrecord

        source = make_source(
            args.dataset, args.root, args.split, skip_bad_examples=args.skip_bad_examples
        )
        print(write_arrayrecord(source, args.out, examples_per_shard=args.examples_per_shard))
        return 0
    from cbp_jax.data.tfds_builders import prepare

    prepare(args.dataset, args.manual_dir, args.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
