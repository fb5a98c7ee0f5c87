"""Copy a trained testbed pipeline into the package (``memattn/testbed/bundled``), within the size budget.

Usage (maintainers): ``python -m memattn.testbed.bundle RUN/pipeline``. Only safetensors, JSON and
tokenizer text files are copied; anything else in the directory is refused.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from memattn.errors import MemattnError
from memattn.loading import BUNDLED_TESTBED

MAX_BYTES = 25 * 1024 * 1024
ALLOWED_SUFFIXES = {".safetensors", ".json", ".txt"}


def bundle(source: Path, target: Path = BUNDLED_TESTBED, max_bytes: int = MAX_BYTES) -> int:
    """Replace ``target`` with ``source``'s files; returns the total size in bytes."""
    source = Path(source)
    if not (source / "model_index.json").is_file() or not (source / "memattn_testbed.json").is_file():
        raise MemattnError(f"{source} is not an exported testbed pipeline (model_index.json + manifest)")
    files = [p for p in source.rglob("*") if p.is_file()]
    refused = [str(p.relative_to(source)) for p in files if p.suffix not in ALLOWED_SUFFIXES]
    if refused:
        raise MemattnError(f"refusing to bundle files that are not safetensors/JSON/text: {refused}")
    total = sum(p.stat().st_size for p in files)
    if total > max_bytes:
        raise MemattnError(
            f"{source} holds {total / 2**20:.1f} MiB; the bundle budget is {max_bytes / 2**20:.0f}"
        )
    shutil.rmtree(target, ignore_errors=True)
    for path in files:
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
    return total


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m memattn.testbed.bundle RUN/pipeline")
    size = bundle(Path(sys.argv[1]))
    print(f"bundled {sys.argv[1]} into {BUNDLED_TESTBED} ({size / 2**20:.1f} MiB)")
