"""The mitigation benchmark's files: CSV, JSON with the notes the table cannot say, the Pareto PNG."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memattn.bench.pareto import pareto_figure
from memattn.errors import MemattnError


def figure_axes(rows: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """(copy similarity, alignment) columns: lower x = less copying, higher y = more faithful."""
    if rows and rows[0].get("mode") == "testbed":
        return "similarity_128", "alignment_clean"
    measured = any(math.isfinite(row.get("sscd_train", float("nan"))) for row in rows)
    return ("sscd_train" if measured else "sscd_gen"), "clip_score_clean"


def bench_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What the table cannot say by itself: unmeasured columns and measure caveats."""
    notes = []
    if not rows:
        return notes
    if rows[0].get("mode") == "testbed":
        if any(not math.isfinite(row["copy_rate_128"]) for row in rows):
            notes.append("no 128-copy item among the sampled prompts: raise --per-group (48 samples all)")
        if any(row["method"] == "guard" for row in rows):
            notes.append(
                "guard rows: threshold at the stated FPR on 300 seen-once captions (never generated here); "
                "flagged_128 / flagged_clean: share of those generations the guard edited"
            )
        if any(row["method"] == "wen" for row in rows):
            notes.append(
                "wen's default target loss (3) is SD1's scale; testbed noise norms are ~15 (try 15,10,5)"
            )
        return notes
    if all(not math.isfinite(row["sscd_gen"]) for row in rows):
        notes.append("copy similarity not measured: pass --sscd FILE (an SSCD TorchScript model)")
    else:
        notes.append(
            "sscd_gen: SSCD cosine to the unmitigated generation of the same prompt and seed (none = 1)"
        )
    if all(not math.isfinite(row["clip_score_clean"]) for row in rows):
        notes.append("alignment not measured: pass --clip DIR (a local CLIP model) and --clean FILE")
    return notes


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_outputs(
    rows: Sequence[dict[str, Any]], out: str | Path, title: str | None = None
) -> dict[str, Path]:
    """``mitigation_bench.csv``, ``mitigation_bench.json`` (rows + notes) and ``pareto.png`` in ``out``."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MemattnError(f"cannot create --out {out} ({error.strerror})") from None
    columns = list(dict.fromkeys(key for row in rows for key in row))
    written = {"csv": out / "mitigation_bench.csv", "json": out / "mitigation_bench.json"}
    with written["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    x_key, y_key = figure_axes(rows)
    payload = {
        "rows": [{k: _json_value(v) for k, v in row.items()} for row in rows],
        "notes": bench_notes(rows),
        "pareto_axes": [x_key, y_key],
    }
    written["json"].write_text(json.dumps(payload, indent=1))
    if rows:
        run = rows[0]
        title = title or (
            f"mitigations on {run['model']} ({run['mode']} measures; guidance {run['guidance']:g}, "
            f"{run['steps']} steps, {run['seeds']} seed(s))"
        )
        figure = pareto_figure(rows, out / "pareto.png", x_key, y_key, title)
        if figure is not None:
            written["png"] = figure
    return written
