"""`memattn report`: a self-contained HTML page of a scan's results, safe against hostile prompts.

The results are built here with pyarrow following the scan's schema (a directory of two part files and
a manifest, as `memattn scan` writes, and a single Parquet file). The heat maps and entropy curves come
from regenerating prompts with the bundled testbed model. The browser tests open the page in real
headless Chromium (tests/browser.py) and keep a screenshot in artifacts/test/ (or $MEMATTN_TEST_ARTIFACTS).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import browser  # tests/browser.py: pytest puts tests/ on sys.path
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from memattn.cli.report import register
from memattn.errors import MemattnError
from memattn.report import MANIFEST_FILE, highlight_segments, tokenization, write_scan_report
from memattn.scan.schema import SCHEMA as SCAN_SCHEMA

ARTIFACTS = Path(
    os.environ.get("MEMATTN_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts" / "test")
)
SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(2)>'
DOLLAR = "a $5 poster of a large red circle $x^2$ at the top"  # mathtext in a matplotlib label would break

SCHEMA = SCAN_SCHEMA  # scan keeps a labelled prompt file's label column (schema 2)
MEMORIZED = [
    SCRIPT,
    IMG,
    "large ring in yellow at the center, black background, pixel art",
    "white backdrop with a large blue circle at the top left",
    "large cross in pink at the bottom right, beige background, pixel art",
    DOLLAR,
]
CLEAN = [
    "the bottom right of a white picture shows a large yellow ring, minimal style",
    "there is a small pink cross in the bottom right against a black background",
    "small triangle in pink at the bottom left, beige background, minimal style",
    "a small green square at the top right, white background",
    "a large blue triangle at the center, black background",
    "an orange ring in the bottom left, minimal style",
]
THRESHOLD = 1.0


def _row(row: int, prompt: str | None, memorized: bool, model: str, **overrides) -> dict:
    words = re.findall(r"[a-z]+", (prompt or "").lower())
    score = 1.4 + 0.05 * row if memorized else 0.6 + 0.02 * row
    if memorized and row == 3:
        score = 0.9  # a memorized prompt the threshold misses (one false negative, for the ROC)
    triggers = [
        {"token": w + "</w>", "position": i + 1, "share": 0.3 - 0.1 * i} for i, w in enumerate(words[:2])
    ]
    values = {
        "row": row,
        "prompt": prompt,
        "prompt_sha256": f"{row:064x}",
        "seed": 100 + row,
        "status": "ok",
        "reason": None,
        "score_e": score,
        "wen_step1": 2 * score + 0.1,
        "bos_share": 0.5 - 0.1 * score,
        "summary_share": 0.3,
        "e_layers": [score, score / 2],
        "score_d": None,
        "flagged": score > THRESHOLD,
        "threshold": THRESHOLD,
        "trigger_tokens": triggers,
        "n_tokens": len(words) + 2,
        "truncated": False,
        "model": model,
        "memattn_version": "0.1.0",
        "label": int(memorized),
    }
    values.update(overrides)
    return values


def build_rows(model: str = "testbed") -> list[dict]:
    rows = [_row(i, p, True, model) for i, p in enumerate(MEMORIZED)]
    rows += [_row(len(rows) + i, p, False, model) for i, p in enumerate(CLEAN)]
    skipped = dict.fromkeys(
        (
            "score_e",
            "wen_step1",
            "bos_share",
            "summary_share",
            "e_layers",
            "flagged",
            "threshold",
            "trigger_tokens",
            "n_tokens",
            "truncated",
            "label",
        )
    )
    rows.append(
        _row(
            len(rows),
            None,
            False,
            model,
            status="skipped",
            reason="not valid UTF-8 (invalid start byte at byte 0)",
            prompt_sha256=None,
            **skipped,
        )
    )
    rows.append(_row(len(rows), "   ", False, model, status="skipped", reason="empty prompt", **skipped))
    return rows


def write_scan_dir(path: Path, rows: list[dict]) -> Path:
    """As `memattn scan` writes: part files plus a manifest (ignored by pyarrow: leading underscore)."""
    path.mkdir(parents=True)
    half = len(rows) // 2
    for first, chunk in ((0, rows[:half]), (half, rows[half:])):
        pq.write_table(pa.Table.from_pylist(chunk, schema=SCHEMA), path / f"part-{first:010d}.parquet")
    settings = {"model": "testbed", "seed": 100, "steps": 50, "guidance_scale": 7.5}
    calibration = {"threshold": THRESHOLD, "score": "e", "layer": None}
    manifest = {"identity": {"settings": settings, "calibration": calibration}}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    return path


@pytest.fixture(scope="module")
def testbed_report(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("report")
    results = write_scan_dir(base / "results", build_rows())
    return write_scan_report(
        results, base / "out" / "report.html", model="testbed", top=20, maps=2, steps=4, progress=False
    )


def _unmarked(html: str) -> str:
    """The page with <mark> wrappers removed: highlighted prompts read as one string again."""
    return re.sub(r"<mark[^>]*>|</mark>", "", html)


def test_highlight_segments_are_plain_text():
    triggers = [{"token": "alert</w>", "share": 0.25}, {"token": "script", "share": 0.1}]
    segments = highlight_segments(SCRIPT, triggers)
    assert "".join(s["text"] for s in segments) == SCRIPT
    marked = [(s["text"], s["share"]) for s in segments if s["trigger"]]
    assert marked == [("script", 0.1), ("alert", 0.25), ("script", 0.1)]
    # a token matches where it starts a word, case-insensitively; elsewhere only if it never starts one
    segments = highlight_segments("Cat concat", [{"token": "cat", "share": 0.5}])
    assert [s["text"] for s in segments if s["trigger"]] == ["Cat"]
    segments = highlight_segments("a cat at a mat", [{"token": "a</w>", "share": 0.5}])  # whole words only
    assert [(s["text"], s["token"]) for s in segments if s["trigger"]] == [("a", "a"), ("a", "a")]


def test_highlight_segments_by_token_position():
    """With the pipeline's tokenizer, a trigger's position marks exactly its characters."""
    from transformers import AutoTokenizer

    from memattn.loading import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(str(Path(resolve_model("testbed")) / "tokenizer"))
    prompt = "A cat at a MAT"
    tokens = tokenization(tokenizer, prompt)
    last = max(i for i, t in enumerate(tokens.tokens) if t.replace("</w>", "") == "at")  # the "at" of "MAT"
    segments = highlight_segments(prompt, [{"token": "at", "position": last, "share": 0.4}], tokens=tokens)
    assert "".join(s["text"] for s in segments) == prompt
    assert [(s["text"], s["share"]) for s in segments if s["trigger"]] == [("AT", 0.4)]
    assert segments[-2]["text"] == "A cat at a M"
    # a position that does not hold that token (another tokenizer's) falls back to matching the text
    segments = highlight_segments(prompt, [{"token": "cat", "position": 1, "share": 0.4}], tokens=tokens)
    assert [s["text"] for s in segments if s["trigger"]] == ["cat"]
    long = highlight_segments("x" * 50, [], limit=10)
    assert long[-1]["cut"] and "40 more characters" in long[-1]["text"]


def test_report_with_testbed_regenerations(testbed_report):
    html = testbed_report.read_text()
    for section in (
        'id="summary"',
        'id="scores"',
        'id="detection"',
        'id="top"',
        'id="maps"',
        'id="entropy"',
        'id="skipped"',
    ):
        assert section in html
    assert "Not available" not in html
    assert "Regeneration failed" not in html
    # hostile prompts are text: escaped, never markup
    text = _unmarked(html)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in text
    assert "<script" not in html.lower()
    assert "<img src=x" not in html and "onerror=alert(2)>" not in html
    assert DOLLAR in text
    # self-contained: every image inline, nothing fetched
    sources = re.findall(r'<img src="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert len(sources) == 1 + 1 + 4 + 1  # histograms, ROC, 2 flagged + 2 clean overlays, entropy
    assert not re.search(r'(src|href)="(https?:|//)', html)
    assert "Content-Security-Policy" in html
    # the top table: flagged rows only, highest E first, trigger tokens marked
    top = html.split('id="top"')[1].split('id="maps"')[0]
    assert "Top flagged prompts (5 of 5 flagged)" in top
    assert top.count("<tr>") == 1 + 5
    assert "<mark" in top and "pixel art" in top and "minimal style" not in top
    assert "white backdrop" not in top  # the memorized prompt below the threshold is not flagged
    # headers say which step a share is from; every score cell has the same three decimals
    assert '<th title="BOS attention share (step 1)">BOS share, step 1</th>' in top
    cells = re.findall(r"<td>(-?\d+\.\d+)</td>", top)
    assert cells and all(len(c.split(".")[1]) == 3 for c in cells), cells
    assert "AUC" in html and "flagged (FPR" not in html  # the legend is inside the PNG
    assert "not valid UTF-8" in html and "empty prompt" in html
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(testbed_report, ARTIFACTS / "report.html")


def test_report_without_model_says_why(tmp_path):
    rows = build_rows(model="/no/such/model")
    results = tmp_path / "results.parquet"  # a single file this time
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), results)
    html = write_scan_report(results, tmp_path / "a.html", progress=False).read_text()
    assert html.count("Not available") == 2
    assert "is not a local pipeline directory" in html
    assert "&lt;script&gt;" in _unmarked(html) and "<script" not in html.lower()
    assert "data:image/png;base64," in html  # histograms and ROC need no model
    html = write_scan_report(results, tmp_path / "b.html", model="none", progress=False).read_text()
    assert html.count("Not available: no model was given") == 2
    html = write_scan_report(
        results, tmp_path / "c.html", model=str(tmp_path / "missing"), maps=1, progress=False
    ).read_text()
    assert html.count("could not be loaded") == 2


def test_report_when_regeneration_fails(tmp_path):
    """A prompt whose regeneration fails costs its own overlay only; the reason is on the page."""
    results = tmp_path / "results.parquet"
    pq.write_table(pa.Table.from_pylist(build_rows(), schema=SCHEMA), results)
    html = write_scan_report(results, tmp_path / "r.html", pipe=object(), maps=1, progress=False).read_text()
    assert html.count("Regeneration failed: UnsupportedModelError") == 2
    assert html.count("Not available: every regeneration failed") == 2


def test_report_without_labels_or_threshold(tmp_path):
    rows = [
        {k: v for k, v in r.items() if k != "label"} | {"flagged": None, "threshold": None}
        for r in build_rows()
    ]
    schema = pa.schema([f for f in SCHEMA if f.name != "label"])
    results = tmp_path / "results.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), results)
    html = write_scan_report(results, tmp_path / "r.html", model="none", top=3, progress=False).read_text()
    assert "no label column" in html
    assert "The 3 highest-scoring prompts (no threshold" in html
    assert "not calibrated" in html


def test_report_of_a_real_scan(tmp_path):
    """The Parquet parts `memattn scan` writes (its own schema), reported with the testbed."""
    import memattn.scan as scan  # a broken import must fail, not skip

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\n".join([*MEMORIZED[:4], *CLEAN[:3], "", SCRIPT]).encode() + b"\n\xff\xfe\n")
    summary = scan.scan(
        prompts, tmp_path / "scan", scan.ScanSettings(model="testbed", steps=4, batch_size=5), progress=False
    )
    assert summary.rows == 10 and summary.skipped == 2
    page = write_scan_report(tmp_path / "scan", tmp_path / "r.html", maps=1, progress=False)
    html = page.read_text()
    assert "4 steps, guidance 2" in html  # regenerated at the scan's settings, not a default
    assert "Regeneration failed" not in html and "Not available" not in html
    assert "&lt;script&gt;" in _unmarked(html) and "<script" not in html.lower()
    assert html.count("<mark") >= 3  # trigger tokens placed by position with the testbed tokenizer
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == 1 + 2 + 1  # no labels: no ROC


def test_report_errors(tmp_path):
    with pytest.raises(MemattnError, match="do not exist"):
        write_scan_report(tmp_path / "nothing", tmp_path / "r.html")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(MemattnError, match="not a readable Parquet"):
        write_scan_report(tmp_path / "bad.parquet", tmp_path / "r.html")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(MemattnError, match="no 'prompt' column"):
        write_scan_report(tmp_path / "other.parquet", tmp_path / "r.html")


def test_report_command(tmp_path):
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """A parent so that `report` is a subcommand, as in memattn's CLI."""

    register(app)
    results = tmp_path / "results.parquet"
    pq.write_table(pa.Table.from_pylist(build_rows(), schema=SCHEMA), results)
    out = tmp_path / "page.html"
    arguments = ["report", str(results), "--out", str(out), "--model", "none", "--top", "5"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert out.is_file() and str(out) in result.output
    result = CliRunner().invoke(app, ["report", str(tmp_path / "missing"), "--out", str(out)])
    assert isinstance(result.exception, MemattnError)


# ---- real headless Chromium ------------------------------------------------------------------------------


@pytest.fixture
def chromium() -> str:
    """Chromium's binary; skipped without one unless $MEMATTN_REQUIRE_CHROMIUM=1 (CI): then a failure."""
    binary = browser.find_chromium()
    if binary is None:
        why = "Chromium not installed (apt-get install -y chromium, or set MEMATTN_CHROMIUM)"
        if os.environ.get("MEMATTN_REQUIRE_CHROMIUM") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return binary


DOM_CHECK = """({
  scripts: document.getElementsByTagName('script').length,
  handlers: [...document.querySelectorAll('*')].filter(e => [...e.attributes].some(
      a => a.name.startsWith('on'))).length,
  images: document.images.length,
  broken: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length,
  external: [...document.images].filter(i => !i.src.startsWith('data:image/png;base64,')).length,
  text: document.body.innerText,
})"""


def test_report_in_chromium(testbed_report, chromium):
    shot = ARTIFACTS / "report-chromium.png"
    page = browser.load_page(testbed_report, screenshot=shot, evaluate=DOM_CHECK, chromium=chromium)
    assert page.errors == [], page.errors  # console errors, CSP violations, failed loads, exceptions
    assert page.dialogs == []  # no alert() from a prompt ran
    dom = page.value
    assert dom["scripts"] == 0 and dom["handlers"] == 0
    assert dom["images"] == 7 and dom["broken"] == 0 and dom["external"] == 0
    assert SCRIPT in dom["text"] and IMG in dom["text"] and DOLLAR in dom["text"]
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_browser_check_sees_injection(tmp_path, chromium):
    """Control: the same checks catch a page where a prompt was pasted in unescaped."""
    bad = tmp_path / "bad.html"
    bad.write_text(f"<!doctype html><html><body><p>{SCRIPT}</p><p>{IMG}</p></body></html>")
    page = browser.load_page(bad, evaluate=DOM_CHECK, chromium=chromium)
    assert sorted(page.dialogs) == ["alert: 1", "alert: 2"]
    assert page.value["scripts"] == 1 and page.value["handlers"] == 1
    assert any("ERR_FILE_NOT_FOUND" in e for e in page.errors)  # the injected <img src=x>


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_a_labelled_scan_keeps_label_and_id_and_reports_a_roc(tmp_path, suffix):
    """``scan`` dropped the input's ``label`` column, so the report of a labelled scan said "no label
    column: no ROC". Now 0/1 labels and ids travel to the Parquet (bad labels become null)."""
    import memattn.scan as scan

    prompts = [*MEMORIZED[2:5], *CLEAN[:3]]
    labels = [1, 1, "1", 0, "false", "maybe"]
    ids = [f"p{i}" for i in range(len(prompts))]
    rows_in = list(zip(ids, prompts, labels, strict=True))
    path = tmp_path / f"in.{suffix}"
    if suffix == "jsonl":
        path.write_text("\n".join(json.dumps({"id": i, "prompt": p, "label": y}) for i, p, y in rows_in))
    elif suffix == "csv":
        path.write_text("id,prompt,label\n" + "".join(f'{i},"{p}",{y}\n' for i, p, y in rows_in))
    else:
        pq.write_table(pa.table({"id": ids, "prompt": prompts, "label": [str(y) for y in labels]}), path)
    settings = scan.ScanSettings(model="testbed", steps=4, batch_size=6)
    scan.scan(path, tmp_path / "scan", settings, progress=False)
    rows = scan.read_results(tmp_path / "scan").to_pylist()
    assert [r["label"] for r in rows] == [1, 1, 1, 0, 0, None]
    assert [r["id"] for r in rows] == ids
    html = write_scan_report(tmp_path / "scan", tmp_path / "r.html", maps=0, progress=False).read_text()
    assert "no label column" not in html and 'alt="ROC curves per score"' in html
