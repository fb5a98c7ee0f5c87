"""`memattn finetune`: the testbed recipe bit for bit, mitigations in the loop, resume after SIGKILL,
atomic checkpoints and clear errors for missing or corrupt ones, image-folder data, the typer command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from memattn.cli.finetune import cli_args, register
from memattn.errors import Interrupted, MemattnError
from memattn.testbed.train import from_testbed_recipe, untrained_testbed
from memattn.training import (
    CHECKPOINTS,
    FinetuneConfig,
    Finetuner,
    MitigationConfig,
    finetune,
    latest_checkpoint,
    read_log,
)

sys.path.insert(0, str(Path(__file__).parent))
from conftest import HANG_GUARD_S
from test_testbed_train import TINY, TINY_OBJECTS  # noqa: E402  (the testbed tests' tiny recipes)

UNET = Path("pipeline") / "unet" / "diffusion_pytorch_model.safetensors"


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / UNET)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def same_final_state(a: Path, b: Path) -> list[str]:
    """What differs between two runs' last checkpoints (UNet, EMA, optimizer tensors, LR schedule,
    filter windows) and exported weights; empty when they are bit-identical. Names say which part."""
    ca, cb = latest_checkpoint(a), latest_checkpoint(b)
    differ = [] if same_weights(a, b) else ["exported pipeline"]
    for name in ("unet.safetensors", "ema.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(ca / name), load_file(cb / name)
        for k in sorted(ta.keys() | tb.keys()):
            if k not in ta or k not in tb or not torch.equal(ta[k], tb[k]):
                differ.append(f"{name}:{k}")
    sa, sb = (json.loads((c / "state.json").read_text()) for c in (ca, cb))
    differ += [key for key in ("step", "lr_scheduler", "filter", "param_groups") if sa[key] != sb[key]]
    return differ


def training_trace(run: Path) -> list[dict]:
    """A run's log without its timings: what each step drew, decided and lost."""
    return [{k: v for k, v in e.items() if k != "seconds"} for e in read_log(run)]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return untrained_testbed(TINY, tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def plain(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain")
    finetune(from_testbed_recipe(TINY, base, out), command="test")
    return out


def config(base: Path, out: Path, **kwargs) -> FinetuneConfig:
    mitigation = kwargs.pop("mitigation", None)
    return from_testbed_recipe(TINY, base, out, mitigation, **kwargs)


def test_none_reproduces_the_testbed_trainer_bit_for_bit(plain, tmp_path):
    from memattn.testbed.train import train

    train(TINY, tmp_path, progress=False)
    assert same_weights(plain, tmp_path)


def test_none_reproduces_the_v2_trainer_bit_for_bit_with_its_pretrained_encoder(tmp_path):
    """Testbed v2 (objects on random backgrounds, the EOS-copy encoder pre-trained then frozen): the
    base that ``untrained_testbed`` exports carries the pre-trained encoder, so finetune replays it."""
    from memattn.testbed.train import train

    recipe = TINY_OBJECTS
    base = untrained_testbed(recipe, tmp_path / "base")
    finetune(from_testbed_recipe(recipe, base, tmp_path / "tuned"), command="test")
    train(recipe, tmp_path / "trained", progress=False)
    assert same_weights(tmp_path / "tuned", tmp_path / "trained")
    encoder = Path("pipeline") / "text_encoder" / "model.safetensors"
    a, b = load_file(tmp_path / "tuned" / encoder), load_file(tmp_path / "trained" / encoder)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_exports_a_loadable_testbed_pipeline_and_logs_every_step(plain):
    from memattn.loading import load_pipeline
    from memattn.testbed.manifest import dataset_for

    pipe = load_pipeline(str(plain / "pipeline"))
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3)
    assert len(dataset_for(plain / "pipeline").items) > 0  # the manifest travelled with the model
    assert (plain / "pipeline" / "memattn_attribute_classifier.safetensors").is_file()
    run = json.loads((plain / "pipeline" / "memattn_finetune.json").read_text())
    assert run["steps"] == 6 and run["command"] == "test"
    log = read_log(plain)
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5, 6]
    assert all(e["n"] == 8 and e["kept"] == 8 and e["dropped"] == 0 and len(e["ids"]) == 8 for e in log)
    assert sorted(p.name for p in (plain / CHECKPOINTS).iterdir()) == [
        "step-0000002",
        "step-0000004",
        "step-0000006",
    ]


