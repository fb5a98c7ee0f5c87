"""Testbed training: seeded, resumable after SIGKILL (bit-exact on CPU), atomic and checked checkpoints."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import HANG_GUARD_S
from safetensors.torch import load_file

from memattn.errors import MemattnError
from memattn.testbed.data import TestbedConfig
from memattn.testbed.model import ModelConfig
from memattn.testbed.objects import ObjectsConfig
from memattn.testbed.train import TrainConfig, UntrainedModel, from_testbed_recipe, train
from memattn.training import Finetuner
from memattn.training.checkpoints import latest_checkpoint

TINY = TrainConfig(
    steps=6,
    batch_size=8,
    checkpoint_every=2,
    classifier_steps=5,
    data=TestbedConfig(
        matching_counts=(4,),
        matching_items_per_count=2,
        n_templates=1,
        template_copies=4,
        seen_once=20,
        rare_word_seen_once=4,
        never_seen=4,
        novel_composition=4,
    ),
    model=ModelConfig(block_out_channels=(32, 32, 32), text_hidden=32, text_layers=1),
)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    train(TINY, out, progress=False)
    return out


def test_export_has_manifest_and_checkpoints(reference):
    manifest = json.loads((reference / "pipeline" / "memattn_testbed.json").read_text())
    assert manifest["seed"] == 0 and manifest["config"]["steps"] == 6
    assert {g["duplication"] for g in manifest["groups"]["memorized_matching"]} == {4}
    assert manifest["groups"]["never_seen"] and all(
        g["duplication"] == 0 for g in manifest["groups"]["never_seen"]
    )
    assert [p.name for p in sorted((reference / "checkpoints").iterdir())] == [
        "step-0000002",
        "step-0000004",
        "step-0000006",
    ]


FINGERPRINT = json.loads((Path(__file__).parent / "data" / "trainer_fingerprint.json").read_text())


def assert_trainer_fingerprint(run: Path, recipe: str) -> None:
    """The weights the testbed trainer gave this recipe before it became a configuration of the finetune
    loop (the bundled models were trained by that trainer): the loop must still train the same model.

    On one machine the loop reproduces the trainer to the last digit; another CPU (other float kernels,
    same torch, 1 thread) moved the sums by up to 0.0065 (measured, 2026-12-04). The tolerance, 0.05, is
    well above that and 37x below what one training step less moves the sum (1.86)."""
    tensors = weights(run)
    expected = FINGERPRINT[recipe]
    assert len(tensors) == expected["tensors"]
    assert sum(float(v.double().sum()) for v in tensors.values()) == pytest.approx(expected["sum"], abs=0.05)
    squares = sum(float(v.double().square().sum()) for v in tensors.values())
    assert squares == pytest.approx(expected["sum_of_squares"], abs=0.05)


def test_the_loop_trains_what_the_former_trainer_trained(reference):
    assert_trainer_fingerprint(reference, "v1")


def test_same_seed_same_model_other_seed_differs(reference, tmp_path):
    train(TINY, tmp_path / "again", progress=False)
    assert_same_weights(reference, tmp_path / "again")
    from dataclasses import replace

    train(replace(TINY, seed=1), tmp_path / "other", progress=False)
    assert not torch.equal(
        weights(reference)["conv_in.weight"], weights(tmp_path / "other")["conv_in.weight"]
    )


def test_resume_matches_uninterrupted_run(reference, tmp_path):
    from dataclasses import replace

    train(replace(TINY, steps=4), tmp_path, progress=False)  # stops at step 4, then is extended to 6
    train(TINY, tmp_path, progress=False)
    assert_same_weights(reference, tmp_path)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(reference, tmp_path):
    from dataclasses import replace

    long = replace(TINY, steps=40, checkpoint_every=2)
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, {!r});"
        "from test_testbed_train import TINY; from dataclasses import replace;"
        "from memattn.testbed.train import train;"
        "train(replace(TINY, steps=40, checkpoint_every=2), Path({!r}), progress=False)"
    ).format(str(Path(__file__).parent), str(tmp_path / "killed"))
    process = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + HANG_GUARD_S
    while time.time() < deadline and latest_checkpoint(tmp_path / "killed") is None:
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = latest_checkpoint(tmp_path / "killed")
    assert killed_at is not None and killed_at.name != "step-0000040"
    train(long, tmp_path / "killed", progress=False)
    train(long, tmp_path / "straight", progress=False)
    assert_same_weights(tmp_path / "killed", tmp_path / "straight")


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(reference, tmp_path):
    from dataclasses import replace

    run = tmp_path / "run"
    train(replace(TINY, steps=2), run, progress=False)
    checkpoint = latest_checkpoint(run)
    # A different recipe refuses to resume from it.
    with pytest.raises(MemattnError, match="different recipe"):
        train(replace(TINY, lr=0.5, steps=2), run, progress=False)
    (checkpoint / "unet.safetensors").write_bytes(b"garbage")
    with pytest.raises(MemattnError, match="corrupt or incomplete"):
        train(replace(TINY, steps=2), run, progress=False)
    # A half-written checkpoint (no state.json, or a .partial directory) is never picked as latest.
    (run / "checkpoints" / ".partial-0000009").mkdir()
    (run / "checkpoints" / "step-0000010").mkdir()
    assert latest_checkpoint(run) == checkpoint


def test_cli_loads_the_exported_testbed_in_a_fresh_process(reference):
    """A fresh interpreter has not imported memattn.testbed: loading must still find PixelSpaceVAE."""
    model = str(reference / "pipeline")
    run = [sys.executable, "-m", "memattn"]
    info = subprocess.run(
        [*run, "testbed", "info", model], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert info.returncode == 0, info.stderr
    assert "memorized_matching" in info.stdout
    detect = subprocess.run(
        [*run, "detect", "a red circle", "--model", model, "--steps", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert detect.returncode == 0, detect.stderr
    assert json.loads(detect.stdout.splitlines()[-1])["prompt"] == "a red circle"


@pytest.mark.slow
def test_fast_recipe_memorizes_its_most_duplicated_items(tmp_path):
    """End to end: `memattn testbed train --fast` (v2, a few minutes here) copies its 128× items (their
    whole image, background included) and not its never-seen captions, and reports it. (It is too small
    to generalize well, so only the copies' alignment is checked.)"""
    import numpy as np

    from memattn.testbed.evaluate import PRE_REGISTERED_E_LAYER, evaluate
    from memattn.testbed.report import write_report

    result = subprocess.run(
        [sys.executable, "-m", "memattn", "testbed", "train", "--out", str(tmp_path), "--fast"],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    evaluation = evaluate(
        tmp_path / "pipeline",
        guidance_scale=2.0,
        per_group=8,
        groups=("memorized_matching", "never_seen"),
        progress=False,
    )
    summary = evaluation.summary()
    heavy = [row for row in evaluation.rows if row["duplication"] == 128]
    assert len(heavy) == 4
    assert sum(row["copy_similarity"] > 0.8 and row["nearest_is_own"] for row in heavy) >= 3
    # A never-seen caption can reproduce a memorized item's image (leakage); it must stay rare.
    assert summary["groups"]["never_seen"]["copy_rate"] <= 0.25
    assert np.mean([row["alignment"] for row in heavy]) >= 0.8  # a copy shows its caption's attributes
    assert "memorized_matching/score_e" in summary["detection_vs_non_memorized"]
    # v2's pre-registered E is E in that layer, read from the same step-1 record
    layer = evaluation.layer_names.index(PRE_REGISTERED_E_LAYER["object"])
    assert all(
        row["e_preregistered"] == pytest.approx(row["layer_e"][layer], abs=1e-6) for row in evaluation.rows
    )
    assert "memorized_matching/e_preregistered" in summary["detection_vs_non_memorized"]
    html = write_report(evaluation, tmp_path / "report").read_text()
    assert "memorized_matching" in html and (tmp_path / "report" / "copies.png").stat().st_size > 1000


TINY_OBJECTS = TrainConfig(
    steps=4,
    batch_size=8,
    checkpoint_every=2,
    classifier_steps=5,
    data=ObjectsConfig(
        matching_items_per_count=2, matching_counts=(8,), seen_once=20, rare_word_seen_once=4, never_seen=4
    ),
    model=ModelConfig(block_out_channels=(32, 32, 32), text_hidden=32, text_layers=1),
    text_encoder="contrastive-eoscopy",
    text_pretrain_steps=2,
    text_pretrain_batch=16,
)


def test_v2_recipe_pretrains_once_logs_the_sink_and_resumes_bit_exact(tmp_path):
    straight = tmp_path / "straight"
    train(TINY_OBJECTS, straight, progress=False)
    assert_trainer_fingerprint(straight, "v2")
    manifest = json.loads((straight / "pipeline" / "memattn_testbed.json").read_text())
    assert manifest["config"]["data"]["scene"] == "object"
    assert [entry["step"] for entry in manifest["sink_log"]] == [2, 4]
    assert set(manifest["sink_log"][0]) == {"step", "layers", "seen_once", "memorized"}
    assert manifest["text_encoder_pretraining"]["steps"] == 2
    index = json.loads((straight / "pipeline" / "model_index.json").read_text())
    assert index["text_encoder"] == ["memattn.testbed.model", "TestbedCLIPTextModel"]
    split = tmp_path / "split"
    train(replace(TINY_OBJECTS, steps=2), split, progress=False)
    stored = (split / "text-encoder" / "model.safetensors").stat().st_mtime_ns
    train(TINY_OBJECTS, split, progress=False)  # resumes at step 2, reuses the stored encoder
    assert (split / "text-encoder" / "model.safetensors").stat().st_mtime_ns == stored
    assert_same_weights(straight, split)
    encoder = "text_encoder/model.safetensors"
    a, b = load_file(straight / "pipeline" / encoder), load_file(split / "pipeline" / encoder)
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = json.loads((split / "pipeline" / "memattn_testbed.json").read_text())
    assert again["sink_log"] == manifest["sink_log"]


def test_recipe_options_are_validated():
    with pytest.raises(MemattnError, match="text_encoder"):
        TrainConfig(text_encoder="bert")
    with pytest.raises(MemattnError, match="text_pretrain_steps"):
        TrainConfig(text_encoder="contrastive")
    with pytest.raises(MemattnError, match="bos_scale"):
        TrainConfig(bos_scale=0)
    with pytest.raises(MemattnError, match="sampling"):
        TrainConfig(sampling="bootstrap")


def test_one_pass_sampling_shows_every_pair_exactly_once_per_pass(tmp_path):
    """`sampling="epochs"`: a pass is a seeded permutation of the training pairs, so a seen-once pair
    is seen exactly once per pass (uniform draws would show ~37 % of them never and ~26 % twice)."""
    config = replace(TINY_OBJECTS, sampling="epochs", batch_size=7)
    base = untrained_base(config, tmp_path)
    trainer = Finetuner(from_testbed_recipe(config, base, tmp_path / "run"))
    n = len(trainer.data)
    steps_per_pass = -(-n // config.batch_size)  # the last step of a pass reaches into the next one
    seen = []
    for step in range(2 * steps_per_pass):
        trainer.step = step
        seen += trainer._batch_rows(0, torch.Generator()).tolist()
    expected = list(range(n))
    assert sorted(seen[:n]) == expected and sorted(seen[n : 2 * n]) == expected
    assert seen[:n] != seen[n : 2 * n]  # every pass has its own order
    trainer.step = 3
    first = trainer._batch_rows(0, torch.Generator()).tolist()
    fresh = Finetuner(from_testbed_recipe(config, base, tmp_path / "again"))
    fresh.step = 3
    assert fresh._batch_rows(0, torch.Generator()).tolist() == first  # a resumed run takes the same batches


def test_manifest_lists_a_bounded_sample_per_group_and_counts_all(tmp_path, monkeypatch):
    import memattn.testbed.train as train_module

    monkeypatch.setattr(train_module, "MANIFEST_ITEMS_PER_GROUP", 5)
    trainer = UntrainedModel(TINY_OBJECTS, tmp_path)
    listed = train_module.manifest(trainer, 0.0, "test")
    assert [len(listed["groups"][g]) for g in ("seen_once", "never_seen")] == [5, 4]
    assert listed["summary"]["items"]["seen_once"] == 20
    assert [g["caption"] for g in listed["groups"]["seen_once"]] == [
        item.caption for item in trainer.dataset.group("seen_once")[:5]
    ]


def test_text_states_encoded_per_batch_equal_the_pre_encoded_ones(tmp_path, monkeypatch):
    """Past ``TEXT_CACHE_BYTES`` (a one-pass set of ~190k captions) the loop encodes each batch instead
    of keeping every state; both give the same states (to float tolerance: other batch shapes)."""
    import memattn.training.loop as loop

    base = untrained_base(TINY_OBJECTS, tmp_path)
    kept = Finetuner(from_testbed_recipe(TINY_OBJECTS, base, tmp_path / "kept"))
    monkeypatch.setattr(loop, "TEXT_CACHE_BYTES", 0)
    streamed = Finetuner(from_testbed_recipe(TINY_OBJECTS, base, tmp_path / "streamed"))
    assert kept.embeddings is not None and streamed.embeddings is None
    rows, drop = torch.arange(7), torch.zeros(7, dtype=torch.bool)
    torch.testing.assert_close(
        streamed._context(rows, drop, 0)[0], kept._context(rows, drop, 0)[0], atol=1e-5, rtol=1e-5
    )


def untrained_base(config: TrainConfig, out: Path) -> Path:
    from memattn.testbed.train import untrained_testbed

    return untrained_testbed(config, out / "base")
