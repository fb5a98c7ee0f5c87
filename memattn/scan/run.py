"""Scan a prompt file for memorization: one row per prompt, written incrementally, resumable after a crash.

Why it looks like this (docs/scan.md has the user-facing version):

- **Streaming.** Prompts are read line by line (``.txt``/``.jsonl``/``.csv``) or record batch by record
  batch (``.parquet``) and scored batch by batch; only one batch and one output part are ever in memory,
  so memory does not grow with the input.
- **Bad input never stops the scan.** Every input line or record becomes exactly one output row; a line
  that cannot be scored (empty, not UTF-8, not JSON, no prompt field, over-long ...) becomes a row with
  ``status="skipped"`` and a ``reason``.
- **Fixed batches.** Batch ``k`` is always input rows ``[k·B, (k+1)·B)`` (skipped lines keep their row
  numbers and are just left out of the UNet call). The UNet's floats depend slightly on the batch it
  runs in, so a resumed scan must re-form exactly the batches an uninterrupted scan forms: then its rows
  are bit-identical (same device, dtype and thread count). Seeds are per row (``seed + row``).
- **Crash-safe parts.** Output is a directory of Parquet part files, each holding complete batches and
  naming the row ranges it covers in its footer. A part is written to a hidden temp name, fsynced and
  renamed into place (``os.replace`` is atomic), so a part either exists complete or not at all; a
  SIGKILL at any point leaves at most a temp file, which the next run deletes. Resuming reads only the
  part footers (row ranges) and skips the batches they cover: 0 lost, 0 duplicated rows.
- **Same settings or nothing.** A manifest (``_memattn_scan.json``) stores everything that changes a
  row's values (input hash, model fingerprint, seed, batch size, steps, ...); resuming with different
  settings is refused instead of mixing rows of two scans.

``pyarrow.parquet.read_table(OUT)`` (or ``pyarrow.dataset.dataset(OUT)``) reads the result: files whose
names start with ``_`` or ``.`` (manifest, lock, temp files) are ignored by pyarrow.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from memattn._version import __version__
from memattn.errors import Interrupted, MemattnError
from memattn.paths import writable_directory
from memattn.scan.inputs import Batch, Covered, InputRow, batches, check_input, count_rows, iter_prompts
from memattn.scan.output import (
    PartWriter,
    ScanLock,
    clean_temp,
    finish_manifest,
    prepare_manifest,
    read_parts,
    scan_identity,
)
from memattn.scan.schema import (
    ENGINES,
    SCORE_COLUMNS,
    ScanSettings,
)
from memattn.scan.scoring import (
    BatchScorer,
    Calibrated,
    check_calibration,
    load_calibration,
    load_detector,
    quiet_truncation_warnings,
)

# ---- the scan ----------------------------------------------------------------------------------------


@dataclass
class ScanSummary:
    out: Path
    rows: int
    ok: int
    skipped: int
    flagged: int
    truncated: int
    resumed_rows: int
    scanned_rows: int
    seconds: float
    calibrated: bool
    counts: dict[str, int] = field(default_factory=dict)
    engine_info: dict[str, Any] = field(default_factory=dict)  # "engine"; Ray: actors, rows_per_actor, ...

    @property
    def prompts_per_second(self) -> float:
        return self.scanned_rows / self.seconds if self.seconds > 0 else 0.0


def _skipped_row(item: InputRow, seed: int, model: str, version: str) -> dict[str, Any]:
    return {
        "row": item.row,
        "prompt": item.prompt,
        "prompt_sha256": item.sha256,
        "id": item.id,
        "label": item.label,
        "seed": seed,
        "status": "skipped",
        "reason": item.reason,
        **dict.fromkeys(SCORE_COLUMNS),
        "flagged": None,
        "threshold": None,
        "trigger_tokens": None,
        "n_tokens": None,
        "truncated": None,
        "model": model,
        "memattn_version": version,
    }


def score_batch(
    scorer: BatchScorer, batch: Batch, settings: ScanSettings, model: str, version: str
) -> list[dict[str, Any]]:
    """Output rows of one batch, in input order: its good prompts go through one pipeline call."""
    rows: dict[int, dict[str, Any]] = {}
    good: list[InputRow] = []
    notes: dict[int, str] = {}
    candidates = [item for item in batch.rows if item.reason is None]
    counts = scorer.token_counts([item.prompt for item in candidates]) if candidates else []
    for item, count in zip(candidates, counts, strict=True):
        if count > scorer.max_length:
            note = f"over {scorer.max_length} tokens ({count} with the special tokens)"
            if settings.too_long == "skip":
                item = replace(item, reason=note)
                rows[item.row] = _skipped_row(item, settings.seed + item.row, model, version)
                continue
            notes[item.row] = f"{note}: scored on the first {scorer.max_length}"
        good.append(item)
    for item in batch.rows:
        if item.reason is not None:
            rows[item.row] = _skipped_row(item, settings.seed + item.row, model, version)
    if good:
        seeds = [settings.seed + item.row for item in good]
        scored = scorer.score([item.prompt for item in good], seeds)
        for item, seed, values in zip(good, seeds, scored, strict=True):
            rows[item.row] = {
                "row": item.row,
                "prompt": item.prompt,
                "prompt_sha256": item.sha256,
                "id": item.id,
                "label": item.label,
                "seed": seed,
                "status": "ok",
                "reason": notes.get(item.row),
                **values,
                "model": model,
                "memattn_version": version,
            }
    return [rows[item.row] for item in batch.rows]


def scan(
    prompts: str | Path,
    out: str | Path,
    settings: ScanSettings,
    *,
    calibration: str | None = None,
    rows_per_part: int = 2048,
    seconds_per_part: float = 60.0,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    pipe: Any = None,
    engine: str = "local",
    ray_address: str | None = None,
    actors: int | None = None,
    cpus_per_actor: int = 1,
) -> ScanSummary:
    """Scan a prompt file into ``out`` (a directory of Parquet parts); resumes an interrupted scan.

    ``pipe`` reuses an already loaded pipeline (it must be ``settings.model`` on ``settings.device``).
    ``on_batch(rows_done)`` is called after each scored batch (benchmarks sample memory there).

    ``engine="ray"`` scores the same fixed batches on a pool of Ray actors (``memattn.scan.ray_engine``):
    ``actors`` of them (default: one per GPU of the cluster with a cuda ``device``, else 2), each holding
    the pipeline on one GPU or ``cpus_per_actor`` CPUs (and as many torch threads), on the cluster at
    ``ray_address`` (default: a new local one, or ``RAY_ADDRESS``'s). The rows are identical to the local
    engine's, so the engine is not part of the manifest: a scan may be resumed with either.
    """
    from tqdm.auto import tqdm

    settings.check()
    if engine not in ENGINES:
        raise MemattnError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine != "local" and pipe is not None:
        raise MemattnError("pipe= reuses a pipeline in this process: only the local engine can use it")
    if rows_per_part < 1:
        raise MemattnError(f"rows per part must be at least 1, got {rows_per_part}")
    input_path = check_input(prompts)
    total = count_rows(input_path)
    empty = total == 0 or (total is None and next(iter(iter_prompts(input_path)), None) is None)
    if empty:  # before --out is made: an empty scan would only look like a finished one
        raise MemattnError(f"{input_path} holds no prompts (no lines or rows): nothing to scan")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MemattnError(f"--out {out} is a file; the scan writes a directory of Parquet parts there")
    writable_directory(out, "--out")
    calibrated = load_calibration(settings.model, calibration)
    check_calibration(calibrated, settings)
    detector = load_detector(settings.model)
    extras = {
        "calibration": calibrated.identity() if calibrated else None,
        "detector_sha256": detector[1] if detector else None,
    }
    identity = scan_identity(settings, input_path, extras)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with ScanLock(out), quiet_truncation_warnings():
        clean_temp(out)
        prepare_manifest(out, identity, input_path)
        covered, _ = read_parts(out)
        resumed = covered.rows
        writer = PartWriter(out, rows_per_part, seconds_per_part)
        done = resumed
        info: dict[str, Any] = {"engine": engine}
        if engine == "ray":
            from memattn.scan.ray_engine import score_on_ray

            scored = score_on_ray(
                input_path,
                settings,
                covered,
                calibration=calibrated,
                detector=detector[0] if detector else None,
                total=total,
                address=ray_address,
                actors=actors,
                cpus_per_actor=cpus_per_actor,
                info=info,
            )
        else:
            scored = _score_locally(input_path, settings, covered, calibrated, detector, pipe, __version__)
        bar = tqdm(
            total=total,
            initial=resumed,
            unit=" prompts",
            desc="scan",
            disable=not progress,
            dynamic_ncols=True,
        )
        try:
            for batch, rows in scored:
                writer.add(batch, rows)
                done += len(rows)
                bar.update(len(rows))
                if on_batch is not None:
                    on_batch(done)
            writer.flush()
        except BaseException as error:
            with suppress(Exception):  # keep the complete batches already scored (Ctrl-C, an error)
                writer.flush()
            if isinstance(error, KeyboardInterrupt):
                kept = read_parts(out)[0].rows
                raise Interrupted(f"{kept} rows kept in {out}; rerun the same command to resume") from None
            raise
        finally:
            scored.close()  # stops the engine (Ray: its actors, and a cluster it started)
            bar.close()
        _, counts = read_parts(out)
        finish_manifest(out, counts)
    return ScanSummary(
        out=out,
        rows=counts.get("rows", 0),
        ok=counts.get("ok", 0),
        skipped=counts.get("skipped", 0),
        flagged=counts.get("flagged", 0),
        truncated=counts.get("truncated", 0),
        resumed_rows=resumed,
        scanned_rows=done - resumed,
        seconds=time.perf_counter() - started,
        calibrated=calibrated is not None,
        counts=counts,
        engine_info=info,
    )


def _score_locally(
    input_path: Path,
    settings: ScanSettings,
    covered: Covered,
    calibrated: Calibrated | None,
    detector: tuple[Any, str] | None,
    pipe: Any,
    version: str,
) -> Iterator[tuple[Batch, list[dict[str, Any]]]]:
    """The local engine: the batches not in ``covered``, scored in this process, in input order."""
    scorer: BatchScorer | None = None
    for batch in batches(iter_prompts(input_path), settings.batch_size):
        if batch.start in covered:
            continue
        if scorer is None:  # loaded on the first batch to score: a finished scan loads nothing
            scorer = BatchScorer(
                pipe if pipe is not None else _load(settings),
                settings,
                calibrated,
                detector[0] if detector else None,
            )
        yield batch, score_batch(scorer, batch, settings, settings.model, version)


def _load(settings: ScanSettings) -> Any:
    from memattn.loading import load_pipeline, parse_dtype

    return load_pipeline(
        settings.model, dtype=parse_dtype(settings.dtype), device=settings.device, progress_bar=False
    )


def read_results(out: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All rows of a scan, sorted by input row."""
    table = pq.read_table(Path(out), columns=columns)
    return table.sort_by("row") if "row" in table.column_names else table
