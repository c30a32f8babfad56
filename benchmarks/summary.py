"""python -m benchmarks.summary RESULTS_DIR: each suite's rows in a results folder, key columns only."""

import json
import sys
from pathlib import Path
from typing import List

from benchmarks.runner import format_table

KEY_COLUMNS = ("shape", "impl", "vs", "fwd_ms", "fwdbwd_ms", "fwd_speedup", "fwdbwd_speedup",      # attention
               "fwdbwd_of_floor", "sweep",
               "kind", "method", "frames", "window", "ratio", "cosine", "decoder", "grad", "rel_error",  # chopgrad
               "norm_ratio",
               "table", "form", "attention", "component", "saved_mb", "saved_vs_serial", "time_vs_serial",  # mobius
               "step_ms", "peak_mb", "note")


def headline(payload: dict) -> List[str]:
    """A suite's rows, key columns only, as table lines."""
    rows = [{key: row[key] for key in KEY_COLUMNS if key in row} for row in payload["rows"]]
    return [f"{payload['suite']} ({payload['environment'].get('gpu', payload['environment']['device'])})",
            *format_table(rows).splitlines()]


def main(folder: Path) -> None:
    for path in sorted(folder.glob("*.json")):
        print("\n" + "\n".join(headline(json.loads(path.read_text()))))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results"))
