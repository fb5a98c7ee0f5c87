"""The Ray engine of ``memattn scan``: the same fixed batches, scored by a pool of Ray actors.

Ray is imported only here, and only when the engine runs: memattn works without it.

- **Plan on the driver.** The driver reads the input with :func:`iter_prompts` and groups it with
  :func:`batches` (the one definition of row numbers, bad lines and batch boundaries, for every input
  format) and skips the batches the output already covers. Each remaining fixed batch becomes **one Ray
  record** (its rows, prompts, reasons and hashes as list columns); a few records make an Arrow block,
  put into the object store as it is made (``ray.data.from_arrow_refs``), so the driver holds one block
  at a time and workers never need to see the input file (no shared storage needed).
- **Score in actors.** ``map_batches(ScanActor, compute=ActorPoolStrategy(size=N))``: each actor loads
  the pipeline once and scores every record it is handed with :func:`memattn.scan.score_batch`, one
  pipeline call per record. Ray may split, merge or re-batch blocks as it likes, but it never splits a
  record, so every UNet call holds exactly the rows ``[k·B, (k+1)·B)`` the local engine puts in it: the
  alignment is guaranteed by construction, not by Ray's batch sizes. Same batches, same seeds, same
  thread count: the same floats.
- **Write on the driver.** The actors' rows stream back (``iter_batches``), are regrouped by fixed batch
  (``row // B``) and a batch goes to :class:`PartWriter` only once all its rows arrived: the same atomic
  parts, manifest, lock and resume as the local engine (a batch is written at most once, in any order;
  the part footers name the ranges). Workers never write; the output only has to be visible to the
  driver.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa

from memattn._version import __version__
from memattn.errors import MemattnError
from memattn.quiet import quiet_loading
from memattn.scan.inputs import Batch, Covered, InputRow, batches, iter_prompts
from memattn.scan.schema import SCHEMA, ScanSettings

RAY_REQUIREMENT = "ray[data]==2.58.0"
ROWS_PER_BLOCK = 64  # rows per Ray block at most (fewer for short inputs, so every actor gets work)
BLOCKS_PER_ACTOR = 4  # aim for at least this many blocks per actor (load balance at the tail)
WAIT_FOR_ACTORS_S = 600  # the whole actor pool must be up within this (else: not enough resources?)
# Bookkeeping the driver reads and drops before writing: which actor scored a row, and the seconds the
# actor's call took (on the call's first row, 0 on the others).
WORKER_COLUMN = "_memattn_worker"
SECONDS_COLUMN = "_memattn_seconds"
PLAN_SCHEMA = pa.schema(
    [
        pa.field("index", pa.int64(), nullable=False),
        pa.field("start", pa.int64(), nullable=False),
        pa.field("rows", pa.list_(pa.int64())),
        pa.field("prompts", pa.list_(pa.string())),
        pa.field("reasons", pa.list_(pa.string())),
        pa.field("sha256", pa.list_(pa.string())),
        pa.field("labels", pa.list_(pa.int8())),
        pa.field("ids", pa.list_(pa.string())),
    ]
)
OUT_SCHEMA = (
    SCHEMA.remove_metadata()
    .append(pa.field(WORKER_COLUMN, pa.string()))
    .append(pa.field(SECONDS_COLUMN, pa.float64()))
)


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (the [data] extra: pandas, fsspec ...)
    except ImportError as error:
        raise MemattnError(
            f"--engine ray needs Ray Data ({error}): pip install '{RAY_REQUIREMENT}'"
        ) from None
    return ray


# ---- one Ray record per fixed batch ------------------------------------------------------------------


def plan_table(group: list[Batch]) -> pa.Table:
    """Fixed batches as Ray records: one record per batch, never split by Ray."""
    return pa.Table.from_pydict(
        {
            "index": [b.index for b in group],
            "start": [b.start for b in group],
            "rows": [[r.row for r in b.rows] for b in group],
            "prompts": [[r.prompt for r in b.rows] for b in group],
            "reasons": [[r.reason for r in b.rows] for b in group],
            "sha256": [[r.sha256 for r in b.rows] for b in group],
            "labels": [[r.label for r in b.rows] for b in group],
            "ids": [[r.id for r in b.rows] for b in group],
        },
        schema=PLAN_SCHEMA,
    )


def batches_of(table: pa.Table) -> Iterator[Batch]:
    """The fixed batches a plan table holds (the inverse of :func:`plan_table`)."""
    for record in table.to_pylist():
        rows = [
            InputRow(*fields)
            for fields in zip(
                record["rows"],
                record["prompts"],
                record["reasons"],
                record["sha256"],
                record["labels"],
                record["ids"],
                strict=True,
            )
        ]
        if [r.row for r in rows] != list(range(record["start"], record["start"] + len(rows))):
            raise MemattnError(f"batch {record['index']} does not hold consecutive rows")  # never happens
        yield Batch(record["index"], record["start"], rows)


def score_records(scorer: Any, table: pa.Table, settings: ScanSettings, version: str) -> list[dict[str, Any]]:
    """Output rows of every fixed batch in ``table``: one pipeline call per batch (as the local engine)."""
    from memattn.scan.run import score_batch

    rows: list[dict[str, Any]] = []
    for batch in batches_of(table):
        rows += score_batch(scorer, batch, settings, settings.model, version)
    return rows


class ScanActor:
    """A Ray Data actor: holds the pipeline and scores the fixed batches (records) it is handed."""

    def __init__(
        self, settings: ScanSettings, calibration: Any, detector: Any, threads: int | None = None
    ) -> None:
        import torch

        from memattn.loading import load_pipeline, parse_dtype
        from memattn.scan.scoring import BatchScorer

        if threads:
            torch.set_num_threads(threads)
        quiet_loading()
        # Ray shows an actor only the GPU it reserved for it (CUDA_VISIBLE_DEVICES): that is "cuda" here.
        device = "cuda" if settings.device.startswith("cuda") else settings.device
        dtype = parse_dtype(settings.dtype)
        pipe = load_pipeline(settings.model, dtype=dtype, device=device, progress_bar=False)
        self.settings = settings
        self.version = __version__
        self.scorer = BatchScorer(pipe, settings, calibration, detector)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, table: pa.Table) -> pa.Table:
        from memattn.scan.scoring import quiet_truncation_warnings

        started = time.perf_counter()
        with quiet_truncation_warnings():
            rows = score_records(self.scorer, table, self.settings, self.version)
        for i, row in enumerate(rows):
            row[WORKER_COLUMN] = self.worker
            row[SECONDS_COLUMN] = 0.0 if i else time.perf_counter() - started
        return pa.Table.from_pylist(rows, schema=OUT_SCHEMA)


# ---- the cluster -------------------------------------------------------------------------------------


def connect(address: str | None) -> bool:
    """Connect to (or start) Ray; True when this call started it (then the caller shuts it down).

    ``address``: None starts a local cluster, unless ``RAY_ADDRESS`` is set (then that cluster); "auto",
    "HOST:PORT" or "ray://HOST:PORT" as ``ray.init``. An already initialized Ray is used as it is.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address is None:
        address = "auto" if os.environ.get("RAY_ADDRESS") else "local"
    local = address == "local"
    try:
        ray.init(
            address=address,
            logging_level=logging.WARNING,
            **({"include_dashboard": False} if local else {}),
        )
    except ConnectionError as error:
        raise MemattnError(
            f"no Ray cluster at --ray-address {address} ({error}); start one with `ray start --head`"
        ) from None
    return True


