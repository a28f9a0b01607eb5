"""What every benchmark leaves behind: its JSON report, naming the command that produced it, and the same results as
a markdown table beside it (`<out>.md`), printed too."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def command(module: str) -> str:
    """The command line that ran this benchmark, as a reader would type it: `python -m benchmarks.x --flag ...`."""
    return " ".join([Path(sys.executable).name, "-m", module, *sys.argv[1:]])


def write(report: dict, out: Path, table: str) -> None:
    """`report` to `out` as JSON and `table` (its markdown) to `out` with the suffix .md; the table is printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(table if table.endswith("\n") else table + "\n")
    print(table)
    print(f"written: {out}")
