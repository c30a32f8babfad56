"""python -m benchmarks [--suite NAME ...] [--device auto|cpu|cuda] [--quick] [--out results/]"""

import argparse
from pathlib import Path

import torch

from benchmarks.runner import discover, run_suites


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--suite", action="append", default=[],
                        help=f"suite to run (repeatable; default: all of {sorted(discover())})")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when a GPU is present, else cpu")
    parser.add_argument("--quick", action="store_true",
                        help="fewer sizes and repetitions (always on for the CPU)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="folder for JSON and PNG results")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    run_suites(args.suite, device, args.quick or device.type == "cpu", args.out)


if __name__ == "__main__":
    main()
