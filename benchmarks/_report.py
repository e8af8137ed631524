"""Output shared by the benchmark scripts: the result JSON on stdout, and in a file when asked."""

from __future__ import annotations

import json
from pathlib import Path


def emit_json(result: dict, path: Path | None) -> None:
    """Print `result` as indented JSON and, with `path`, also write it there (parent folders created)."""
    text = json.dumps(result, indent=2)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    print(text)
