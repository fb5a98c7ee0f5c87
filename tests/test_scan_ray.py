"""`memattn scan --engine ray`: the same fixed batches on a local Ray cluster (2 CPU actors), the same rows.

Needs Ray Data (`pip install 'ray[data]==2.58.0'`, in the test extras); the Ray tests skip without it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from test_scan import synthetic_prompts  # tests/test_scan.py: pytest puts tests/ on sys.path

from memattn.errors import Interrupted, MemattnError
from memattn.scan import MANIFEST_FILE, ScanSettings, read_results, scan
from memattn.scan.inputs import batches, iter_prompts
from memattn.scan.ray_engine import batches_of, plan_table, score_records

HAVE_RAY = importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.data") is not None
needs_ray = pytest.mark.skipif(
    not HAVE_RAY, reason="Ray Data is not installed: pip install 'ray[data]==2.58.0'"
)
SETTINGS = ScanSettings(model="testbed", batch_size=4, guidance_scale=2.0, steps=50)


@pytest.fixture(scope="module")
def ray_cluster():
    """A small local cluster: 2 CPUs (one per actor), no dashboard, a 200 MB object store."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=200 * 2**20,
        logging_level="WARNING",
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def pipe():
    from memattn.loading import load_pipeline

    return load_pipeline("testbed")


