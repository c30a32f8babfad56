"""python -m benchmarks [--suite NAME ...] [--device auto|cpu|cuda] [--quick] [--smoke] [--repeats N] [--warmup N]
[--min-sample-ms MS] [--budget S] [--threads N] [--out results/]"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from benchmarks.runner import default_settings, discover, run_suites


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--suite", action="append", default=[],
                        help=f"suite to run (repeatable; default: all of {sorted(discover())})")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when a GPU is present, else cpu")
    parser.add_argument("--quick", action="store_true",
                        help="fewer timed rounds (8); on a GPU the chopgrad suite leaves out its CPU-only rows")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest sizes and 3 timed rounds: every code path runs, no figure means anything")
    parser.add_argument("--repeats", type=int, help="timed rounds per comparison (default 20, 8 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed rounds before them (default 1)")
    parser.add_argument("--min-sample-ms", type=float,
                        help="each sample lasts at least this long (default 1 on a GPU, 10 on a CPU)")
    parser.add_argument("--budget", type=float, metavar="S",
                        help="wall seconds the timed rounds of one comparison may take, at least 3 rounds run "
                             "(default 8 on a CPU, none on a GPU; 0: none)")
    parser.add_argument("--threads", type=int,
                        help="torch's CPU threads (default on a CPU: 1, steady on a shared machine; on a GPU: "
                             "torch's default); stated in the output")
    parser.add_argument("--out", type=Path, default=Path("results"), help="folder for JSON and PNG results")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    overrides = {key: value for key, value in (("repeats", args.repeats), ("warmup", args.warmup),
                                               ("min_sample_ms", args.min_sample_ms)) if value is not None}
    if args.budget is not None:
        overrides["budget_s"] = args.budget or None  # 0: no budget
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.threads is not None or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    try:
        settings = dataclasses.replace(default_settings(device, args.quick, args.smoke), **overrides)
    except ValueError as error:
        parser.error(str(error))
    run_suites(args.suite, device, args.quick, args.out, settings, smoke=args.smoke,
               command=["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
