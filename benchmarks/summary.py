"""python -m benchmarks.summary RESULTS_DIR: each suite's tables from a results folder (one per comparison, as
the run printed them), its machine and its timing line."""

import json
import sys
from pathlib import Path
from typing import List

from benchmarks.machine import describe
from benchmarks.runner import discover, suite_tables
from benchmarks.tables import Table, text


def headline(payload: dict) -> List[str]:
    """A suite's result (its parsed JSON) as lines: the suite and its machine, its tables, its timing line."""
    module = discover().get(payload["suite"])
    tables = suite_tables(module, payload["rows"]) if module else [Table(payload["suite"], payload["rows"])]
    lines = [f"{payload['suite']} on {describe(payload['machine'])}",
             *"\n\n".join(text(table) for table in tables).splitlines()]
    if "timing" in payload:
        lines.append(payload["timing"]["summary"])
    return lines


def main(folder: Path) -> None:
    for path in sorted(folder.glob("*.json")):
        print("\n" + "\n".join(headline(json.loads(path.read_text()))))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results"))
