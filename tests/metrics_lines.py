"""metrics.jsonl compared between runs: every line must match byte for byte except the "time"
field of train and eval records, which is wall-clock time and so differs between any two runs
(and, in a resumed run, also holds the resumed process's own time)."""

from __future__ import annotations

import json
from pathlib import Path


def untimed_lines(path: Path) -> list[str]:
    """The lines of `path` with "time" removed from each record, re-encoded with the key order
    kept (so a changed value, key or order still differs); a line that is not JSON stays as is."""
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            lines.append(line)
            continue
        if isinstance(record, dict):
            record.pop("time", None)
        lines.append(json.dumps(record))
    return lines
