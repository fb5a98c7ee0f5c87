"""``finetune(config)``: one run of the training loop from start or checkpoint to exported pipeline,
with a progress bar, the per-step log, and Ctrl-C that checkpoints the step in hand and says how to
resume."""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from memattn.errors import Interrupted, MemattnError
from memattn.interrupts import StopRequest
from memattn.paths import writable_directory
from memattn.training.checkpoints import StepLog, latest_checkpoint
from memattn.training.config import CHECKPOINTS, LOG_FILE, FinetuneConfig
from memattn.training.loop import Finetuner


def _resume_point(config: FinetuneConfig, out: Path) -> Path | None:
    existing = latest_checkpoint(out)
    resume = config.resume_from_checkpoint
    if resume is None:
        if existing is not None:
            raise MemattnError(
                f"{out} already holds checkpoints (latest: {existing.name}); pass "
                "--resume-from-checkpoint latest to continue that run, or choose a new --output-dir"
            )
        return None
    if resume == "latest":
        return existing
    path = Path(resume)
    if not path.exists() and not path.is_absolute():
        candidate = out / CHECKPOINTS / resume
        path = candidate if candidate.exists() else path
    if not path.is_dir():
        raise MemattnError(
            f"checkpoint {resume} does not exist; pass a checkpoints/step-N directory or 'latest'"
        )
    return path


def finetune(
    config: FinetuneConfig,
    *,
    command: str | None = None,
    on_checkpoint: Callable[[Finetuner], dict] | None = None,
) -> Path:
    """Train (or resume) into ``config.output_dir``; returns the exported pipeline directory.

    ``on_checkpoint(tuner)``: an entry logged at every checkpoint (see :class:`Finetuner`).
    """
    from tqdm.auto import tqdm

    out = Path(config.output_dir)
    writable_directory(out, "the output directory")  # one line, not an OSError, before any loading
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = _resume_point(config, out)
    if command is None:
        command = " ".join(["memattn", *sys.argv[1:]]) if sys.argv else "memattn finetune"
    tuner = Finetuner(config, on_checkpoint=on_checkpoint)
    main = tuner.accelerator.is_main_process
    if checkpoint is not None:
        tuner.load_checkpoint(checkpoint)
        _check_resume(tuner, checkpoint, main)
    elif config.resume_from_checkpoint == "latest" and main and config.progress:
        print(f"no checkpoint in {out / CHECKPOINTS}: starting a new run", file=sys.stderr)
    log = StepLog(out / LOG_FILE, tuner.step, enabled=main)
    seconds = 0.0
    dropped = seen = 0
    bar = tqdm(
        total=config.max_train_steps,
        initial=tuner.step,
        desc="finetune",
        disable=not (config.progress and main),
    )
    # One process: the first Ctrl-C finishes the step in hand and checkpoints it. Several processes
    # would each have to agree on the step first, so there Ctrl-C stops at once (last checkpoint kept).
    graceful = tuner.accelerator.num_processes == 1
    stop = StopRequest("finishing this step, then writing a checkpoint")
    try:
        with tuner, stop if graceful else nullcontext(stop):
            while tuner.step < config.max_train_steps:
                entry = tuner.train_step()
                seconds += entry["seconds"]
                dropped, seen = dropped + entry["dropped"], seen + entry["n"]
                log.write(entry)
                bar.update(1)
                bar.set_postfix(loss=f"{entry['loss']:.4f}", drop=f"{dropped / max(seen, 1):.1%}")
                at_end = tuner.step == config.max_train_steps
                if stop.requested or tuner.step % config.checkpointing_steps == 0 or at_end:
                    tuner.save_checkpoint()
                if stop.requested and not at_end:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise Interrupted(_kept_after_interrupt(out, config.max_train_steps)) from None
    finally:
        bar.close()
        log.close()
    return tuner.export(seconds, command)


def _check_resume(tuner: Finetuner, checkpoint: Path, main: bool) -> None:
    """A checkpoint past the requested end is refused (exporting it would report more steps than
    asked); another thread count resumes, with a note: CPU arithmetic then differs in the last bits."""
    total = tuner.config.max_train_steps
    if tuner.step > total:
        raise MemattnError(
            f"checkpoint {checkpoint} is at step {tuner.step}, past --max-train-steps {total}: resume it "
            f"with --max-train-steps {tuner.step} or more, or use a new --output-dir"
        )
    threads = torch.get_num_threads()
    written = tuner.checkpoint_threads
    if main and written is not None and written != threads:
        print(
            f"note: {checkpoint.name} was written with {written} torch threads, this process uses "
            f"{threads}; the run stays valid but is not bit-identical to an uninterrupted one "
            f"(set OMP_NUM_THREADS={written} for that)",
            file=sys.stderr,
        )


def _kept_after_interrupt(out: Path, total: int) -> str:
    """What an interrupted run leaves: its latest checkpoint and how to go on, or that nothing was kept."""
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        return (
            f"no training step finished, nothing kept in {out} (checkpoints come every "
            "--checkpointing-steps and on Ctrl-C); rerun the same command to start again"
        )
    step = int(checkpoint.name.removeprefix("step-"))
    return (
        f"checkpoint {checkpoint} kept (step {step} of {total}); rerun the same command with "
        "--resume-from-checkpoint latest to resume"
    )
