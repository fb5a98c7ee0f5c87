"""`memattn scan` throughput on the bundled testbed, and a large scan that shows memory stays bounded.

Throughput (default): prompts/s of the step-1 scan (one CFG UNet call per batch) and of ``--full``
(all ``--steps`` steps, adds score D) at batch sizes 1/8/32, and their ratio. The model is loaded once
and excluded; input hashing, reading, tokenizing, scoring and writing Parquet parts are included.

Local vs Ray (``--engine ray``): for each batch size, the same scan with the local engine (this process,
``--local-threads`` torch threads) and with the Ray engine (``--actors`` actors × ``--cpus-per-actor``
CPUs and torch threads each, on a local cluster started here), side by side. "steady" counts from the
first scored batch to the last for the local engine, and rows over the busiest actor's scoring time for
Ray (actor start and model load excluded in both), "e2e" is the whole ``scan()`` call (for Ray: starting
the actor pool and loading the model in each actor, every scan).

Large scan (``--rows N``): writes N synthetic testbed-style prompts (with a few bad lines: empty, invalid
UTF-8, over 77 tokens) to a temp .txt, scans them and reports wall time, prompts/s, peak RSS
(``ru_maxrss``) and RSS sampled during the scan (every ``--sample-every`` rows), which stays flat when
memory is bounded.

Usage:
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/scan_throughput.py [--prompts 64]
      [--full-prompts 16] [--batch-sizes 1,8,32] [--steps 50] [--guidance 2] [--engine local] [--json F]
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/scan_throughput.py --engine ray
      [--prompts 256] [--full-prompts 0] [--actors 2] [--cpus-per-actor 1] [--local-threads 2]
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/scan_throughput.py --rows 100000
      [--batch-size 32] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from memattn.loading import load_pipeline
from memattn.scan import ScanSettings, ScanSummary, scan
from memattn.testbed.data import (
    BACKGROUNDS,
    COLORS,
    PHRASINGS,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLE_SUFFIXES,
    caption_for,
)

ENGINES = ("local", "ray")


def synthetic_prompts(n: int, seed: int = 0, bad_lines: bool = False) -> Any:
    """Testbed-style captions, streamed; with ``bad_lines`` a few lines the scan must record as bad."""
    rng = random.Random(seed)
    for i in range(n):
        if bad_lines and i % 5000 == 4999:
            yield b"\xff\xfe not utf-8"
            continue
        if bad_lines and i % 1000 == 999:
            yield b""
            continue
        attributes = {
            "background": rng.choice(list(BACKGROUNDS)),
            "color": rng.choice(list(COLORS)),
            "shape": rng.choice(SHAPES),
            "size": rng.choice(list(SIZES)),
            "position": rng.choice(list(POSITIONS)),
        }
        caption = caption_for(attributes, rng.randrange(len(PHRASINGS)), rng.randrange(len(STYLE_SUFFIXES)))
        if bad_lines and i % 2000 == 1234:
            caption += ", and" + " more" * 80  # over 77 tokens: scored truncated
        yield caption.encode()


def write_prompts(path: Path, n: int, bad_lines: bool = False) -> Path:
    with path.open("wb") as handle:
        for line in synthetic_prompts(n, bad_lines=bad_lines):
            handle.write(line + b"\n")
    return path


def rss_mib() -> float:
    """Current resident set size (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def run_engine(
    engine: str,
    prompts: Path,
    out: Path,
    settings: ScanSettings,
    pipe: Any,
    actors: int = 2,
    cpus_per_actor: int = 1,
    **kwargs: Any,
) -> ScanSummary:
    """One scan with the chosen engine (Ray: on the cluster ``start_ray`` started; actors load the model)."""
    if engine == "local":
        return scan(prompts, out, settings, pipe=pipe, progress=False, **kwargs)
    if engine == "ray":
        return scan(
            prompts,
            out,
            settings,
            engine="ray",
            actors=actors,
            cpus_per_actor=cpus_per_actor,
            progress=False,
            **kwargs,
        )
    raise SystemExit(f"unknown engine {engine!r}")


def start_ray(args: argparse.Namespace) -> None:
    """A local cluster with exactly the CPUs the actors reserve (started once, reused by every scan)."""
    import ray

    ray.init(
        address="local",
        num_cpus=args.actors * args.cpus_per_actor,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
    )


def timed(engine: str, prompts: Path, out: Path, settings: ScanSettings, pipe: Any, args: Any) -> dict:
    """prompts/s of one scan, end to end (the whole call) and steady: local, from the first scored batch
    to the last; Ray, rows over the busiest actor's scoring time (its calls to ScanActor)."""
    marks: list[tuple[int, float]] = []
    summary = run_engine(
        engine,
        prompts,
        out,
        settings,
        pipe,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        on_batch=lambda done: marks.append((done, time.perf_counter())),
    )
    busy = summary.engine_info.get("seconds_per_actor")
    if busy:  # Ray: the actors work in parallel; rows arrive a block at a time, so time the actors
        steady = summary.scanned_rows / max(busy.values())
    else:  # local: batches arrive one by one
        (first_rows, first_t), (last_rows, last_t) = marks[0], marks[-1]
        steady = (last_rows - first_rows) / (last_t - first_t) if last_t > first_t else float("nan")
    result = {"prompts": summary.rows, "steady": steady, "e2e": summary.prompts_per_second}
    if busy:
        result["rows_per_actor"] = sorted(summary.engine_info["rows_per_actor"].values())
        result["busy_s_per_actor"] = sorted(round(b, 2) for b in busy.values())
    return result


def local_vs_ray(args: argparse.Namespace, pipe: Any, work: Path) -> dict[str, Any]:
    """Local engine vs Ray engine, side by side, at every batch size; step-1 (and --full if asked)."""
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    start_ray(args)
    threads = [int(t) for t in str(args.local_threads).split(",")]
    print(
        f"local: {'/'.join(map(str, threads))} torch threads in this process; ray: {args.actors} actors x "
        f"{args.cpus_per_actor} CPU ({args.cpus_per_actor} torch thread) each, local cluster"
    )
    print(
        "prompts/s; steady: local from the first scored batch to the last, Ray rows / busiest actor's "
        "scoring time; e2e: the whole scan() (Ray: pool start and a model load per actor)"
    )
    modes = [(False, args.prompts)] + ([(True, args.full_prompts)] if args.full_prompts else [])
    local_names = [f"local {t}t" for t in threads]
    print(
        f"{'batch':>5} {'mode':>7} "
        + " ".join(f"{name:>9}" for name in local_names)
        + f" {'ray':>7} {'ray/best':>9} | e2e: "
        + " ".join(f"{name:>9}" for name in local_names)
        + f" {'ray':>7}  rows, busy s per actor"
    )
    results: dict[str, Any] = {}
    for size in sizes:
        for full, count in modes:
            count = max(size, count // size * size)  # whole batches only
            prompts = write_prompts(work / f"p-{size}-{full}-{count}.txt", count)
            settings = ScanSettings(
                model="testbed", batch_size=size, full=full, steps=args.steps, guidance_scale=args.guidance
            )
            locals_ = []
            for t in threads:
                torch.set_num_threads(t)
                out = work / f"local-{size}-{full}-{t}"
                locals_.append(timed("local", prompts, out, settings, pipe, args))
            remote = timed("ray", prompts, work / f"ray-{size}-{full}", settings, None, args)
            mode = "--full" if full else "step-1"
            results[f"{size}-{mode}"] = {
                **{f"local_{t}_threads": r for t, r in zip(threads, locals_, strict=True)},
                "ray": remote,
            }
            best = max(r["steady"] for r in locals_)
            print(
                f"{size:>5} {mode:>7} "
                + " ".join(f"{r['steady']:>9.1f}" for r in locals_)
                + f" {remote['steady']:>7.1f} {remote['steady'] / best:>8.2f}x | e2e: "
                + " ".join(f"{r['e2e']:>9.1f}" for r in locals_)
                + f" {remote['e2e']:>7.1f}  {remote.get('rows_per_actor')} {remote.get('busy_s_per_actor')} s"
            )
    return results


def throughput(args: argparse.Namespace, pipe: Any, work: Path) -> dict[str, Any]:
    if args.engine == "ray":
        return local_vs_ray(args, pipe, work)
    results: dict[str, Any] = {}
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    print(f"{'batch':>5} {'step-1 prompts/s':>17} {'--full prompts/s':>17} {'ratio':>7}")
    for size in sizes:
        row = {}
        for full, count in ((False, args.prompts), (True, args.full_prompts)):
            # whole batches only, so every batch size scans full batches
            count = max(size, count // size * size)
            prompts = write_prompts(work / f"p-{size}-{full}-{count}.txt", count)
            settings = ScanSettings(
                model="testbed", batch_size=size, full=full, steps=args.steps, guidance_scale=args.guidance
            )
            summary = run_engine(args.engine, prompts, work / f"out-{size}-{full}", settings, pipe)
            row["full" if full else "step1"] = {"prompts": count, "prompts_per_s": summary.prompts_per_second}
        ratio = row["step1"]["prompts_per_s"] / row["full"]["prompts_per_s"]
        row["ratio"] = ratio
        results[str(size)] = row
        step1, full_rate = row["step1"]["prompts_per_s"], row["full"]["prompts_per_s"]
        print(f"{size:>5} {step1:>17.1f} {full_rate:>17.2f} {ratio:>6.1f}x")
    return results


def large_scan(args: argparse.Namespace, pipe: Any, work: Path) -> dict[str, Any]:
    prompts = write_prompts(work / f"synthetic-{args.rows}.txt", args.rows, bad_lines=True)
    print(f"input: {prompts} ({prompts.stat().st_size / 2**20:.1f} MiB, {args.rows} lines)")
    out = Path(args.keep) if args.keep else work / "results.parquet"
    settings = ScanSettings(
        model="testbed", batch_size=args.batch_size, steps=args.steps, guidance_scale=args.guidance
    )
    samples: list[tuple[int, float]] = [(0, rss_mib())]
    next_sample = [args.sample_every]

    def sample(done: int) -> None:
        if done >= next_sample[0]:
            samples.append((done, rss_mib()))
            next_sample[0] += args.sample_every

    started = time.perf_counter()
    if args.engine == "ray":
        start_ray(args)
    summary = run_engine(
        args.engine,
        prompts,
        out,
        settings,
        pipe if args.engine == "local" else None,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        on_batch=sample,
    )
    wall = time.perf_counter() - started
    samples.append((summary.rows, rss_mib()))
    result = {
        "rows": summary.rows,
        "ok": summary.ok,
        "skipped": summary.skipped,
        "truncated": summary.truncated,
        "wall_s": wall,
        "prompts_per_s": summary.scanned_rows / wall,
        "peak_rss_mib": peak_rss_mib(),
        "rss_mib_by_rows": samples,
        "parts": len(list(out.glob("part-*.parquet"))),
        "output_mib": sum(p.stat().st_size for p in out.glob("part-*.parquet")) / 2**20,
    }
    print(
        f"{summary.rows} rows (ok {summary.ok}, skipped {summary.skipped}, truncated {summary.truncated}) in "
        f"{wall:.1f} s: {result['prompts_per_s']:.1f} prompts/s; {result['parts']} parts, "
        f"{result['output_mib']:.1f} MiB"
    )
    print(f"peak RSS (ru_maxrss): {result['peak_rss_mib']:.0f} MiB")
    print("RSS during the scan (rows: MiB): " + ", ".join(f"{r}: {m:.0f}" for r, m in samples))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64, help="prompts per step-1 measurement")
    parser.add_argument("--full-prompts", type=int, default=16, help="prompts per --full measurement")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument(
        "--engine", choices=ENGINES, default="local", help="ray: local and Ray engines side by side"
    )
    parser.add_argument("--actors", type=int, default=2, help="Ray engine: actors")
    parser.add_argument("--cpus-per-actor", type=int, default=1, help="Ray engine: CPUs and threads each")
    parser.add_argument(
        "--local-threads",
        default=f"1,{os.cpu_count() or 1}",
        help="--engine ray: torch threads of the local engine it is compared with, comma-separated "
        "(default: 1 and all cores)",
    )
    parser.add_argument("--rows", type=int, help="large-scan mode: scan this many synthetic prompts")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of the large scan")
    parser.add_argument("--sample-every", type=int, default=5000, help="rows between RSS samples")
    parser.add_argument("--keep", help="large scan: write the output here (kept) instead of a temp dir")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(f"$ {' '.join(sys.argv)}")
    print(f"machine: {platform.platform()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"RSS before loading: {rss_mib():.0f} MiB")
    pipe = load_pipeline("testbed")
    print(f"RSS with the testbed loaded: {rss_mib():.0f} MiB; engine: {args.engine}")
    with tempfile.TemporaryDirectory() as work:
        result = large_scan(args, pipe, Path(work)) if args.rows else throughput(args, pipe, Path(work))
    if args.json:
        args.json.write_text(
            json.dumps({"command": sys.argv, "engine": args.engine, "result": result}, indent=1)
        )


if __name__ == "__main__":
    main()