def test_monitoring_changes_no_weight(base, plain, tmp_path):
    """The probe's output path and the extra no-grad pass leave training bit-identical."""
    finetune(config(base, tmp_path, mitigation=MitigationConfig(monitor=True)))
    assert same_weights(plain, tmp_path)
    assert same_final_state(plain, tmp_path) == []  # the trained UNet and optimizer too, not only EMA
    entry = read_log(tmp_path)[0]
    assert len(entry["entropy"]) == len(entry["noise_norm"]) == 8
    assert len(entry["layer_entropy"]) == 8 and len(entry["layer_entropy"][0]) == 7
    assert all(0 < h <= np.log(77) + 1e-4 for h in entry["entropy"])
    for position in entry["no_caption"]:  # the empty prompt: conditional = unconditional
        assert entry["noise_norm"][position] == 0.0


@pytest.mark.parametrize(("kind", "per_step"), [("entropy", 1), ("noise-norm", 2), ("caption-aug", 1)])
def test_unet_forwards_per_micro_batch(base, tmp_path, kind, per_step):
    cfg = config(base, tmp_path, gradient_accumulation_steps=2, mitigation=MitigationConfig(kind=kind))
    with Finetuner(cfg) as tuner:
        calls = [0]
        tuner.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        entry = tuner.train_step()
    assert calls[0] == 2 * per_step
    assert entry["step"] == 1 and entry["n"] == 16


def test_entropy_rule_drops_and_logs_which_samples(base, tmp_path):
    mitigation = MitigationConfig(kind="entropy", rule="zscore", z=0.5, min_samples=4, drop="low")
    finetune(config(base, tmp_path, mitigation=mitigation))
    log = read_log(tmp_path)
    assert sum(e["dropped"] for e in log) > 0
    for e in log:
        assert e["kept"] + e["dropped"] == e["n"] == len(e["ids"]) == len(e["entropy"])
        assert (
            e["dropped_ids"] == [e["ids"][i] for i in e["dropped_at"]]
            and len(e["dropped_at"]) == e["dropped"]
        )
        assert not set(e["dropped_at"]) & set(e["no_caption"])  # the empty prompt is never judged


def test_noise_norm_fixed_threshold_drops_at_or_above_tau(base, tmp_path):
    finetune(config(base, tmp_path, mitigation=MitigationConfig(kind="noise-norm", threshold=0.9)))
    for e in read_log(tmp_path):
        dropped = [e["ids"][i] for i, norm in enumerate(e["noise_norm"]) if norm >= 0.9]
        assert e["dropped_ids"] == dropped


def test_caption_augmentation_changes_training(base, plain, tmp_path):
    mitigation = MitigationConfig(kind="caption-aug", caption_aug_prob=0.5)
    finetune(config(base, tmp_path, mitigation=mitigation))
    assert sum(len(e["augmented"]) for e in read_log(tmp_path)) > 0
    assert not same_weights(plain, tmp_path)


def test_random_drop_control_drops_blind_on_the_same_batches(base, plain, tmp_path):
    """The control sees the batches `none` sees, drops only captioned samples, at about its rate."""
    finetune(config(base, tmp_path, mitigation=MitigationConfig(kind="random-drop", drop_prob=0.5)))
    log, reference = read_log(tmp_path), read_log(plain)
    assert [e["ids"] for e in log] == [e["ids"] for e in reference]
    assert [e["timesteps"] for e in log] == [e["timesteps"] for e in reference]
    captioned = sum(e["n"] - len(e["no_caption"]) for e in log)
    dropped = sum(e["dropped"] for e in log)
    assert 0.25 * captioned < dropped < 0.75 * captioned  # 48 captioned draws at p = 0.5
    assert all(not set(e["dropped_at"]) & set(e["no_caption"]) for e in log)
    assert not same_weights(plain, tmp_path)
    again = tmp_path / "again"
    finetune(config(base, again, mitigation=MitigationConfig(kind="random-drop", drop_prob=0.5)))
    assert [e["dropped_ids"] for e in read_log(again)] == [e["dropped_ids"] for e in log]


