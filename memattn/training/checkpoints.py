"""Checkpoints of the training loop (lookup, integrity, the optimizer's safetensors form) and the
per-step JSONL log: the one module that knows how a run is stored."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from memattn.errors import MemattnError
from memattn.training.config import CHECKPOINTS, LOG_FILE

# ---- checkpoints -------------------------------------------------------------------------------------


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (temporary ``.partial-*`` directories are never picked)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    complete = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return complete[-1] if complete else None


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer state as safetensors tensors (``"<param>.<key>"``) plus its JSON param groups."""
    tensors = {
        f"{index}.{key}": value.detach().clone().contiguous()
        for index, entry in state["state"].items()
        for key, value in entry.items()
    }
    return tensors, state["param_groups"]


def unflatten_optimizer(tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> dict:
    """The inverse of :func:`flatten_optimizer`, ready for ``optimizer.load_state_dict``."""
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        entries.setdefault(int(index), {})[key] = value
    return {"state": entries, "param_groups": param_groups}


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def corrupt_checkpoint(path: Path, why: str) -> MemattnError:
    return MemattnError(
        f"checkpoint {path} is corrupt or incomplete ({why}); delete it to resume from the one before "
        "(--resume-from-checkpoint latest), or start again with a new --output-dir"
    )


class StepLog:
    """``log.jsonl``: one JSON object per optimizer step; on resume, entries after the checkpoint go."""

    def __init__(self, path: Path, resume_step: int, enabled: bool = True) -> None:
        self.path, self.handle = path, None
        if not enabled:
            return
        kept = []
        if resume_step > 0 and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:  # a line cut short by a crash
                    continue
                if entry.get("step", math.inf) <= resume_step:
                    kept.append(line)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        self.handle = path.open("a")

    def write(self, entry: dict[str, Any]) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps(entry) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def read_log(output_dir: Path) -> list[dict[str, Any]]:
    """The per-step entries of a run (what the benchmark reads)."""
    path = Path(output_dir) / LOG_FILE
    if not path.is_file():
        raise MemattnError(f"{output_dir} has no {LOG_FILE}: not a memattn finetune run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
