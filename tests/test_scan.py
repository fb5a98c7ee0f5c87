"""`memattn scan`: streaming readers, bad lines, fixed batches, atomic parts, resume after SIGKILL, flags."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from conftest import HANG_GUARD_S
from typer.testing import CliRunner

from memattn.cli.scan import register
from memattn.errors import Interrupted, MemattnError
from memattn.scan import (
    MANIFEST_FILE,
    MAX_PROMPT_BYTES,
    SCHEMA,
    TEMP_PREFIX,
    ScanSettings,
    count_rows,
    iter_prompts,
    read_results,
    scan,
)
from memattn.testbed.data import BACKGROUNDS, COLORS, PHRASINGS, POSITIONS, SHAPES, SIZES, caption_for

# The main CLI registers the command itself; here a local app stands in for it (and maps errors as
# memattn.cli.main does: one line, exit 2).
CLI = """
import typer
from memattn.errors import run_cli
from memattn.cli.scan import register
app = typer.Typer(); app.callback()(lambda: None); register(app)
run_cli(app)
"""
SETTINGS = ScanSettings(model="testbed", batch_size=8, guidance_scale=2.0, steps=50)


def synthetic_prompts(n: int, seed: int = 0) -> list[str]:
    """Testbed-style captions (random attributes, phrasing and style suffix)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        attributes = {
            "background": rng.choice(list(BACKGROUNDS)),
            "color": rng.choice(list(COLORS)),
            "shape": rng.choice(SHAPES),
            "size": rng.choice(list(SIZES)),
            "position": rng.choice(list(POSITIONS)),
        }
        prompts.append(caption_for(attributes, rng.randrange(len(PHRASINGS)), rng.randrange(6)))
    return prompts


@pytest.fixture(scope="module")
def pipe():
    from memattn.loading import load_pipeline

    return load_pipeline("testbed")


def rows_of(path: Path) -> list[tuple]:
    return [(r.row, r.prompt, r.reason) for r in iter_prompts(path)]


# ---- readers (no model) ----------------------------------------------------------------------------------


def test_txt_reader_records_every_bad_line(tmp_path):
    path = tmp_path / "p.txt"
    long_line = b"x" * (MAX_PROMPT_BYTES + 10)
    path.write_bytes(
        b"\xef\xbb\xbfa red circle\r\n\n   \nbad \xff\xfe bytes\n" + long_line + b"\nlast without newline"
    )
    rows = rows_of(path)
    assert [r[0] for r in rows] == list(range(6)) and count_rows(path) == 6
    assert rows[0] == (0, "a red circle", None)  # BOM and CRLF removed
    assert rows[1] == (1, "", "empty prompt") and rows[2] == (2, "   ", "empty prompt")
    assert rows[3][1] is None and rows[3][2].startswith("not valid UTF-8")
    assert (
        rows[4][1] is None and rows[4][2] == f"line longer than {MAX_PROMPT_BYTES} bytes ({len(long_line)})"
    )
    assert rows[5] == (5, "last without newline", None)
    hashes = [r.sha256 for r in iter_prompts(path)]
    assert all(len(h) == 64 for h in hashes) and len(set(hashes)) == 6


