"""python -m benchmarks.summary RESULTS_DIR: each suite's rows in a results folder, key columns only (a ratio
with its spread), and its timing line."""

import json
import sys
from pathlib import Path
from typing import List

from benchmarks.runner import format_table

KEY_COLUMNS = ("shape", "comparison", "impl", "vs", "fwd_ms", "fwdbwd_ms", "fwd_speedup", "fwdbwd_speedup",  # attention
               "fwd_vs_diffusers", "fwdbwd_vs_diffusers", "fwd_vs_best", "fwdbwd_vs_best", "fwdbwd_vs_torch",
               "fwd_vs_sdpa", "fwdbwd_vs_sdpa", "takes", "no_slower",
               "fwd_of_floor", "fwdbwd_of_floor", "kernel", "kernel_ms", "floor_ms", "of_floor", "sweep",
               "kind", "method", "frames", "window", "ratio", "cosine", "decoder", "grad", "rel_error",  # chopgrad
               "norm_ratio",
               "table", "form", "attention", "component", "saved_mb", "saved_vs_serial", "peak_vs_serial",  # mobius
               "time_vs_serial",
               "step_ms", "peak_mb", "note")


def headline(payload: dict) -> List[str]:
    """A suite's rows, key columns only (a ratio with its spread), and its timing line, as lines."""
    columns = [name for key in KEY_COLUMNS for name in (key, f"{key}_p10", f"{key}_p90")]
    rows = [{key: row[key] for key in columns if key in row} for row in payload["rows"]]
    lines = [f"{payload['suite']} ({payload['environment'].get('gpu', payload['environment']['device'])})",
             *format_table(rows).splitlines()]
    if "timing" in payload:
        lines.append(payload["timing"]["summary"])
    return lines


def main(folder: Path) -> None:
    for path in sorted(folder.glob("*.json")):
        print("\n" + "\n".join(headline(json.loads(path.read_text()))))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results"))
