"""Read prompts one row per line/record, never raising on a bad one; fixed batches of rows."""

from __future__ import annotations

import bisect
import csv
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from memattn.errors import MemattnError
from memattn.scan.schema import FIELDS, MAX_PROMPT_BYTES, SUFFIXES

_SNIFF_BYTES = 8192  # a text prompt file has no NUL byte in its first 8 KiB; a binary file almost surely does

# ---- reading prompts, one row per line/record, never raising on a bad one -------------------------------


@dataclass(frozen=True)
class InputRow:
    """One input line or record: ``prompt`` is None when there is no text; ``reason`` says why not scored."""

    row: int
    prompt: str | None
    reason: str | None = None
    sha256: str | None = None
    label: int | None = None  # the input's 0/1 ``label`` (1 = memorized), kept through to the results
    id: str | None = None  # the input's ``id``


LABEL_FIELD, ID_FIELD = "label", "id"
_LABEL_TEXT = {"0": 0, "1": 1, "false": 0, "true": 1}


def parse_label(value: Any) -> int | None:
    """A 0/1 label from JSON, CSV or Parquet (0, 1, true, false, "0", "1"); anything else: None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float) and value in (0, 1):
        return int(value)
    if isinstance(value, str):
        return _LABEL_TEXT.get(value.strip().lower())
    return None


def _with_columns(item: InputRow, label: Any, identifier: Any) -> InputRow:
    if label is None and identifier is None:
        return item
    return replace(item, label=parse_label(label), id=None if identifier is None else str(identifier))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_text(row: int, text: str, raw: bytes | None = None) -> InputRow:
    """A decoded prompt: empty and over-long texts become skipped rows (tokens are checked later)."""
    data = raw if raw is not None else text.encode("utf-8", "surrogatepass")
    if len(data) > MAX_PROMPT_BYTES:
        return InputRow(row, None, f"longer than {MAX_PROMPT_BYTES} bytes", sha(data))
    if not text.strip():
        return InputRow(row, text, "empty prompt", sha(data))
    if "\x00" in text:
        return InputRow(row, None, "contains NUL bytes (binary data, not a prompt)", sha(data))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (a JSON "\\ud800" escape): no tokenizer can take it
        return InputRow(row, None, "not valid Unicode (lone surrogate)", sha(data))
    return InputRow(row, text, None, sha(data))


def _lines(handle: IO[bytes]) -> Iterator[tuple[bytes | None, str, int]]:
    """Lines without terminator, read in bounded pieces: (content or None when over-long, sha256, bytes)."""
    while True:
        chunk = handle.readline(MAX_PROMPT_BYTES + 2)
        if not chunk:
            return
        if chunk.endswith(b"\n") or len(chunk) <= MAX_PROMPT_BYTES:
            content = chunk[:-1] if chunk.endswith(b"\n") else chunk
            content = content[:-1] if content.endswith(b"\r") else content
            if len(content) <= MAX_PROMPT_BYTES:
                yield content, sha(content), len(content)
                continue
        digest, size = hashlib.sha256(), 0  # over-long: hash it piece by piece, never hold it whole
        while chunk:
            body = chunk[:-1] if chunk.endswith(b"\n") else chunk
            digest.update(body)
            size += len(body)
            if chunk.endswith(b"\n"):
                break
            chunk = handle.readline(1 << 20)
        yield None, digest.hexdigest(), size


def _decode(content: bytes, first: bool) -> tuple[str | None, str | None]:
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, f"not valid UTF-8 ({error.reason} at byte {error.start})"
    return (text.removeprefix("\ufeff") if first else text), None


def _decoded_lines(path: Path) -> Iterator[tuple[int, str | InputRow, bytes, str]]:
    """``(row, text or the skipped row, raw bytes, digest)`` per line of a text file."""
    with path.open("rb") as handle:
        for row, (content, digest, size) in enumerate(_lines(handle)):
            if content is None:
                reason = f"line longer than {MAX_PROMPT_BYTES} bytes ({size})"
                yield row, InputRow(row, None, reason, digest), b"", digest
                continue
            text, problem = _decode(content, row == 0)
            yield row, (InputRow(row, None, problem, digest) if text is None else text), content, digest


def _iter_txt(path: Path) -> Iterator[InputRow]:
    for row, text, content, _ in _decoded_lines(path):
        yield text if isinstance(text, InputRow) else _check_text(row, text, content)


def _pick_field(record: dict[str, Any]) -> str | None:
    return next((name for name in FIELDS if name in record), None)


def _iter_jsonl(path: Path) -> Iterator[InputRow]:
    for row, text, _, digest in _decoded_lines(path):
        if isinstance(text, InputRow):
            yield text
        elif not text.strip():
            yield InputRow(row, None, "empty line", digest)
        else:
            yield _json_row(row, text, digest)


def _json_row(row: int, text: str, digest: str) -> InputRow:
    try:
        record = json.loads(text)
    except ValueError as error:
        return InputRow(row, None, f"not valid JSON ({getattr(error, 'msg', error)})", digest)
    if not isinstance(record, dict):
        return InputRow(row, None, f"a JSON {type(record).__name__}, not an object", digest)
    name = _pick_field(record)
    if name is None:
        return InputRow(row, None, "no 'prompt' or 'caption' field", digest)
    if not isinstance(record[name], str):
        kind = "null" if record[name] is None else type(record[name]).__name__
        return InputRow(row, None, f"'{name}' is {kind}, not text", digest)
    return _with_columns(_check_text(row, record[name]), record.get(LABEL_FIELD), record.get(ID_FIELD))


def _csv_lines(handle: IO[bytes]) -> Iterator[str]:
    """Lines for the csv module, terminators kept (quoted fields may span lines); bad UTF-8 survives as
    surrogates so that only the record holding it is skipped."""
    for number, line in enumerate(handle):
        text = line.decode("utf-8", "surrogateescape")
        yield text.removeprefix("\ufeff") if number == 0 else text


def _iter_csv(path: Path) -> Iterator[InputRow]:
    with path.open("rb") as handle:
        reader = csv.reader(_csv_lines(handle))
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise MemattnError(f"{path}: the CSV header is unreadable ({error})") from None
        name = next((n for n in FIELDS if n in header), None)
        if name is None:
            raise MemattnError(f"{path} has no 'prompt' or 'caption' column (found: {', '.join(header)})")
        column = header.index(name)
        extra = [header.index(n) if n in header else None for n in (LABEL_FIELD, ID_FIELD)]
        row = 0
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                yield InputRow(row, None, f"CSV error: {error}")
                row += 1
                continue
            values = [record[i] if i is not None and i < len(record) else None for i in extra]
            yield _with_columns(_csv_row(row, record, column, name), *values)
            row += 1


def _csv_row(row: int, record: list[str], column: int, name: str) -> InputRow:
    if not record:
        return InputRow(row, None, "empty line")
    if column >= len(record):
        return InputRow(row, None, f"no value in column '{name}' ({len(record)} fields)")
    value = record[column]
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogateescape")
        _, problem = _decode(raw, False)
        return InputRow(row, None, problem, sha(raw))
    return _check_text(row, value, raw)


def _parquet_field(path: Path, schema: pa.Schema) -> str:
    name = next((n for n in FIELDS if n in schema.names), None)
    if name is None:
        raise MemattnError(f"{path} has no 'prompt' or 'caption' column (found: {', '.join(schema.names)})")
    kind = schema.field(name).type
    if not (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    ):
        raise MemattnError(f"{path}: column '{name}' holds {kind}, not text")
    return name


def _iter_parquet(path: Path) -> Iterator[InputRow]:
    try:
        source = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        raise MemattnError(f"{path} is not a readable Parquet file ({error})") from None
    name = _parquet_field(path, source.schema_arrow)
    extra = [n for n in (LABEL_FIELD, ID_FIELD) if n in source.schema_arrow.names]
    row = 0
    for batch in source.iter_batches(batch_size=1024, columns=[name, *extra]):
        columns = {n: batch.column(n).to_pylist() for n in extra}
        for i, value in enumerate(batch.column(0).to_pylist()):
            if value is None:
                item = InputRow(row, None, f"'{name}' is null")
            elif isinstance(value, bytes):
                text, problem = _decode(value, False)
                item = InputRow(row, None, problem, sha(value)) if text is None else _check_text(row, text)
            else:
                item = _check_text(row, value)
            values = [columns[n][i] if n in columns else None for n in (LABEL_FIELD, ID_FIELD)]
            yield _with_columns(item, *values)
            row += 1


def check_input(path: str | Path) -> Path:
    """The prompt file, or a one-line error naming what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise MemattnError(f"prompt file {path} does not exist")
    if path.suffix.lower() not in SUFFIXES:
        raise MemattnError(
            f"{path}: unsupported prompt file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}"
        )
    if path.suffix.lower() != ".parquet":
        with path.open("rb") as handle:
            if b"\x00" in handle.read(_SNIFF_BYTES):
                raise MemattnError(
                    f"{path} looks like a binary file (NUL bytes in its first {_SNIFF_BYTES // 1024} KiB), "
                    "not a text prompt file; pass a .txt, .jsonl, .csv or .parquet file of prompts"
                )
    return path