def test_jsonl_reader_records_every_bad_line(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [
        b'{"prompt": "a red circle"}',
        b'{"caption": "a blue square"}',
        b"not json",
        b'["a list"]',
        b'{"text": "no field"}',
        b'{"prompt": null}',
        b'{"prompt": 3}',
        b'{"prompt": ""}',
        b"",
        b'{"prompt": "caf\xe9"}',
        '{"prompt": "unicode ok: café"}'.encode(),
        b'{"prompt": "lone \\ud800 surrogate"}',
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows = rows_of(path)
    assert count_rows(path) == len(lines) == len(rows)
    reasons = [r[2] for r in rows]
    assert rows[0][1:] == ("a red circle", None) and rows[1][1:] == ("a blue square", None)
    assert reasons[2].startswith("not valid JSON") and reasons[3] == "a JSON list, not an object"
    assert reasons[4] == "no 'prompt' or 'caption' field" and reasons[5] == "'prompt' is null, not text"
    assert reasons[6] == "'prompt' is int, not text" and reasons[7] == "empty prompt"
    assert reasons[8] == "empty line" and reasons[9].startswith("not valid UTF-8")
    assert rows[10][1:] == ("unicode ok: café", None)
    assert rows[11][1:] == (None, "not valid Unicode (lone surrogate)")


def test_csv_reader_records_every_bad_line(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(
        b'id,caption\n1,a red circle\n2,"a quoted\nmultiline, caption"\n3\n\n4,bad \xff byte\n5,\n6,last\n'
    )
    rows = rows_of(path)
    assert count_rows(path) is None  # records may span lines: the bar shows no total
    assert rows[0] == (0, "a red circle", None) and rows[1] == (1, "a quoted\nmultiline, caption", None)
    assert rows[2][2] == "no value in column 'caption' (1 fields)" and rows[3][2] == "empty line"
    assert rows[4][1] is None and rows[4][2].startswith("not valid UTF-8")
    assert rows[5][2] == "empty prompt" and rows[6] == (6, "last", None)
    (tmp_path / "bad.csv").write_text("id,text\n1,x\n")
    with pytest.raises(MemattnError, match="no 'prompt' or 'caption' column"):
        list(iter_prompts(tmp_path / "bad.csv"))


def test_parquet_reader_streams_and_records_bad_values(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a red circle", None, "", "a blue square"]}), path, row_group_size=2)
    assert rows_of(path) == [
        (0, "a red circle", None),
        (1, None, "'prompt' is null"),
        (2, "", "empty prompt"),
        (3, "a blue square", None),
    ]
    assert count_rows(path) == 4
    binary = tmp_path / "b.parquet"
    pq.write_table(pa.table({"caption": pa.array([b"ok text", b"\xff\xfe"], pa.binary())}), binary)
    rows = rows_of(binary)
    assert rows[0] == (0, "ok text", None) and rows[1][2].startswith("not valid UTF-8")
    numbers = tmp_path / "n.parquet"
    pq.write_table(pa.table({"prompt": [1, 2]}), numbers)
    with pytest.raises(MemattnError, match="holds int64, not text"):
        list(iter_prompts(numbers))


def test_unknown_input_is_one_clear_error(tmp_path):
    (tmp_path / "p.tsv").write_text("x")
    with pytest.raises(MemattnError, match="unsupported prompt file type"):
        scan(tmp_path / "p.tsv", tmp_path / "out", SETTINGS)
    with pytest.raises(MemattnError, match="does not exist"):
        scan(tmp_path / "nope.txt", tmp_path / "out", SETTINGS)


# ---- scanning ----------------------------------------------------------------------------------------


def write_all_formats(tmp_path: Path, prompts: list[str | None]) -> list[Path]:
    """The same rows in every format; None is a bad row (invalid UTF-8 or null)."""
    txt, jsonl, csv_path, parquet = (tmp_path / f"p.{s}" for s in ("txt", "jsonl", "csv", "parquet"))
    txt.write_bytes(b"\n".join(b"\xff bad" if p is None else p.encode() for p in prompts) + b"\n")
    jsonl.write_bytes(
        b"\n".join(
            b'{"prompt": "\xff"}' if p is None else json.dumps({"prompt": p}).encode() for p in prompts
        )
    )
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt"])
        writer.writerows([[""] if p is None else [p] for p in prompts])
    pq.write_table(pa.table({"prompt": pa.array(prompts, pa.string())}), parquet)
    return [txt, jsonl, csv_path, parquet]


def test_every_format_gives_the_same_rows(tmp_path, pipe):
    prompts: list[str | None] = synthetic_prompts(12)
    prompts[3] = None
    prompts[7] = ""
    tables = []
    for path in write_all_formats(tmp_path, prompts):
        summary = scan(path, tmp_path / f"out-{path.suffix[1:]}", SETTINGS, pipe=pipe, progress=False)
        assert (summary.rows, summary.ok, summary.skipped) == (12, 10, 2)
        tables.append(read_results(summary.out))
    table = tables[0]
    assert table.schema.remove_metadata().equals(SCHEMA.remove_metadata())
    assert table.column("row").to_pylist() == list(range(12))
    assert table.column("status").to_pylist() == ["skipped" if i in (3, 7) else "ok" for i in range(12)]
    assert table.column("seed").to_pylist() == list(range(12))
    assert table.column("model").unique().to_pylist() == ["testbed"]
    ok = table.filter(pa.compute.equal(table.column("status"), "ok"))
    for name in ("score_e", "wen_step1", "bos_share", "summary_share", "n_tokens"):
        assert ok.column(name).null_count == 0, name
    assert ok.column("score_d").null_count == len(ok) and ok.column("flagged").null_count == len(ok)
    assert all(len(t) == 3 for t in ok.column("trigger_tokens").to_pylist())
    columns = ["row", "status", "score_e", "wen_step1", "e_layers", "trigger_tokens", "prompt_sha256"]
    for other in tables[1:]:  # same rows, same batches, same seeds: identical scores in every format
        ok_other = other.filter(pa.compute.equal(other.column("status"), "ok"))
        assert ok_other.select(columns).equals(ok.select(columns))


def test_scan_matches_memattn_detect(tmp_path, pipe):
    from memattn.detection.detect import detect

    prompts = synthetic_prompts(10, seed=3)
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    summary = scan(tmp_path / "p.txt", tmp_path / "out", SETTINGS, pipe=pipe, progress=False)
    rows = read_results(summary.out).to_pylist()
    expected = detect(pipe, prompts, which=["e"], steps=50, guidance_scale=2.0, batch_size=8, progress=False)
    assert [r["score_e"] for r in rows] == [d.score_e for d in expected]
    assert [[(t["token"], t["share"]) for t in r["trigger_tokens"]] for r in rows] == [
        d.triggers for d in expected
    ]
    assert [(r["n_tokens"], r["truncated"]) for r in rows] == [(d.n_tokens, d.truncated) for d in expected]


def test_over_long_prompts_truncate_or_skip(tmp_path, pipe):
    long_prompt = "a red circle " + "with many words " * 30
    (tmp_path / "p.txt").write_text(f"a blue square\n{long_prompt}\n")
    truncated = read_results(
        scan(tmp_path / "p.txt", tmp_path / "t", SETTINGS, pipe=pipe, progress=False).out
    )
    row = truncated.to_pylist()[1]
    assert row["status"] == "ok" and row["truncated"] and row["n_tokens"] == 77
    assert row["reason"].startswith("over 77 tokens (") and row["reason"].endswith("scored on the first 77")
    assert truncated.to_pylist()[0]["reason"] is None
    skip = ScanSettings(**{**SETTINGS.__dict__, "too_long": "skip"})
    skipped = read_results(scan(tmp_path / "p.txt", tmp_path / "s", skip, pipe=pipe, progress=False).out)
    row = skipped.to_pylist()[1]
    assert row["status"] == "skipped" and row["score_e"] is None and row["prompt"] == long_prompt
    assert row["reason"].startswith("over 77 tokens (") and "scored" not in row["reason"]


def test_full_adds_score_d_and_keeps_step1_scores(tmp_path, pipe):
    from memattn.detection.detect import detect

    prompts = synthetic_prompts(3, seed=5)
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    full = ScanSettings(**{**SETTINGS.__dict__, "full": True, "steps": 3})
    step1 = ScanSettings(**{**SETTINGS.__dict__, "steps": 3})
    rows = read_results(
        scan(tmp_path / "p.txt", tmp_path / "f", full, pipe=pipe, progress=False).out
    ).to_pylist()
    first = read_results(scan(tmp_path / "p.txt", tmp_path / "e", step1, pipe=pipe, progress=False).out)
    expected = detect(pipe, prompts, which=["d"], steps=3, guidance_scale=2.0, progress=False)
    assert [r["score_d"] for r in rows] == [d.score_d for d in expected]
    for name in ("score_e", "wen_step1", "bos_share", "summary_share", "e_layers"):  # step 0 of the same run
        assert [r[name] for r in rows] == first.column(name).to_pylist(), name
    with pytest.raises(MemattnError, match="needs at least 2"):
        scan(tmp_path / "p.txt", tmp_path / "x", ScanSettings(model="testbed", full=True, steps=1), pipe=pipe)


# ---- resume ----------------------------------------------------------------------------------------------


def test_resume_after_an_error_continues_exactly(tmp_path, pipe):
    prompts = synthetic_prompts(60, seed=7)
    prompts[13] = ""
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    reference = read_results(
        scan(tmp_path / "p.txt", tmp_path / "ref", SETTINGS, pipe=pipe, progress=False).out
    )

    def crash(done: int) -> None:
        if done >= 32:
            raise KeyboardInterrupt

    # Ctrl-C becomes Interrupted (a MemattnError): it says what was kept and how to resume
    with pytest.raises(Interrupted, match="32 rows kept in .*; rerun the same command to resume"):
        scan(
            tmp_path / "p.txt",
            tmp_path / "out",
            SETTINGS,
            pipe=pipe,
            progress=False,
            rows_per_part=16,
            on_batch=crash,
        )
    assert len(read_results(tmp_path / "out")) == 32  # complete batches were kept on the way out
    summary = scan(
        tmp_path / "p.txt", tmp_path / "out", SETTINGS, pipe=pipe, progress=False, rows_per_part=16
    )
    assert (summary.resumed_rows, summary.scanned_rows, summary.rows) == (32, 28, 60)
    assert read_results(tmp_path / "out").equals(reference)
    again = scan(tmp_path / "p.txt", tmp_path / "out", SETTINGS, progress=False)  # complete: loads nothing
    assert (again.scanned_rows, again.rows) == (0, 60)
    assert json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())["complete"] is True


def test_half_written_parts_are_ignored_and_removed(tmp_path, pipe):
    prompts = synthetic_prompts(24, seed=9)
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    out = tmp_path / "out"
    reference = read_results(
        scan(tmp_path / "p.txt", out, SETTINGS, pipe=pipe, progress=False, rows_per_part=8).out
    )
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 3
    data = parts[-1].read_bytes()
    parts[-1].unlink()  # as if killed while writing the last part: only its temp file exists
    temp = out / f"{TEMP_PREFIX}999-{parts[-1].name}"
    temp.write_bytes(data[: len(data) // 2])
    assert len(pq.read_table(out)) == 16  # pyarrow ignores the hidden temp file
    summary = scan(tmp_path / "p.txt", out, SETTINGS, pipe=pipe, progress=False, rows_per_part=8)
    assert (summary.resumed_rows, summary.scanned_rows) == (16, 8) and not temp.exists()
    assert read_results(out).equals(reference)


def test_resume_refuses_other_settings(tmp_path, pipe):
    (tmp_path / "p.txt").write_text("\n".join(synthetic_prompts(4)))
    scan(tmp_path / "p.txt", tmp_path / "out", SETTINGS, pipe=pipe, progress=False)
    for change, words in (
        ({"seed": 1}, "settings.seed: 0 then, 1 now"),
        ({"batch_size": 4}, "settings.batch_size"),
        ({"full": True}, "settings.full"),
        ({"guidance_scale": 3.0}, "settings.guidance_scale"),
    ):
        with pytest.raises(MemattnError, match=words.replace(".", r"\.")):
            scan(tmp_path / "p.txt", tmp_path / "out", ScanSettings(**{**SETTINGS.__dict__, **change}))
    (tmp_path / "p.txt").write_text("\n".join(synthetic_prompts(5)))
    with pytest.raises(MemattnError, match=r"other settings \(input\.bytes"):
        scan(tmp_path / "p.txt", tmp_path / "out", SETTINGS)
    (tmp_path / "file").write_text("x")
    with pytest.raises(MemattnError, match="is a file"):
        scan(tmp_path / "p.txt", tmp_path / "file", SETTINGS)


def test_calibration_next_to_the_model_sets_flagged(tmp_path, pipe):
    from memattn.loading import BUNDLED_TESTBED
    from memattn.mitigation.guard import CALIBRATION_FILE, Calibration

    model = tmp_path / "model"
    shutil.copytree(BUNDLED_TESTBED, model)
    prompts = synthetic_prompts(16, seed=11)
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    settings = ScanSettings(**{**SETTINGS.__dict__, "model": str(model)})
    plain = read_results(
        scan(tmp_path / "p.txt", tmp_path / "plain", settings, pipe=pipe, progress=False).out
    )
    median = float(np.median(plain.column("score_e").to_numpy()))
    Calibration(score="e", threshold=median, fpr=0.5, n_clean=16, guidance_scale=2.0, steps=50).save(
        model / CALIBRATION_FILE
    )
    with pytest.raises(MemattnError, match="other settings"):  # the same output, now calibrated: refused
        scan(tmp_path / "p.txt", tmp_path / "plain", settings, pipe=pipe, progress=False)
    summary = scan(tmp_path / "p.txt", tmp_path / "flagged", settings, pipe=pipe, progress=False)
    rows = read_results(summary.out).to_pylist()
    assert summary.calibrated and summary.flagged == sum(r["score_e"] > median for r in rows) == 8
    assert all(r["threshold"] == median and r["flagged"] == (r["score_e"] > median) for r in rows)
    off = scan(tmp_path / "p.txt", tmp_path / "off", settings, calibration="none", pipe=pipe, progress=False)
    assert read_results(off.out).column("flagged").null_count == 16
    other_guidance = ScanSettings(**{**settings.__dict__, "guidance_scale": 7.5})
    with pytest.raises(MemattnError, match="measured at guidance 2"):
        scan(tmp_path / "p.txt", tmp_path / "g", other_guidance, pipe=pipe)
    # E moves with the step count (the first step's timestep): a 50-step threshold at 4 steps flagged the
    # calibration prompts themselves; now refused, naming both counts.
    other_steps = ScanSettings(**{**settings.__dict__, "steps": 4})
    with pytest.raises(MemattnError, match="measured at steps 50, this run uses 4: run with --steps 50"):
        scan(tmp_path / "p.txt", tmp_path / "s", other_steps, pipe=pipe)
    Calibration(score="e", threshold=median, fpr=0.5, n_clean=16, guidance_scale=2.0).save(
        model / CALIBRATION_FILE
    )
    with pytest.raises(MemattnError, match="does not record its step count"):
        scan(tmp_path / "p.txt", tmp_path / "s", settings, pipe=pipe)


# ---- the command -----------------------------------------------------------------------------------------


def test_command_on_a_local_app(tmp_path):
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    (tmp_path / "p.txt").write_text("a red circle\n\na blue square\n")
    out = tmp_path / "results.parquet"
    args = ["scan", str(tmp_path / "p.txt"), "--model", "testbed", "--out", str(out), "--guidance", "2"]
    result = CliRunner().invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "3 rows in" in result.output and "ok 2, skipped 1" in result.output
    table = pq.read_table(out)  # the output directory reads like one Parquet file
    assert len(table) == 3 and table.schema.metadata[b"memattn.scan.schema_version"] == b"2"
    refused = CliRunner().invoke(app, [*args, "--seed", "4"])
    assert isinstance(refused.exception, MemattnError) and "settings.seed" in str(refused.exception)


def run_cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", CLI, "scan", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.mark.slow
def test_resume_after_sigkill_at_random_points(tmp_path):
    prompts: list[str] = synthetic_prompts(400, seed=13)
    for i in range(0, 400, 37):
        prompts[i] = ""  # bad lines inside batches keep their row numbers
    prompts[101] = "word " * 90  # truncated
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    common = [
        str(tmp_path / "p.txt"),
        "--model",
        "testbed",
        "--batch-size",
        "8",
        "--guidance",
        "2",
        "--part-rows",
        "16",
        "--no-progress",
    ]
    out = tmp_path / "killed"
    seed = int(time.time())
    rng = random.Random(seed)
    kills, during_startup = 0, False
    while kills < 6:
        before = len(list(out.glob("part-*.parquet")))
        proc = run_cli(*common, "--out", str(out))
        if not during_startup and kills == 3:  # once: at a random moment, wherever the process is
            time.sleep(rng.uniform(0.5, 4.0))
            during_startup = True
        else:  # otherwise: once it writes, at a random moment (often inside a part write)
            deadline = time.monotonic() + 120
            while proc.poll() is None and len(list(out.glob("part-*.parquet"))) <= before:
                assert time.monotonic() < deadline, "the scan wrote nothing for 2 minutes"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 5, f"the scan finished after {kills} kills (random seed {seed})"
    killed_rows = len(pq.read_table(out)) if any(out.glob("part-*.parquet")) else 0
    assert 0 < killed_rows < 400, killed_rows
    final = run_cli(*common, "--out", str(out))
    _, final_err = final.communicate(timeout=HANG_GUARD_S)
    assert final.returncode == 0, final_err
    assert f"resumed after {killed_rows} rows" in final_err
    reference = run_cli(*common, "--out", str(tmp_path / "reference"))
    _, reference_err = reference.communicate(timeout=HANG_GUARD_S)
    assert reference.returncode == 0, reference_err
    resumed, expected = read_results(out), read_results(tmp_path / "reference")
    rows = resumed.column("row").to_pylist()
    assert rows == list(range(400)), f"lost or duplicated rows (random seed {seed})"
    assert resumed.equals(expected), f"resumed rows differ from an uninterrupted scan (random seed {seed})"
    assert not list(out.glob(f"{TEMP_PREFIX}*"))
    assert resumed.column("status").to_pylist().count("skipped") == 11


def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path):
    """SIGINT exited 130 without a word; now it names the rows kept and the resume command."""
    (tmp_path / "p.txt").write_text("\n".join(synthetic_prompts(200, seed=3)) + "\n")
    args = [str(tmp_path / "p.txt"), "--model", "testbed", "--batch-size", "4", "--guidance", "2"]
    out = tmp_path / "out"
    proc = run_cli(*args, "--part-rows", "4", "--no-progress", "--out", str(out))
    deadline = time.monotonic() + 300
    while proc.poll() is None and not any(out.glob("part-*.parquet")):
        assert time.monotonic() < deadline, "the scan wrote nothing for 5 minutes"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    if proc.returncode == 0:
        pytest.skip("the scan finished before the signal arrived")
    kept = len(pq.read_table(out))
    assert proc.returncode == 130, err
    assert err.strip().endswith(f"interrupted: {kept} rows kept in {out}; rerun the same command to resume")
    assert 0 < kept < 200 and "Traceback" not in err


def test_cli_errors_are_one_line(tmp_path):
    proc = run_cli(str(tmp_path / "missing.txt"), "--model", "testbed", "--out", str(tmp_path / "o"))
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert (
        proc.returncode == 2
        and err.strip() == f"error: prompt file {tmp_path / 'missing.txt'} does not exist"
    )


def test_a_scan_that_wrote_nothing_does_not_block_the_next(tmp_path, pipe):
    (tmp_path / "p.txt").write_text("a red circle\n")
    wrong = ScanSettings(**{**SETTINGS.__dict__, "model": str(tmp_path / "no-such-model")})
    with pytest.raises(MemattnError, match="not found"):
        scan(tmp_path / "p.txt", tmp_path / "out", wrong, progress=False)
    assert (tmp_path / "out" / MANIFEST_FILE).is_file() and not list((tmp_path / "out").glob("part-*"))
    summary = scan(tmp_path / "p.txt", tmp_path / "out", SETTINGS, pipe=pipe, progress=False)
    assert summary.rows == 1 and summary.resumed_rows == 0


@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv", "parquet"])
def test_an_empty_input_is_refused_before_anything_is_written(tmp_path, kind):
    path = tmp_path / f"empty.{kind}"
    if kind == "parquet":
        pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    else:
        path.write_text("prompt\n" if kind == "csv" else "")
    with pytest.raises(MemattnError, match="holds no prompts .*nothing to scan"):
        scan(path, tmp_path / "out", SETTINGS, progress=False)
    assert not (tmp_path / "out").exists()
