"""Output paths checked before the work: a long run must not end with nowhere to put its results."""

from __future__ import annotations

import tempfile
from pathlib import Path

from memattn.errors import MemattnError


def writable_directory(path: Path, option: str) -> Path:
    """Prove ``path`` can be made and written, or raise one line naming it; creates nothing.

    The check writes and removes a temporary file in ``path`` or, when ``path`` does not exist yet, in
    its nearest existing ancestor, so a command refused later (bad settings, no model) leaves no empty
    output directory behind. The caller creates ``path`` when it writes there.
    """
    try:
        if path.exists() and not path.is_dir():
            raise MemattnError(f"{option} {path} is a file; pass a directory")
        existing = path
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise MemattnError(f"{option} {path}: {existing} is a file; pass a directory")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".memattn-write-test-"):
            pass
    except OSError as error:
        raise MemattnError(
            f"{option} {path} cannot be written ({error.strerror or error}); pass a writable directory"
        ) from None
    return path


def writable_file(path: Path, option: str) -> Path:
    """The directory of ``path`` is writable (the file itself is written at the end of the work)."""
    if path.is_dir():
        raise MemattnError(f"{option} {path} is a directory; pass a file name")
    writable_directory(path.parent if str(path.parent) else Path("."), option)
    return path
