"""Shared fixtures: tiny real diffusers pipelines, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memattn.testing import tiny_pipeline

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "data" / "prompts"
# Subprocess and polling limits exist to catch hangs, not to time healthy runs: a busy 2-core laptop
# ran the slowest subprocess (the --fast testbed training, about 3 min when quiet) past 20 minutes.
HANG_GUARD_S = 2400
# The longest modules start first, so that under pytest-xdist (`make test`: modules stay whole on one
# worker) they run beside the many short ones instead of alone at the end.
LONGEST_FIRST = ("test_testbed_train.py", "test_finetune.py", "test_detectors.py", "test_benchmarks.py")


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001 (pytest's hook signature)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise


def generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image, so an image's noise does not depend on its batch."""
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="session")
def sd1_pipe():
    return tiny_pipeline("sd1", seed=0)


@pytest.fixture(scope="session")
def sd2_pipe():
    return tiny_pipeline("sd2", seed=1)


@pytest.fixture(scope="session")
def sdxl_pipe():
    return tiny_pipeline("sdxl", seed=2)


class CountScalarReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense`` calls: each is a device->host sync on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))