@pytest.mark.parametrize("prob", [0.0, 1.0, -0.1])
def test_random_drop_needs_a_probability_below_one(prob):
    with pytest.raises(MemattnError, match="drop"):
        MitigationConfig(kind="random-drop", drop_prob=prob)


def test_resume_with_a_running_window_matches_an_uninterrupted_run(base, tmp_path):
    mitigation = MitigationConfig(kind="entropy", z=0.5, window=20, timestep_bins=2, min_samples=4)
    finetune(config(base, tmp_path / "straight", mitigation=mitigation))
    finetune(config(base, tmp_path / "split", mitigation=mitigation, max_train_steps=4))
    state = json.loads((latest_checkpoint(tmp_path / "split") / "state.json").read_text())
    assert sum(len(h) for h in state["filter"]["history"]) > 0
    finetune(config(base, tmp_path / "split", mitigation=mitigation, resume_from_checkpoint="latest"))
    assert same_weights(tmp_path / "straight", tmp_path / "split")
    straight, split = read_log(tmp_path / "straight"), read_log(tmp_path / "split")
    assert [e["dropped_ids"] for e in straight] == [e["dropped_ids"] for e in split]
    assert sum(e["dropped"] for e in straight) > 0


@pytest.mark.slow
def test_sigkill_then_resume_latest_is_bit_exact(base, tmp_path):
    long = config(base, tmp_path / "killed", max_train_steps=30, checkpointing_steps=2)
    command = [sys.executable, "-m", "memattn.cli.finetune", "finetune", *cli_args(long), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + HANG_GUARD_S
    while (
        time.time() < deadline and latest_checkpoint(tmp_path / "killed") is None and process.poll() is None
    ):
        time.sleep(0.1)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = latest_checkpoint(tmp_path / "killed")
    assert killed_at is not None and killed_at.name != "step-0000030", process.stderr.read().decode()[-2000:]
    assert not (tmp_path / "killed" / "pipeline").exists()
    resumed = subprocess.run(
        [*command, "--resume-from-checkpoint", "latest"], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    finetune(replace(long, output_dir=str(tmp_path / "straight")))
    assert same_weights(tmp_path / "killed", tmp_path / "straight")
    assert [e["step"] for e in read_log(tmp_path / "killed")] == list(range(1, 31))


# ---- testbed v2: resume and monitoring are bit-exact there too ---------------------------------------


@pytest.fixture(scope="module")
def objects_base(tmp_path_factory) -> Path:
    return untrained_testbed(TINY_OBJECTS, tmp_path_factory.mktemp("objects-base"))


def objects_config(base: Path, out: Path, **kwargs) -> FinetuneConfig:
    mitigation = kwargs.pop("mitigation", None)
    return from_testbed_recipe(TINY_OBJECTS, base, out, mitigation, **kwargs)


def sigkill_then_resume(run: FinetuneConfig) -> str:
    """Train ``run`` in a subprocess, SIGKILL it soon after its first checkpoint, resume it with
    ``--resume-from-checkpoint latest`` to the end; returns the checkpoint the kill left."""
    out = Path(run.output_dir)
    command = [sys.executable, "-m", "memattn.cli.finetune", "finetune", *cli_args(run), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + HANG_GUARD_S
    while time.time() < deadline and latest_checkpoint(out) is None and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = latest_checkpoint(out)
    final = f"step-{run.max_train_steps:07d}"
    assert killed_at is not None and killed_at.name != final, process.stderr.read().decode()[-2000:]
    assert not (out / "pipeline").exists()
    resumed = subprocess.run(
        [*command, "--resume-from-checkpoint", "latest"], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return killed_at.name


def test_v2_monitoring_changes_no_weight(objects_base, tmp_path):
    """On v2 (pre-trained frozen encoder, object scene) the probe and the extra pass only observe."""
    finetune(objects_config(objects_base, tmp_path / "none"))
    finetune(objects_config(objects_base, tmp_path / "monitor", mitigation=MitigationConfig(monitor=True)))
    assert same_final_state(tmp_path / "none", tmp_path / "monitor") == []
    monitored = training_trace(tmp_path / "monitor")
    plain_steps = training_trace(tmp_path / "none")
    signals = ("entropy", "layer_entropy", "noise_norm")
    assert [{k: v for k, v in e.items() if k not in signals} for e in monitored] == plain_steps
    assert all(len(e["entropy"]) == len(e["noise_norm"]) == e["n"] for e in monitored)


@pytest.mark.slow
@pytest.mark.parametrize("monitor", [False, True], ids=["none", "monitor"])
def test_v2_sigkill_then_resume_latest_is_bit_exact(objects_base, tmp_path, monitor):
    """The v1 test's twin on v2 data; with the monitor on, the resumed run also equals plain `none`."""
    mitigation = MitigationConfig(monitor=monitor)
    long = objects_config(objects_base, tmp_path / "killed", max_train_steps=24, checkpointing_steps=2)
    long = replace(long, mitigation=mitigation)
    sigkill_then_resume(long)
    finetune(replace(long, output_dir=str(tmp_path / "straight")))
    assert same_final_state(tmp_path / "killed", tmp_path / "straight") == []
    assert training_trace(tmp_path / "killed") == training_trace(tmp_path / "straight")
    assert [e["step"] for e in read_log(tmp_path / "killed")] == list(range(1, 25))
    if monitor:
        finetune(replace(long, output_dir=str(tmp_path / "none"), mitigation=MitigationConfig()))
        assert same_final_state(tmp_path / "killed", tmp_path / "none") == []


def test_ctrl_c_finishes_the_step_checkpoints_it_and_says_how_to_resume(base, tmp_path):
    from memattn.training.run import _kept_after_interrupt

    run = config(base, tmp_path / "stopped", max_train_steps=12, checkpointing_steps=1000)
    command = [sys.executable, "-m", "memattn.cli.finetune", "finetune", *cli_args(run), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "stopped" / "log.jsonl"
    deadline = time.time() + HANG_GUARD_S
    while time.time() < deadline and process.poll() is None and not (log.is_file() and log.read_text()):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=HANG_GUARD_S)
    assert process.returncode == 130, stderr[-2000:]
    kept = latest_checkpoint(tmp_path / "stopped")
    assert kept is not None, stderr[-2000:]  # no regular checkpoint was due: Ctrl-C wrote this one
    steps = [e["step"] for e in read_log(tmp_path / "stopped")]
    assert kept.name == f"step-{steps[-1]:07d}" and steps[-1] < 12
    assert (
        f"interrupted: checkpoint {kept} kept (step {steps[-1]} of 12); rerun the same command with "
        "--resume-from-checkpoint latest" in stderr
    )
    assert "Traceback" not in stderr
    resumed = subprocess.run(
        [*command, "--resume-from-checkpoint", "latest"], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [e["step"] for e in read_log(tmp_path / "stopped")] == list(range(1, 13))
    finetune(replace(run, output_dir=str(tmp_path / "straight")))
    assert same_weights(tmp_path / "stopped", tmp_path / "straight")
    assert "nothing kept" in _kept_after_interrupt(tmp_path / "empty", 30)


def test_a_checkpoint_past_the_requested_end_is_refused(base, tmp_path):
    """Exporting it would report more steps than asked for: one line says how to go on instead."""
    finetune(config(base, tmp_path, max_train_steps=4, checkpointing_steps=2))
    with pytest.raises(MemattnError, match="is at step 4, past --max-train-steps 2: resume it with"):
        finetune(config(base, tmp_path, max_train_steps=2, resume_from_checkpoint="latest"))


def test_resuming_at_another_thread_count_says_the_run_is_no_longer_bit_exact(base, tmp_path, capsys):
    finetune(config(base, tmp_path, max_train_steps=2))
    assert {e["threads"] for e in read_log(tmp_path)} == {torch.get_num_threads()}
    state_file = latest_checkpoint(tmp_path) / "state.json"
    state = json.loads(state_file.read_text())
    assert state["torch_threads"] == torch.get_num_threads()
    state["torch_threads"] = torch.get_num_threads() + 1  # as if written by a process with more threads
    state_file.write_text(json.dumps(state))
    finetune(config(base, tmp_path, max_train_steps=3, resume_from_checkpoint="latest"))
    note = capsys.readouterr().err
    assert f"written with {torch.get_num_threads() + 1} torch threads" in note
    assert "not bit-identical to an uninterrupted one" in note


def test_checkpoint_from_before_a_new_mitigation_option_still_resumes(base, tmp_path):
    """A run checkpointed by a version without `drop_prob` (added later) resumes; a real change does not."""
    finetune(config(base, tmp_path, max_train_steps=2))
    state_file = latest_checkpoint(tmp_path) / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["mitigation"]["drop_prob"]
    state_file.write_text(json.dumps(state))
    finetune(config(base, tmp_path, max_train_steps=4, resume_from_checkpoint="latest"))
    assert [e["step"] for e in read_log(tmp_path)] == [1, 2, 3, 4]
    state = json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())
    state["config"]["mitigation"]["drop_prob"] = 0.5
    (latest_checkpoint(tmp_path) / "state.json").write_text(json.dumps(state))
    with pytest.raises(MemattnError, match="different recipe.*mitigation"):
        finetune(config(base, tmp_path, max_train_steps=6, resume_from_checkpoint="latest"))


def test_missing_corrupt_and_foreign_checkpoints_are_clear_errors(base, tmp_path):
    run = tmp_path / "run"
    finetune(config(base, run, max_train_steps=2))
    checkpoint = latest_checkpoint(run)
    with pytest.raises(MemattnError, match="already holds checkpoints"):
        finetune(config(base, run, max_train_steps=4))
    with pytest.raises(MemattnError, match="does not exist"):
        finetune(config(base, run, max_train_steps=4, resume_from_checkpoint=str(tmp_path / "nowhere")))
    with pytest.raises(MemattnError, match="different recipe.*learning_rate"):
        finetune(config(base, run, max_train_steps=4, learning_rate=0.5, resume_from_checkpoint="latest"))
    unet = checkpoint / "unet.safetensors"
    data = unet.read_bytes()
    unet.write_bytes(data[: len(data) // 2])
    with pytest.raises(MemattnError, match="corrupt or incomplete.*unet.safetensors has"):
        finetune(config(base, run, max_train_steps=4, resume_from_checkpoint="latest"))
    unet.write_bytes(b"\x00" * len(data))  # right size, garbage inside
    with pytest.raises(MemattnError, match="corrupt or incomplete"):
        finetune(config(base, run, max_train_steps=4, resume_from_checkpoint="latest"))
    (checkpoint / "state.json").unlink()
    with pytest.raises(MemattnError, match="state.json is missing"):
        finetune(config(base, run, max_train_steps=4, resume_from_checkpoint=str(checkpoint)))


def test_a_crash_while_checkpointing_never_leaves_a_latest(base, tmp_path, monkeypatch):
    import memattn.training.loop as module

    run = tmp_path / "run"
    finetune(config(base, run, max_train_steps=2))
    good = latest_checkpoint(run)
    calls = [0]
    real_save = module.save_file

    def crash_on_second_file(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt("simulated crash mid-checkpoint")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(module, "save_file", crash_on_second_file)
    with pytest.raises(Interrupted, match=f"checkpoint {good} kept .step 2 of 4"):  # Ctrl-C: what is kept
        finetune(config(base, run, max_train_steps=4, resume_from_checkpoint="latest"))
    assert (run / CHECKPOINTS / ".partial-0000004").is_dir()  # what the crash left
    (run / CHECKPOINTS / "step-0000009").mkdir()  # a complete-looking name without state.json
    assert latest_checkpoint(run) == good
    monkeypatch.setattr(module, "save_file", real_save)
    finetune(config(base, run, max_train_steps=4, resume_from_checkpoint="latest"))
    assert latest_checkpoint(run).name == "step-0000004"
    assert not (run / CHECKPOINTS / ".partial-0000004").exists()


def test_image_folder_data_through_the_typer_command(base, tmp_path):
    """Images + captions.jsonl, diffusers' defaults (clipping), cosine LR with warm-up, EMA, flips,
    a checkpoint limit, and a resume across the LR schedule that matches a straight run."""
    from PIL import Image

    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a red circle {i}"}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    register(app)

    def run(out: Path, steps: int, *extra: str, limit: str = "1"):
        args = ["finetune", "--output-dir", str(out), "--model", str(base), "--data", str(folder)]
        args += ["--max-train-steps", str(steps), "--train-batch-size", "3", "--mitigation", "entropy"]
        args += ["--use-ema", "--random-flip", "--lr-scheduler", "cosine", "--lr-warmup-steps", "1"]
        args += ["--checkpointing-steps", "1", "--checkpoints-total-limit", limit, "--no-progress", *extra]
        return CliRunner().invoke(app, args)

    result = run(tmp_path / "straight", 3)
    assert result.exit_code == 0, result.output
    log = read_log(tmp_path / "straight")
    assert [e["step"] for e in log] == [1, 2, 3] and all(i.endswith(".png") for i in log[0]["ids"])
    assert log[0]["lr"] != log[2]["lr"]  # the cosine schedule moved
    assert [p.name for p in (tmp_path / "straight" / CHECKPOINTS).iterdir()] == ["step-0000003"]
    # A crash after step 2's checkpoint: the resumed run continues the LR schedule where it was.
    split = tmp_path / "split"
    assert run(split, 3, limit="2").exit_code == 0
    shutil.rmtree(split / CHECKPOINTS / "step-0000003")
    shutil.rmtree(split / "pipeline")
    assert run(split, 3, "--resume-from-checkpoint", "latest", limit="2").exit_code == 0
    assert same_weights(tmp_path / "straight", split)
    assert [e["lr"] for e in read_log(split)] == [e["lr"] for e in log]
    longer = run(split, 5, "--resume-from-checkpoint", "latest", limit="2")  # cosine is shaped by the length
    assert isinstance(longer.exception, MemattnError) and "max_train_steps" in str(longer.exception)
    (folder / "captions.jsonl").write_text('{"file_name": "missing.png", "text": "x"}\n')
    bad = run(tmp_path / "bad", 1)
    assert isinstance(bad.exception, MemattnError) and "does not exist" in str(bad.exception)
    assert "finetune" in CliRunner().invoke(app, ["--help"]).output


@pytest.mark.parametrize(
    "mitigation",
    [
        MitigationConfig(kind="entropy", z=1.5, window=64, timestep_bins=4, layers=(0, 6)),
        MitigationConfig(kind="noise-norm"),
        MitigationConfig(kind="caption-aug", caption_aug_prob=0.3),
        MitigationConfig(kind="random-drop", drop_prob=0.25),
        MitigationConfig(monitor=True),
    ],
)
def test_cli_args_round_trip_the_config(base, tmp_path, monkeypatch, mitigation):
    import memattn.training as module

    cfg = config(base, tmp_path, mitigation=mitigation, gradient_accumulation_steps=2)
    captured = {}
    monkeypatch.setattr(module, "finetune", lambda c: captured.setdefault("config", c) and tmp_path)
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    register(app)
    result = CliRunner().invoke(app, ["finetune", *cli_args(cfg), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert captured["config"].recipe() == cfg.recipe()
    with pytest.raises(MemattnError, match="unknown mitigation"):
        MitigationConfig(kind="dropout")


@pytest.mark.slow
def test_two_cpu_processes_gather_the_rule_and_resume_bit_exact(base, tmp_path):
    """`torchrun --nproc_per_node 2` on CPU (gloo): one log of both processes' samples, decisions taken on
    the gathered batch (as one process would on all 16), and a split + resumed run equal to a straight one."""
    from memattn.training.filters import ThresholdRule

    mitigation = MitigationConfig(kind="entropy", z=0.5, min_samples=4)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}

    def launch(out: Path, steps: int, resume: bool = False) -> None:
        cfg = config(base, out, mitigation=mitigation, max_train_steps=steps)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        command += ["-m", "memattn.cli.finetune", "finetune", *cli_args(cfg), "--no-progress"]
        command += ["--resume-from-checkpoint", "latest"] if resume else []
        done = subprocess.run(command, capture_output=True, text=True, timeout=HANG_GUARD_S, env=env)
        assert done.returncode == 0, done.stderr[-3000:]

    launch(tmp_path / "straight", 4)
    log = read_log(tmp_path / "straight")
    assert [e["n"] for e in log] == [16, 16, 16, 16]
    for e in log:
        eligible = torch.ones(16, dtype=torch.bool)
        eligible[e["no_caption"]] = False
        rule = ThresholdRule("zscore", z=0.5, min_samples=4)  # one process, the whole gathered batch
        keep = rule.decide(torch.tensor(e["entropy"]), None, eligible)
        assert e["dropped_at"] == [i for i, k in enumerate(keep.tolist()) if not k]
    assert sum(e["dropped"] for e in log) > 0
    launch(tmp_path / "split", 2)
    launch(tmp_path / "split", 4, resume=True)
    assert same_weights(tmp_path / "straight", tmp_path / "split")
    assert [e["dropped_ids"] for e in read_log(tmp_path / "split")] == [e["dropped_ids"] for e in log]


def test_a_multi_process_launch_accelerate_does_not_see_is_a_clear_error(base, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; accelerate on CPU needs ACCELERATE_USE_CPU
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    with pytest.raises(MemattnError, match="launched as 2 processes but accelerate runs 1.*ACCELERATE_USE"):
        Finetuner(config(base, tmp_path))


def test_bf16_mixed_precision_runs_on_cpu(base, tmp_path):
    finetune(config(base, tmp_path, max_train_steps=1, mixed_precision="bf16"))
    assert np.isfinite(read_log(tmp_path)[0]["loss"])


@pytest.mark.slow
def test_benchmark_quick_run(tmp_path):
    """benchmarks/train_mitigation.py --quick on testbed v2 data: every rule trains, is evaluated and
    timed side by side (v1 recipes share every step but the data)."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench"
    script = str(root / "benchmarks" / "train_mitigation.py")
    result = subprocess.run(
        [sys.executable, script, "--recipe", "objects-fast", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["monitor_weights_identical_to_none"] is True
    assert set(report["results"]) >= {"none", "entropy-z-running-high", "noise-norm-wen-tau2", "caption-aug"}
    for name, row in report["results"].items():
        assert row["steps"] == 8 and row["generations"] > 0, name
        assert 0.0 <= row["drop_rate"] <= 1.0 and np.isfinite(row["final_loss"])
        assert name in report["timing_side_by_side"] and name in report["verdicts"]
        assert row["command"].startswith("memattn finetune --output-dir")
    assert report["results"]["none"]["drop_rate"] == 0.0
    assert report["results"]["caption-aug"]["augmented_rate"] > 0.0
    assert "entropy" in report["monitor_signal_analysis"]
    assert "rule" in result.stdout and "monitor weights identical to none: True" in result.stdout
    control = report["results"]["random-drop-0.3"]
    assert 0.0 < control["drop_rate_captioned"] < 0.7 and control["mitigation"]["kind"] == "random-drop"
    none = report["verdicts"]["none"]
    assert none["random_drop_copy_rate_at_same_drop_rate"] == report["results"]["none"]["copy_rate_top"]
    figure = subprocess.run(
        [
            sys.executable,
            str(root / "benchmarks" / "train_mitigation_figure.py"),
            str(out / "results.json"),
            "--json",
            str(tmp_path / "merged.json"),
            "--out",
            str(tmp_path / "figure.png"),
        ],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert figure.returncode == 0, figure.stderr[-3000:]
    assert (tmp_path / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| random-drop-0.3 |" in figure.stdout
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["results"].keys() == report["results"].keys()


def test_random_drop_control_curve_interpolates_and_never_extrapolates():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from train_mitigation import at_drop_rate, control_curve

    rows = {
        "none": {"copy_rate_top": 1.0, "drop_rate_captioned": 0.0},
        "random-drop-0.2": {"copy_rate_top": 0.8, "drop_rate_captioned": 0.2},
        "noise-norm": {"copy_rate_top": 0.1, "drop_rate_captioned": 0.1},  # not part of the control
    }
    curve = control_curve(rows, "copy_rate_top")
    assert at_drop_rate(curve, 0.1) == pytest.approx(0.9)
    assert np.isnan(at_drop_rate(curve, 0.3))
    assert control_curve({"none": rows["none"]}, "copy_rate_top") is None
