"""Prompt files: .txt / .jsonl / .csv / .parquet, with errors that name the file and the fix."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memattn.errors import MemattnError
from memattn.prompts_io import read_prompts

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
    with pytest.raises(MemattnError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe broken\n")
    with pytest.raises(MemattnError, match="not valid UTF-8"):
        read_prompts(tmp_path / "bad.txt")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(MemattnError, match="line 2 is not valid JSON"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "nofield.csv").write_text("id,text\n1,a\n")
    with pytest.raises(MemattnError, match="no 'prompt' or 'caption' field"):
        read_prompts(tmp_path / "nofield.csv")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(MemattnError, match="could not be read"):
        read_prompts(tmp_path / "corrupt.parquet")
