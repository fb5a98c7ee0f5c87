"""``memattn report``: one self-contained HTML page about a scan's results (the Parquet of ``memattn scan``).

The page holds every figure as an inline base64 PNG and no script; a Content-Security-Policy meta tag
forbids scripts and any non-``data:`` resource, so even a broken escape could not run a prompt's
``<script>``. Prompts are user data: the page is rendered by jinja2 with autoescape and no prompt is ever
marked safe. Trigger tokens are highlighted by cutting the prompt into plain-text segments in Python
(:func:`highlight_segments`); the template escapes each segment and wraps triggers in ``<mark>``.

Sections:

- counts and settings of the scan (rows, ok, skipped, flagged, threshold, model, version);
- score distributions: a histogram per score column, flagged vs not flagged, with the threshold line;
- detection: ROC curves, AUC and TPR at 1 % FPR per score when the table has a 0/1 ``label`` column;
- the top flagged prompts (or the highest-scoring, when nothing is flagged) with trigger tokens marked;
- DAAM-style per-token attention overlays and entropy-over-steps curves, flagged vs clean: the scan keeps
  no attention, so the selected prompts are generated again with the same seeds under
  :func:`memattn.trace`. Without a loadable model these two sections say why they are missing.
"""

from __future__ import annotations

import math
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
from jinja2 import Environment, PackageLoader, select_autoescape

from memattn.defaults import model_defaults
from memattn.errors import MemattnError
from memattn.report.constants import CSP, MANIFEST_FILE, SCORE_HEADERS, SCORE_LABELS
from memattn.report.figures import detection, entropy_figure, score_histograms
from memattn.report.regenerate import (
    Regenerated,
    load_model,
    local_tokenizer,
    map_steps_for,
    regenerate,
    select_for_maps,
)
from memattn.report.results import (
    Results,
    manifest_part,
    read_manifest,
    read_scan_results,
    tristate,
    value_counts,
)
from memattn.report.text import highlight_segments, token_label, tokenization

# ---- the page ------------------------------------------------------------------------------------------


def _row_view(row: dict[str, Any], results: Results, index: int, tokenizer: Any = None) -> dict[str, Any]:
    triggers = [t for t in (row.get("trigger_tokens") or []) if isinstance(t, dict)]
    shown = [{"token": token_label(str(t.get("token"))), "share": t.get("share")} for t in triggers]
    prompt = row.get("prompt")
    return {
        "row": row.get("row", index),
        "segments": highlight_segments(prompt, triggers, tokens=tokenization(tokenizer, prompt)),
        "prompt": row.get("prompt"),
        "flagged": row.get("flagged"),
        "label": row.get("label") if "label" in results.table.column_names else None,
        "scores": {name: row.get(name) for name in results.scores},
        "triggers": shown,
        "n_tokens": row.get("n_tokens"),
        "truncated": bool(row.get("truncated")),
        "seed": row.get("seed"),
        "reason": row.get("reason"),
    }


def _counts(results: Results) -> dict[str, Any]:
    truncated = tristate(results.table, "truncated")
    versions = sorted(v for v in value_counts(results.table, "memattn_version") if v)
    models = Counter({m: n for m, n in value_counts(results.table, "model").items() if m})
    return {
        "rows": results.n,
        "ok": int(results.ok.sum()),
        "skipped": int(results.n - results.ok.sum()),
        "flagged": int((results.flagged == 1).sum()),
        "calibrated": bool((results.flagged >= 0).any()),
        "truncated": int((truncated == 1).sum()),
        "labelled": int((results.label >= 0).sum()) if "label" in results.table.column_names else None,
        "models": [m for m, _ in models.most_common(5)],
        "versions": versions,
    }


def _skip_reasons(results: Results, limit: int = 10) -> list[tuple[str, int]]:
    if results.ok.all():
        return []
    if "reason" not in results.table.column_names:
        return [("no reason given", int((~results.ok).sum()))]
    counts = Counter()
    for reason, n in value_counts(results.table, "reason", ~results.ok).items():
        counts[reason or "no reason given"] += n
    return counts.most_common(limit)