@pytest.fixture
def one_thread():
    """The local reference runs at the actors' thread count (1): floats may depend on it."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def write_prompts(path: Path, n: int, seed: int) -> Path:
    prompts = synthetic_prompts(n, seed=seed)
    prompts[5] = ""  # skipped, keeps its row number inside its batch
    if n > 17:
        prompts[17] = "word " * 90  # scored truncated
    path.write_text("\n".join(prompts) + "\n")
    return path


# ---- no Ray needed ---------------------------------------------------------------------------------------


class RecordingScorer:
    """Stands in for BatchScorer: records every pipeline call (prompts and seeds)."""

    max_length = 77

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[int]]] = []

    def token_counts(self, prompts):
        return [len(p.split()) + 2 for p in prompts]

    def score(self, prompts, seeds):
        self.calls.append((list(prompts), list(seeds)))
        return [{"score_e": float(seed)} for seed in seeds]


def test_a_ray_record_is_one_fixed_batch_and_one_pipeline_call(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"a\nb\n\nd\ne\n\xff bad\ng\nh\ni\nj\nk\n")  # 11 rows, two bad
    plan = list(batches(iter_prompts(path), 4))
    table = plan_table(plan)
    assert len(table) == 3  # one record per fixed batch: rows 0-3, 4-7, 8-10
    back = list(batches_of(table))
    assert [(b.index, b.start, b.rows) for b in back] == [(b.index, b.start, b.rows) for b in plan]
    scorer = RecordingScorer()
    settings = ScanSettings(model="testbed", batch_size=4, seed=100)
    rows = score_records(scorer, table.slice(1, 2), settings, "v")  # a Ray batch of two records
    assert scorer.calls == [(["e", "g", "h"], [104, 106, 107]), (["i", "j", "k"], [108, 109, 110])]
    assert [r["row"] for r in rows] == list(range(4, 11))
    assert [r["status"] for r in rows] == ["ok", "skipped", "ok", "ok", "ok", "ok", "ok"]


def test_without_ray_a_finished_scan_still_recounts(tmp_path, pipe, monkeypatch):
    path = write_prompts(tmp_path / "p.txt", 8, seed=1)
    scan(path, tmp_path / "out", SETTINGS, pipe=pipe, progress=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    again = scan(path, tmp_path / "out", SETTINGS, engine="ray", progress=False)  # nothing to score
    assert (again.rows, again.scanned_rows) == (8, 0)
    with pytest.raises(MemattnError, match=r"needs Ray Data .*pip install 'ray\[data\]"):
        scan(path, tmp_path / "new", SETTINGS, engine="ray", progress=False)
    with pytest.raises(MemattnError, match="--engine must be one of local, ray"):
        scan(path, tmp_path / "new", SETTINGS, engine="spark")


def test_memattn_errors_come_out_of_ray_errors_as_themselves():
    from memattn.errors import ModelNotFoundError
    from memattn.scan.ray_engine import memattn_error

    died = RuntimeError(  # an actor's constructor failed: Ray keeps only the remote traceback text
        "The actor died because of an error raised in its creation task\nTraceback ...\n"
        "memattn.errors.ModelNotFoundError: model /x not found: no such directory\n"
    )
    error = memattn_error(died)
    assert isinstance(error, ModelNotFoundError) and str(error) == "model /x not found: no such directory"
    failed = RuntimeError("remote traceback ...")
    failed.cause = MemattnError("the calibration thresholds Wen's score")  # a failed task keeps its error
    assert str(memattn_error(failed)) == "the calibration thresholds Wen's score"
    assert memattn_error(RuntimeError("ValueError: something else")) is None


# ---- on a local Ray cluster ------------------------------------------------------------------------------


@needs_ray
def test_ray_engine_matches_the_local_engine(tmp_path, ray_cluster, pipe, one_thread, monkeypatch):
    import memattn.scan.ray_engine as ray_engine

    # Blocks of 3 fixed batches (Ray batches of 3 records), 42 rows: a partial last batch of 2 rows.
    monkeypatch.setattr(ray_engine, "ROWS_PER_BLOCK", 12)
    monkeypatch.setattr(ray_engine, "BLOCKS_PER_ACTOR", 1)
    path = write_prompts(tmp_path / "p.txt", 42, seed=21)
    local = scan(path, tmp_path / "local", SETTINGS, pipe=pipe, progress=False)
    remote = scan(path, tmp_path / "ray", SETTINGS, engine="ray", actors=2, progress=False, rows_per_part=16)
    info = remote.engine_info
    assert info["engine"] == "ray" and info["actors"] == 2 and info["blocks"] == 4
    assert sum(info["rows_per_actor"].values()) == 42
    assert len(info["rows_per_actor"]) == 2, info  # the pool starts whole, then both actors get blocks
    assert (remote.rows, remote.ok, remote.skipped, remote.truncated) == (42, 41, 1, 1)
    expected, got = read_results(local.out), read_results(remote.out)
    assert got.column("row").to_pylist() == list(range(42))
    assert got.schema.equals(expected.schema)
    for name in got.column_names:  # every column, floats bit for bit
        assert got.column(name).equals(expected.column(name)), name
    assert got.equals(expected)
    manifests = [json.loads((out / MANIFEST_FILE).read_text()) for out in (local.out, remote.out)]
    assert manifests[0]["identity"] == manifests[1]["identity"]  # the engine is not a setting
    assert manifests[1]["complete"] and manifests[1]["counts"]["rows"] == 42


@needs_ray
@pytest.mark.slow
def test_ray_scan_resumes_after_an_interruption(tmp_path, ray_cluster, pipe, one_thread):
    path = write_prompts(tmp_path / "p.txt", 48, seed=23)
    reference = read_results(scan(path, tmp_path / "ref", SETTINGS, pipe=pipe, progress=False).out)

    def stop(done: int) -> None:
        if done >= 12:
            raise KeyboardInterrupt

    for out, resume_with in ((tmp_path / "ray-ray", "ray"), (tmp_path / "ray-local", "local")):
        with pytest.raises(Interrupted, match="rerun the same command to resume"):
            scan(path, out, SETTINGS, engine="ray", progress=False, rows_per_part=8, on_batch=stop)
        kept = read_results(out)
        rows = kept.column("row").to_pylist()
        assert 12 <= len(rows) < 48 and len(set(rows)) == len(rows)
        assert all(len([r for r in rows if r // 4 == k]) in (0, 4) for k in range(12))  # whole batches
        kwargs = {"pipe": pipe} if resume_with == "local" else {"engine": "ray"}
        summary = scan(path, out, SETTINGS, progress=False, rows_per_part=8, **kwargs)
        assert (summary.resumed_rows, summary.rows) == (len(rows), 48)
        assert summary.scanned_rows == 48 - len(rows)
        resumed = read_results(out)
        assert resumed.column("row").to_pylist() == list(range(48))
        assert resumed.equals(reference), resume_with
    assert pa.compute.sum(reference.column("truncated")).as_py() == 1


@needs_ray
def test_command_passes_the_ray_options(tmp_path, ray_cluster):
    import typer
    from typer.testing import CliRunner

    from memattn.cli.scan import register

    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    path = write_prompts(tmp_path / "p.txt", 8, seed=3)
    args = ["scan", str(path), "--model", "testbed", "--out", str(tmp_path / "o"), "--guidance", "2"]
    # refused before any actor starts: the local cluster has 2 CPUs
    result = CliRunner().invoke(app, [*args, "--engine", "ray", "--actors", "3", "--no-progress"])
    assert isinstance(result.exception, MemattnError), result.output
    assert "--actors 3 × 1 CPU, but the Ray cluster has 2 CPUs" in str(result.exception)
    result = CliRunner().invoke(app, [*args, "--engine", "ray", "--cpus-per-actor", "2", "--no-progress"])
    assert "--actors 2 × 2 CPU, but the Ray cluster has 2 CPUs" in str(result.exception)
