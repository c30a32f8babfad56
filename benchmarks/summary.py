"""python -m benchmarks.summary RESULTS_DIR: one short table of a results folder (tests and suites).

Reads the pytest JUnit XML (gpu_tests.xml) and every suite's JSON there; prints the test counts, then each
suite's rows with its key columns.
"""

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from benchmarks.runner import format_table

KEY_COLUMNS = ("shape", "impl", "vs", "fwd_ms", "fwdbwd_ms", "fwd_speedup", "fwdbwd_speedup",      # attention
               "fwdbwd_of_floor", "sweep",
               "kind", "method", "frames", "window", "ratio", "cosine",                               # chopgrad
               "table", "form", "attention", "component", "saved_mb", "saved_vs_serial", "peak_vs_serial",  # mobius
               "time_vs_serial",
               "step_ms", "peak_mb", "note")


def main(folder: Path) -> None:
    junit = folder / "gpu_tests.xml"
    if junit.exists():
        suite = ElementTree.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        print(f"gpu tests: {passed} passed, {counts['failures'] + counts['errors']} failed, "
              f"{counts['skipped']} skipped")
    for path in sorted(folder.glob("*.json")):
        payload = json.loads(path.read_text())
        rows = [{key: row[key] for key in KEY_COLUMNS if key in row} for row in payload["rows"]]
        print(f"\n{payload['suite']} ({payload['environment'].get('gpu', payload['environment']['device'])})")
        print(format_table(rows))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results"))