def actor_resources(ray: Any, settings: ScanSettings, actors: int | None, cpus: int) -> tuple[int, dict]:
    """How many actors, and what each reserves: one GPU (cuda) or ``cpus`` CPUs; checked against the
    cluster so that a pool that can never start is an error, not a hang."""
    available = ray.cluster_resources()
    if settings.device.startswith("cuda"):
        gpus = int(available.get("GPU", 0))
        if gpus < 1:
            raise MemattnError(f"--device {settings.device}, but the Ray cluster has no GPU")
        count = actors or gpus
        if count > gpus:
            raise MemattnError(f"--actors {count} with one GPU each, but the Ray cluster has {gpus} GPUs")
        return count, {"num_gpus": 1}
    if cpus < 1:
        raise MemattnError(f"--cpus-per-actor must be at least 1, got {cpus}")
    count = actors or 2
    have = int(available.get("CPU", 0))
    if count * cpus > have:
        raise MemattnError(
            f"--actors {count} × {cpus} CPU, but the Ray cluster has {have} CPUs; pass fewer --actors"
        )
    return count, {"num_cpus": cpus}


@contextmanager
def _data_context() -> Iterator[None]:
    """Ray Data's own progress bars and execution banners would fight the scan's bar on stderr; and the
    actor pool starts whole before work is handed out."""
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = context.enable_progress_bars, context.print_on_execution_start, context.wait_for_min_actors_s
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # Dispatch once the whole pool is up (no actor gets a head start and most of a small input); an
    # actor whose constructor fails (bad model path) fails the scan here, with its error.
    context.wait_for_min_actors_s = WAIT_FOR_ACTORS_S
    # INFO lines ("execution finished in ...") and the notice that progress bars are off; warnings stay.
    # Ray Data also logs the errors it raises; the scan raises them (a memattn error as one line).
    loggers = {
        "ray.data": logging.WARNING,
        "ray.data._internal.progress": logging.ERROR,
        "ray.data.exceptions": logging.CRITICAL,
    }
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name, level in loggers.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        context.enable_progress_bars, context.print_on_execution_start, context.wait_for_min_actors_s = saved
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


# ---- the engine --------------------------------------------------------------------------------------


