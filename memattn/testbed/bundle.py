"""Copy a trained testbed pipeline into the package (``memattn/testbed/bundled``), within the size budget.

Usage (maintainers): ``python -m memattn.testbed.bundle RUN/pipeline [testbed|testbed-detail]``
(default ``testbed``, v2). Only safetensors, JSON and tokenizer text files are copied; anything else in
the directory is refused. Each bundle stays under 25 MiB and both together under 30 MiB.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from memattn.errors import MemattnError
from memattn.loading import BUNDLED_TESTBED, BUNDLED_TESTBEDS
from memattn.testbed.manifest import MANIFEST

MAX_BYTES = 25 * 1024 * 1024
MAX_TOTAL_BYTES = 30 * 1024 * 1024  # every bundled testbed together
ALLOWED_SUFFIXES = {".safetensors", ".json", ".txt"}


def bundle(source: Path, target: Path = BUNDLED_TESTBED, max_bytes: int = MAX_BYTES) -> int:
    """Replace ``target`` with ``source``'s files; returns the total size in bytes."""
    source = Path(source)
    if not (source / "model_index.json").is_file() or not (source / MANIFEST).is_file():
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


def bundled_bytes() -> int:
    """Size of every bundled testbed together (the package budget is ``MAX_TOTAL_BYTES``)."""
    return sum(p.stat().st_size for root in BUNDLED_TESTBEDS.values() for p in root.rglob("*") if p.is_file())


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and sys.argv[2] not in BUNDLED_TESTBEDS):
        raise SystemExit(
            f"usage: python -m memattn.testbed.bundle RUN/pipeline [{'|'.join(BUNDLED_TESTBEDS)}]"
        )
    target = BUNDLED_TESTBEDS[sys.argv[2]] if len(sys.argv) == 3 else BUNDLED_TESTBED
    size = bundle(Path(sys.argv[1]), target)
    print(
        f"bundled {sys.argv[1]} into {target} ({size / 2**20:.1f} MiB; "
        f"all bundles {bundled_bytes() / 2**20:.1f} MiB)"
    )
