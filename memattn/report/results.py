"""Reading a scan's results for the report: the table, its manifest, scores, flags and thresholds."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from memattn.errors import MemattnError
from memattn.report.constants import MANIFEST_FILE, SCORE_LABELS, THRESHOLD_SCORES

# ---- reading the results ----------------------------------------------------------------------------


def read_scan_results(path: str | Path) -> pa.Table:
    """A scan's rows (one Parquet file or a directory of part files), sorted by ``row`` when present."""
    path = Path(path)
    if not path.exists():
        raise MemattnError(f"results {path} do not exist; pass the --out of `memattn scan`")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise MemattnError(f"{path} is not a readable Parquet file or directory of parts ({error})") from None
    if "prompt" not in table.column_names:
        raise MemattnError(
            f"{path} has no 'prompt' column (found: {', '.join(table.column_names)}); "
            "is it the output of `memattn scan`?"
        )
    return table.sort_by("row") if "row" in table.column_names else table


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The scan manifest next to the parts (settings, calibration), or {} when there is none."""
    manifest = Path(path) / MANIFEST_FILE
    if not manifest.is_file():
        return {}
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def manifest_part(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    """``manifest["identity"][name]`` when it is a mapping, else {}."""
    identity = manifest.get("identity")
    part = identity.get(name) if isinstance(identity, dict) else None
    return part if isinstance(part, dict) else {}


def _floats(table: pa.Table, name: str) -> np.ndarray | None:
    """A numeric column as float64 with NaN for nulls; None when absent or not numeric."""
    if name not in table.column_names:
        return None
    column = table.column(name)
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
        return None
    return np.asarray(pc.fill_null(column.cast(pa.float64()), math.nan).to_numpy(zero_copy_only=False))


def tristate(table: pa.Table, name: str) -> np.ndarray:
    """A bool/0-1 column as int8: 1, 0, or -1 for null, absent or anything else."""
    if name not in table.column_names:
        return np.full(table.num_rows, -1, dtype=np.int8)
    column = table.column(name)
    kind = column.type
    if pa.types.is_boolean(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind):
        values = pc.fill_null(column.cast(pa.float64()), -1.0).to_numpy(zero_copy_only=False)
        out = np.full(table.num_rows, -1, dtype=np.int8)
        out[values == 1] = 1
        out[values == 0] = 0
        return out
    return np.full(table.num_rows, -1, dtype=np.int8)


@dataclass
class Results:
    """The columns the report needs, as numpy arrays over all rows."""

    table: pa.Table
    ok: np.ndarray  # bool
    flagged: np.ndarray  # int8: 1, 0, -1 (not calibrated / skipped)
    label: np.ndarray  # int8: 1, 0, -1 (no label)
    scores: dict[str, np.ndarray]  # present score columns with at least one finite value
    threshold: float | None
    threshold_score: str | None
    rank_score: str | None

    @classmethod
    def from_table(cls, table: pa.Table, manifest: dict[str, Any], score: str | None = None) -> Results:
        if "status" in table.column_names:
            ok = np.asarray(
                pc.fill_null(pc.equal(table.column("status"), "ok"), False).to_numpy(zero_copy_only=False),
                dtype=bool,
            )
        else:
            ok = np.asarray(pc.is_valid(table.column("prompt")).to_numpy(zero_copy_only=False), dtype=bool)
        scores = {}
        for name in SCORE_LABELS:
            values = _floats(table, name)
            if values is not None and np.isfinite(values[ok]).any():
                scores[name] = values
        flagged = np.where(ok, tristate(table, "flagged"), -1).astype(np.int8)
        thresholds = _floats(table, "threshold")
        finite = thresholds[np.isfinite(thresholds)] if thresholds is not None else np.empty(0)
        threshold = float(finite[0]) if len(finite) else None
        threshold_score = None
        if threshold is not None:
            threshold_score = _threshold_score(scores, flagged, threshold, manifest)
        if score is not None and score not in scores:
            raise MemattnError(
                f"score {score!r} is not a score column of these results; they have "
                f"{', '.join(scores) or 'none'}"
            )
        rank = score or threshold_score or next((s for s in THRESHOLD_SCORES if s in scores), None)
        return cls(table, ok, flagged, tristate(table, "label"), scores, threshold, threshold_score, rank)

    @property
    def n(self) -> int:
        return self.table.num_rows

    def ranking(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Row indices (ok rows only, or those given): flagged first, then by rank score, highest first."""
        index = np.flatnonzero(self.ok) if rows is None else np.asarray(rows)
        score = self.scores.get(self.rank_score) if self.rank_score else None
        key = np.zeros(len(index))
        if score is not None:
            key = np.where(np.isfinite(score[index]), score[index], -np.inf)
        order = np.lexsort((index, -key, -(self.flagged[index] == 1).astype(np.int8)))
        return index[order]


def _threshold_score(
    scores: dict[str, np.ndarray], flagged: np.ndarray, threshold: float, manifest: dict[str, Any]
) -> str | None:
    """The score column the threshold applies to: the manifest's calibration, else the one that agrees
    with the flags (flagged exactly when score > threshold)."""
    calibration = manifest_part(manifest, "calibration")
    named = {"e": "score_e", "wen": "wen_step1"}.get(str(calibration.get("score")))
    if named in scores:
        return named
    known = flagged >= 0
    for name in THRESHOLD_SCORES:
        values = scores.get(name)
        if values is None:
            continue
        usable = known & np.isfinite(values)
        if usable.any() and np.array_equal(values[usable] > threshold, flagged[usable] == 1):
            return name
    return None


def value_counts(table: pa.Table, name: str, rows: np.ndarray | None = None) -> Counter:
    """Counts of a column's values (over ``rows`` when given), computed in Arrow (results can be large)."""
    if name not in table.column_names:
        return Counter()
    column = table.column(name)
    if rows is not None:
        column = pc.filter(column, pa.array(rows, type=pa.bool_()))
    counts = pc.value_counts(column).to_pylist()
    return Counter({item["values"]: item["counts"] for item in counts})