def iter_prompts(path: str | Path) -> Iterator[InputRow]:
    """Stream a prompt file: one :class:`InputRow` per line (.txt/.jsonl) or record (.csv/.parquet).

    Bad lines are yielded with a reason, never raised; only a file-level problem (no prompt column)
    raises :class:`MemattnError`. Memory stays bounded by one line (at most ``MAX_PROMPT_BYTES``) or one
    Parquet record batch.
    """
    path = check_input(path)
    readers = {".txt": _iter_txt, ".jsonl": _iter_jsonl, ".csv": _iter_csv, ".parquet": _iter_parquet}
    return readers[path.suffix.lower()](path)


def count_rows(path: str | Path) -> int | None:
    """Rows the scan will produce, when cheap to know (line count; Parquet metadata); None for CSV."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (OSError, pa.ArrowException):
            return None
    if suffix not in (".txt", ".jsonl"):
        return None
    lines, last = 0, b"\n"
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# ---- batches ----------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Input rows ``[index·size, index·size + len(rows))``; always the same rows for the same input."""

    index: int
    start: int
    rows: list[InputRow]

    @property
    def stop(self) -> int:
        return self.start + len(self.rows)


def batches(rows: Iterable[InputRow], size: int) -> Iterator[Batch]:
    """Group consecutive rows into fixed-boundary batches (batch ``k`` = rows ``[k·size, (k+1)·size)``)."""
    current: list[InputRow] = []
    for item in rows:
        current.append(item)
        if len(current) == size:
            yield Batch(current[0].row // size, current[0].row, current)
            current = []
    if current:
        yield Batch(current[0].row // size, current[0].row, current)


class Covered:
    """Sorted, merged half-open row ranges already written (read from part footers)."""

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self.starts: list[int] = []
        self.stops: list[int] = []
        for start, stop in sorted(ranges):
            if self.stops and start < self.stops[-1]:
                raise MemattnError(
                    f"rows {start}..{stop - 1} are in two parts of the output (written by two scans at "
                    "once?); delete the output directory and scan again"
                )
            if self.stops and start == self.stops[-1]:
                self.stops[-1] = stop
            else:
                self.starts.append(start)
                self.stops.append(stop)

    def __contains__(self, row: int) -> bool:
        i = bisect.bisect_right(self.starts, row) - 1
        return i >= 0 and row < self.stops[i]

    @property
    def rows(self) -> int:
        return sum(b - a for a, b in zip(self.starts, self.stops, strict=True))
