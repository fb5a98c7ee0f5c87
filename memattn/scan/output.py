"""The output directory: crash-safe Parquet parts, the manifest that pins a scan's settings, the lock."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from memattn._version import __version__
from memattn.errors import MemattnError
from memattn.scan.inputs import Batch, Covered, file_sha256
from memattn.scan.schema import (
    COUNTS_KEY,
    LOCK_FILE,
    MANIFEST_FILE,
    PART_PREFIX,
    RANGES_KEY,
    SCHEMA,
    SCHEMA_VERSION,
    TEMP_PREFIX,
    ScanSettings,
)

# ---- the output directory -----------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a hidden temp file in the same directory, fsync, rename: complete or absent, never torn."""
    temp = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}")
    write(temp)
    with temp.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, path)
    _fsync_dir(path.parent)


def part_name(first_row: int) -> str:
    return f"{PART_PREFIX}{first_row:010d}.parquet"


def read_parts(out: Path) -> tuple[Covered, dict[str, int]]:
    """Covered row ranges and summed counts of the complete parts; footers only (no row data)."""
    ranges: list[tuple[int, int]] = []
    counts: dict[str, int] = {}
    for path in sorted(out.glob(f"{PART_PREFIX}*.parquet")):
        try:
            meta = pq.read_metadata(path).metadata or {}
        except (OSError, pa.ArrowException) as error:
            raise MemattnError(
                f"{path} is not a readable part ({error}); was it written by memattn scan?"
            ) from None
        if RANGES_KEY not in meta:
            raise MemattnError(f"{path} has no memattn scan row ranges; remove files memattn did not write")
        ranges += [tuple(r) for r in json.loads(meta[RANGES_KEY])]
        for key, value in json.loads(meta.get(COUNTS_KEY, b"{}")).items():
            counts[key] = counts.get(key, 0) + int(value)
    return Covered(ranges), counts


class PartWriter:
    """Buffers rows of complete batches and writes them as one atomic part when enough have gathered."""

    def __init__(self, out: Path, rows_per_part: int, seconds_per_part: float) -> None:
        self.out = out
        self.rows_per_part = rows_per_part
        self.seconds_per_part = seconds_per_part
        self.rows: list[dict[str, Any]] = []
        self.ranges: list[list[int]] = []
        self.since = time.monotonic()

    def add(self, batch: Batch, rows: list[dict[str, Any]]) -> None:
        self.rows += rows
        if self.ranges and self.ranges[-1][1] == batch.start:
            self.ranges[-1][1] = batch.stop
        else:
            self.ranges.append([batch.start, batch.stop])
        if len(self.rows) >= self.rows_per_part or time.monotonic() - self.since >= self.seconds_per_part:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        counts = {
            "rows": len(self.rows),
            "ok": sum(r["status"] == "ok" for r in self.rows),
            "skipped": sum(r["status"] == "skipped" for r in self.rows),
            "flagged": sum(bool(r["flagged"]) for r in self.rows),
            "truncated": sum(bool(r["truncated"]) for r in self.rows),
        }
        metadata = {
            **SCHEMA.metadata,
            RANGES_KEY: json.dumps(self.ranges).encode(),
            COUNTS_KEY: json.dumps(counts).encode(),
        }
        table = pa.Table.from_pylist(self.rows, schema=SCHEMA.with_metadata(metadata))
        write_atomic(self.out / part_name(self.ranges[0][0]), lambda p: pq.write_table(table, p))
        self.rows, self.ranges, self.since = [], [], time.monotonic()


def model_fingerprint(model: str) -> dict[str, Any]:
    """Configs hashed, weight files by name and size (hashing gigabytes of weights per start is too slow)."""
    from memattn.loading import resolve_model

    path = Path(resolve_model(model)).expanduser()
    if not path.is_dir():
        return {"id": model}
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path).as_posix()
        if relative.startswith(("memattn_guard", "memattn_detector")):
            continue  # stored separately (calibration, detector)
        if file.suffix in (".json", ".txt") and file.stat().st_size < (16 << 20):
            digest.update(f"{relative}\0".encode() + file.read_bytes())
        else:
            digest.update(f"{relative}\0{file.stat().st_size}\0".encode())
    return {"path": str(path.resolve()), "sha256": digest.hexdigest()}


def scan_identity(settings: ScanSettings, input_path: Path, extras: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "memattn_version": __version__,
        "input": {
            "format": input_path.suffix.lower(),
            "bytes": input_path.stat().st_size,
            "sha256": file_sha256(input_path),
        },
        "settings": asdict(settings),
        "model_fingerprint": model_fingerprint(settings.model),
        **extras,
    }


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} then, {new!r} now"]


def prepare_manifest(out: Path, identity: dict[str, Any], input_path: Path) -> None:
    """Check a resumed scan matches the manifest, or write the manifest of a new scan."""
    path = out / MANIFEST_FILE
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise MemattnError(f"{path} is unreadable ({error}); delete {out} and scan again") from None
        changed = _differences(stored.get("identity"), identity)
        has_parts = any(out.glob(f"{PART_PREFIX}*.parquet"))
        if changed and has_parts:
            raise MemattnError(
                f"{out} holds a scan made with other settings ({'; '.join(changed)}); rerun with the same "
                "settings to resume it, or pass a new --out"
            )
        if not changed:
            return  # else: a scan that stopped before its first part (bad model?); nothing to protect
    if any(out.glob(f"{PART_PREFIX}*.parquet")):
        raise MemattnError(f"{out} has result parts but no {MANIFEST_FILE}; pass a new --out")
    manifest = {"identity": identity, "input_path": str(input_path.resolve()), "complete": False}
    write_atomic(path, lambda p: p.write_text(json.dumps(manifest, indent=1)))


def finish_manifest(out: Path, counts: dict[str, int]) -> None:
    path = out / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    if manifest.get("complete") and manifest.get("counts") == counts:
        return
    manifest.update(complete=True, counts=counts)
    write_atomic(path, lambda p: p.write_text(json.dumps(manifest, indent=1)))


class ScanLock:
    """An exclusive flock on OUT: two scans writing one output would duplicate rows. The kernel drops it
    when the process dies, SIGKILL included, so a crashed scan never leaves a stale lock."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_FILE
        self.handle: IO[bytes] | None = None

    def __enter__(self) -> ScanLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        self.handle = self.path.open("ab")
        try:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            raise MemattnError(
                f"another memattn scan is writing {self.path.parent}; wait for it or stop it"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.close()


def clean_temp(out: Path) -> None:
    """Temp files are parts a killed scan did not finish: never complete, so never read; removed."""
    for temp in out.glob(f"{TEMP_PREFIX}*"):
        temp.unlink(missing_ok=True)
