"""Shared fixtures: tiny real diffusers pipelines, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memattn.tiny import tiny_pipeline

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "data" / "prompts"
# Subprocess and polling limits exist to catch hangs, not to time healthy runs: a busy 2-core laptop
# ran the slowest subprocess (the --fast testbed training, about 3 min when quiet) past 20 minutes.
HANG_GUARD_S = 2400


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
