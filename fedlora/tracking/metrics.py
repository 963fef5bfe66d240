"""metrics.jsonl: one JSON object per round, appended and flushed as each round ends."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class MetricsLog:
    """Append-only round log in ``run_dir/metrics.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        """Add one line; if the file ends in a line cut by a crash, start on a new line."""
        starts_clean = not self.path.exists() or self.path.stat().st_size == 0 or self._ends_with_newline()
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(("" if starts_clean else "\n") + json.dumps(_clean(record), sort_keys=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"

    def read(self) -> list[dict[str, Any]]:
        """All complete records; a line cut by a crash is skipped."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def truncate_after(self, last_round: int) -> list[dict[str, Any]]:
        """Keep only the rounds <= ``last_round`` (used on resume); returns the kept records."""
        kept = [r for r in self.read() if r.get("round", 0) <= last_round]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        return kept
