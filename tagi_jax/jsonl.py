"""JSON Lines reading with errors that name the file and line (data files, example files, corpora)."""
from __future__ import annotations

import json
from typing import Any, Iterator


def iter_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    """(`path:line`, parsed value) for every non-blank line; invalid JSON is a ValueError naming the line.

    Callers check the value's shape themselves and name the field in their own error, prefixed with `where`.
    """
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON: {e.msg}") from e
