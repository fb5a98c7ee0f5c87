"""Prompt files: .txt / .jsonl / .csv / .parquet, with errors that name the file and the fix."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memattn.errors import MemattnError
from memattn.prompts import read_prompts

PROMPTS = ["a dog", 'a "quoted", comma prompt', "ünïcödé"]


def test_every_format_reads_the_same_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:1] + [""] + PROMPTS[1:]) + "\n", encoding="utf-8")
    (tmp_path / "p.jsonl").write_text(
        "\n".join(json.dumps({"caption": p}) for p in PROMPTS), encoding="utf-8"
    )
    with (tmp_path / "p.csv").open("w", encoding="utf-8", newline="") as handle:
        import csv

        writer = csv.writer(handle)
        writer.writerow(["id", "prompt"])
        writer.writerows([[i, p] for i, p in enumerate(PROMPTS)])
    pq.write_table(pa.table({"prompt": PROMPTS}), tmp_path / "p.parquet")
    for suffix in ("txt", "jsonl", "csv", "parquet"):
        assert read_prompts(tmp_path / f"p.{suffix}") == PROMPTS, suffix


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(MemattnError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "p.xlsx").write_text("x")
    with pytest.raises(MemattnError, match="unsupported prompt file type '.xlsx'"):
        read_prompts(tmp_path / "p.xlsx")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(MemattnError, match="holds no usable prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "binary.txt").write_bytes(open("/bin/ls", "rb").read()[:20000])
    with pytest.raises(MemattnError, match="looks like a binary file"):
        read_prompts(tmp_path / "binary.txt")
    (tmp_path / "none.jsonl").write_text('{"prompt": null}\n{"prompt": 5}\n')
    with pytest.raises(MemattnError, match=r"no usable prompts \(2 rows skipped: line 1: 'prompt' is null"):
        read_prompts(tmp_path / "none.jsonl")
    (tmp_path / "nofield.csv").write_text("id,text\n1,a\n")
    with pytest.raises(MemattnError, match="no 'prompt' or 'caption' column"):
        read_prompts(tmp_path / "nofield.csv")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(MemattnError, match="is not a readable Parquet file"):
        read_prompts(tmp_path / "corrupt.parquet")


def test_bad_rows_are_skipped_with_their_reasons_not_scored_as_text(tmp_path):
    """The scan's reader for every command: null, numbers, empty fields, bad JSON, bad UTF-8 and NUL
    bytes are skipped and named (calibrate used to score ``None``, ``123`` and ``''`` as clean prompts,
    and one bad JSONL line aborted the file)."""
    import io

    (tmp_path / "nullish.jsonl").write_bytes(
        b'{"prompt": "a red circle"}\n{"prompt": ""}\n{"prompt": null}\n{"prompt": 123}\n{oops\n'
        b'{"prompt": "a dog"}\n{"prompt": "\xff\xfe"}\n{"prompt": "nul \\u0000 inside"}\n'
    )
    notes = io.StringIO()
    assert read_prompts(tmp_path / "nullish.jsonl", notes=notes) == ["a red circle", "a dog"]
    note = notes.getvalue()
    assert note.startswith(f"note: {tmp_path / 'nullish.jsonl'}: skipped 6 of 8 rows (line 2: empty prompt; ")
    assert "line 3: 'prompt' is null, not text; line 4: 'prompt' is int, not text; ..." in note
    (tmp_path / "gaps.csv").write_text("id,prompt\n1,a cat\n2,\n3,a cow\n")
    notes = io.StringIO()
    assert read_prompts(tmp_path / "gaps.csv", notes=notes) == ["a cat", "a cow"]
    assert "record 2: empty prompt" in notes.getvalue()
    (tmp_path / "layout.txt").write_text("a\n\n\nb\n")
    notes = io.StringIO()
    assert read_prompts(tmp_path / "layout.txt", notes=notes) == ["a", "b"] and notes.getvalue() == ""