def _number(value: Any, decimals: int = 3) -> str:
    """One format for every float in a table (3.070 beside 3.393, not 3.07 beside 0.0009324)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{decimals}f}"
    return str(value)


def write_scan_report(
    results_path: str | Path,
    out_path: str | Path,
    model: str | None = None,
    top: int = 20,
    maps: int = 4,
    *,
    steps: int | None = None,
    guidance_scale: float | None = None,
    score: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool = True,
    pipe: Any = None,
) -> Path:
    """Write one self-contained HTML report of a scan's results to ``out_path``; returns its path.

    ``model`` regenerates the top ``maps`` flagged and ``maps`` clean prompts (same seeds) for the heat
    maps and entropy curves: a pipeline directory, hub id or ``"testbed"``; ``None`` takes the table's
    ``model`` column when it is a local directory (or the bundled testbed); ``"none"`` skips them.
    ``pipe`` reuses a loaded pipeline instead. ``steps`` and ``guidance_scale`` of the regeneration:
    default the scan's (from its manifest), else the model's defaults (:mod:`memattn.defaults`), so
    the heat maps show the run the scores came from. ``score`` ranks the prompts
    (default: the score the threshold applies to, else E).
    """
    if top < 0 or maps < 0:
        raise MemattnError(f"--top and --maps must be ≥ 0, got {top} and {maps}")
    results_path, out_path = Path(results_path), Path(out_path)
    if out_path.is_dir():
        raise MemattnError(f"--out {out_path} is a directory; give the HTML file to write")
    table = read_scan_results(results_path)
    manifest = read_manifest(results_path) if results_path.is_dir() else {}
    results = Results.from_table(table, manifest, score)
    settings = manifest_part(manifest, "settings")
    fallback, _ = model_defaults(model or settings.get("model") or "")
    if guidance_scale is None:
        stored = settings.get("guidance_scale")
        guidance_scale = float(stored) if isinstance(stored, int | float) else fallback["guidance"]
    if steps is None:
        stored = settings.get("steps")
        known = isinstance(stored, int) and not isinstance(stored, bool)
        steps = int(stored) if known else int(fallback["steps"])
    if steps < 2:
        raise MemattnError(f"--steps {steps}: entropy over steps needs at least 2")

    ranking = results.ranking()
    regenerated: list[Regenerated] = []
    maps_note = entropy_note = None
    model_name = ""
    selection = select_for_maps(results, ranking, maps)
    if not selection:
        maps_note = entropy_note = (
            "Not available: no scored prompt to regenerate." if maps else "Not available: --maps 0."
        )
    else:
        why = None
        if pipe is None:
            pipe, why, model_name = load_model(model, results, device, dtype)
        else:
            model_name = model or "(given pipeline)"
        if pipe is None:
            maps_note = entropy_note = (
                f"Not available: {why}. The scan stores no attention maps; they come from generating "
                "the selected prompts again with the same seeds (memattn report --model PATH)."
            )
        else:
            picked = table.take(pa.array([i for i, _ in selection], type=pa.int64())).to_pylist()
            regenerated = regenerate(
                pipe,
                [(row, group) for row, (_, group) in zip(picked, selection, strict=True)],
                steps=steps,
                guidance_scale=guidance_scale,
                progress=progress,
            )
            good = [r for r in regenerated if r.error is None]
            if not good:
                maps_note = entropy_note = "Not available: every regeneration failed (the errors follow)."
    tokenizer = getattr(pipe, "tokenizer", None) or local_tokenizer(model, results)
    for item in regenerated:
        item.row = {**_row_view(item.row, results, -1, tokenizer), "group": item.group}
    shown = ranking[:top]
    rows = table.take(pa.array(shown, type=pa.int64())).to_pylist() if len(shown) else []
    top_rows = [_row_view(row, results, int(i), tokenizer) for row, i in zip(rows, shown, strict=True)]
    n_flagged = int((results.flagged == 1).sum())
    if n_flagged:
        top_rows = [r for r in top_rows if r["flagged"]]
        top_title = f"Top flagged prompts ({len(top_rows)} of {n_flagged} flagged)"
    elif (results.flagged == 0).any():
        top_title = f"No prompt was flagged; the {len(top_rows)} highest-scoring prompts"
    else:
        top_title = f"The {len(top_rows)} highest-scoring prompts (no threshold: the scan flagged nothing)"
    context = {
        "title": f"memattn scan report: {results_path.name}",
        "source": str(results_path),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "counts": _counts(results),
        "threshold": results.threshold,
        "threshold_score": results.threshold_score,
        "rank_score": results.rank_score,
        "score_labels": SCORE_LABELS,
        "score_headers": SCORE_HEADERS,
        "score_columns": list(results.scores),
        "scan_settings": settings,
        "histograms": score_histograms(results),
        "top_title": top_title,
        "top_rows": top_rows,
        "skip_reasons": _skip_reasons(results),
        "model": model_name,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "map_steps": map_steps_for(steps),
        "regenerated": regenerated,
        "maps_note": maps_note,
        "entropy_figure": entropy_figure([r for r in regenerated if r.error is None]),
        "entropy_note": entropy_note,
        "csp": CSP,
    }
    context["roc"], context["metrics"], context["roc_note"] = detection(results)
    environment = Environment(loader=PackageLoader("memattn"), autoescape=select_autoescape(["html"]))
    environment.filters["num"] = _number
    html = environment.get_template("report.html").render(**context)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(html, encoding="utf-8")
    return out_path


__all__ = ["highlight_segments", "read_scan_results", "write_scan_report"]


__all__ = ["MANIFEST_FILE", "highlight_segments", "tokenization", "write_scan_report"]
