"""Read prompt files: .txt (one per line), .jsonl / .csv / .parquet (a ``prompt`` or ``caption`` field).

Errors name the file and the fix: an unknown extension, an empty file, a missing field, bad UTF-8.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from memattn.errors import MemattnError

FIELDS = ("prompt", "caption")
SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")


def _field(names: list[str], path: Path) -> str:
    for name in FIELDS:
        if name in names:
            return name
    raise MemattnError(f"{path} has no 'prompt' or 'caption' field (found: {', '.join(names) or 'none'})")


def read_prompts(path: str | Path) -> list[str]:
    """All prompts of a file, in order (blank .txt lines are skipped: they are layout, not prompts)."""
    path = Path(path)
    if not path.is_file():
        raise MemattnError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise MemattnError(
            f"{path}: unsupported prompt file type {suffix!r}; use one of {', '.join(SUFFIXES)}"
        )
    try:
        if suffix == ".txt":
            prompts = [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines()]
            prompts = [p for p in prompts if p.strip()]
        elif suffix == ".jsonl":
            rows = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise MemattnError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
            if rows and not all(isinstance(r, dict) for r in rows):
                raise MemattnError(f"{path}: every JSONL line must be an object with a 'prompt' or 'caption'")
            name = _field(list(rows[0]) if rows else [], path) if rows else "prompt"
            prompts = [str(r.get(name, "")) for r in rows]
        elif suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as handle:
                reader = csv.DictReader(handle)
                name = _field(list(reader.fieldnames or []), path)
                prompts = [row[name] or "" for row in reader]
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            name = _field(table.column_names, path)
            prompts = [str(v) if v is not None else "" for v in table.column(name).to_pylist()]
    except UnicodeDecodeError as error:
        raise MemattnError(f"{path} is not valid UTF-8 ({error.reason} at byte {error.start})") from None
    except (OSError, ValueError) as error:
        if isinstance(error, MemattnError):
            raise
        raise MemattnError(f"{path} could not be read ({type(error).__name__}: {error})") from None
    if not prompts:
        raise MemattnError(f"{path} holds no prompts")
    return prompts
