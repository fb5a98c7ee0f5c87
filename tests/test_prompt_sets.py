"""Every benchmark prompt through the layouts and a real (tiny) pipeline: no NaN or inf anywhere."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PROMPTS_DIR

import memattn


def all_prompts() -> list[str]:
    prompts = []
    for name in ("sd1_memorized_345.txt", "nonmemorized_500.txt"):
        prompts += [
            line for line in (PROMPTS_DIR / name).read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    for line in (PROMPTS_DIR / "sdv1_500_memorized.jsonl").read_text(encoding="utf-8").splitlines():
        prompts.append(json.loads(line)["caption"])
    return prompts


def test_the_prompt_files_are_all_there():
    assert len(all_prompts()) == 345 + 500 + 500


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["sd1_pipe", "sd2_pipe"])
def test_all_prompts_give_finite_scores(request, fixture):
    pipe = request.getfixturevalue(fixture)
    prompts = all_prompts()
    finite = 0
    for start in range(0, len(prompts), 96):
        batch = prompts[start : start + 96]
        with memattn.trace(pipe) as tr:
            pipe(
                batch,
                num_inference_steps=2,
                generator=torch.Generator().manual_seed(start),
                output_type="latent",
            )
        record = tr.record
        assert record.n_images == len(batch)
        for score in (memattn.score_d(record), memattn.score_e(record), memattn.entropy_curve(record)):
            assert torch.isfinite(score).all()
        assert all(triggers for triggers in memattn.trigger_tokens(record))
        finite += len(batch)
    assert finite == len(prompts)