def score_on_ray(
    input_path: Any,
    settings: ScanSettings,
    covered: Covered,
    *,
    calibration: Any,
    detector: Any,
    total: int | None,
    address: str | None = None,
    actors: int | None = None,
    cpus_per_actor: int = 1,
    info: dict[str, Any] | None = None,
) -> Iterator[tuple[Batch, list[dict[str, Any]]]]:
    """Scored batches not in ``covered``, as they come back from the actors (any order).

    Nothing starts (not even Ray) when every batch is covered. ``info`` receives the actor count and the
    rows each actor scored. Close the iterator to stop the actors (``scan`` does, on errors too).
    """
    size = settings.batch_size
    plan = (b for b in batches(iter_prompts(input_path), size) if b.start not in covered)
    first = next(plan, None)
    if first is None:
        return
    ray = import_ray()
    started_here = connect(address)
    iterator = None
    try:
        count, resources = actor_resources(ray, settings, actors, cpus_per_actor)
        # Blocks of whole batches: at most ROWS_PER_BLOCK rows, and (when the size is known) enough
        # blocks for every actor to get several; only load balance depends on this, never the results.
        per_block = max(1, ROWS_PER_BLOCK // size)
        if total is not None:
            pending = -(-max(total - covered.rows, 1) // size)
            per_block = max(1, min(per_block, -(-pending // (BLOCKS_PER_ACTOR * count))))
        refs, expected = [], {}
        group: list[Batch] = []
        for batch in _chain(first, plan):
            expected[batch.index] = (batch.start, batch.stop)
            group.append(batch)
            if len(group) == per_block:
                refs.append(ray.put(plan_table(group)))
                group = []
        if group:
            refs.append(ray.put(plan_table(group)))
        threads = cpus_per_actor if "num_cpus" in resources else None
        with _data_context():
            dataset = ray.data.from_arrow_refs(refs).map_batches(
                ScanActor,
                batch_size=per_block,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=count),
                # Fail fast: an actor that dies (OOM, a bad GPU) stops the scan, whose complete batches
                # are written; rerunning resumes. Ray Data's default (restart and retry forever) would
                # loop on a crash that repeats.
                max_restarts=0,
                fn_constructor_kwargs={
                    "settings": settings,
                    "calibration": calibration,
                    "detector": detector,
                    "threads": threads,
                },
                **resources,
            )
            workers: dict[str, int] = {}
            busy: dict[str, float] = {}
            if info is not None:
                info.update(actors=count, blocks=len(refs), batches_per_block=per_block)
                info.update(rows_per_actor=workers, seconds_per_actor=busy)
            del refs  # the dataset holds them now
            iterator = iter(dataset.iter_batches(batch_format="pyarrow", batch_size=None))
            waiting: dict[int, list[dict[str, Any]]] = {}
            for table in _unwrapped(iterator):
                names, seconds = table.column(WORKER_COLUMN).to_pylist(), table.column(SECONDS_COLUMN)
                for name, took in zip(names, seconds.to_pylist(), strict=True):
                    workers[name] = workers.get(name, 0) + 1
                    busy[name] = busy.get(name, 0.0) + took
                for row in table.drop_columns([WORKER_COLUMN, SECONDS_COLUMN]).to_pylist():
                    index = row["row"] // size
                    got = waiting.setdefault(index, [])
                    got.append(row)
                    start, stop = expected[index]
                    if len(got) == stop - start:
                        del waiting[index], expected[index]
                        got.sort(key=lambda r: r["row"])
                        keys = ("row", "prompt", "reason", "prompt_sha256", "label", "id")
                        rows = [InputRow(*(r[k] for k in keys)) for r in got]
                        yield Batch(index, start, rows), got
        if expected:
            raise MemattnError(
                f"the Ray engine returned no complete result for {len(expected)} batches "
                f"(first: rows {min(expected.values())[0]}…); rerun to resume them"
            )
    finally:
        if iterator is not None and hasattr(iterator, "close"):
            iterator.close()
        if started_here:
            ray.shutdown()


def _unwrapped(tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """The actors' output; a memattn error raised in an actor (a model that is not there) comes out as
    itself, with its one-line message, not wrapped in Ray's remote traceback."""
    try:
        yield from tables
    except Exception as error:
        clean = memattn_error(error)
        if clean is None:
            raise
        raise clean from None


def memattn_error(error: BaseException) -> MemattnError | None:
    """The memattn error behind a Ray error: a failed task keeps it (``cause``); a failed actor
    constructor only in its message (``memattn.errors.ModelNotFoundError: model ... not found``)."""
    from memattn import errors

    cause = getattr(error, "cause", None)
    if isinstance(cause, MemattnError):
        return type(cause)(*cause.args)
    found = re.findall(r"^memattn\.errors\.(\w+): (.+)$", str(error), re.MULTILINE)
    if not found:
        return None
    name, message = found[-1]
    kind = getattr(errors, name, MemattnError)
    return kind(message) if isinstance(kind, type) and issubclass(kind, MemattnError) else None


def _chain(first: Batch, rest: Iterator[Batch]) -> Iterator[Batch]:
    yield first
    yield from rest
