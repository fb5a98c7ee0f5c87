"""The `memattn detect` command on a pipeline saved to disk and loaded with from_pretrained."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import HANG_GUARD_S
from typer.testing import CliRunner

from memattn.cli import app
from memattn.testing import tiny_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd1")
    tiny_pipeline("sd1", seed=5).save_pretrained(path, safe_serialization=True)
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "memattn", *args], capture_output=True, text=True, timeout=HANG_GUARD_S
    )


def test_detect_json_rows(model_dir):
    result = CliRunner().invoke(
        app, ["detect", "a dog", "hello " * 90, "--model", str(model_dir), "--steps", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [row["prompt"] for row in rows] == ["a dog", "hello " * 90]
    assert [row["seed"] for row in rows] == [0, 1]
    assert rows[0]["n_tokens"] == 4 and rows[1]["truncated"] is True
    assert all(isinstance(row["score_d"], float) and isinstance(row["score_e"], float) for row in rows)
    assert rows[0]["triggers"][0][0] in {"a", "dog"}


def test_detect_table_and_first_step_only(model_dir):
    result = CliRunner().invoke(
        app, ["detect", "a red cube", "--model", str(model_dir), "--scores", "e", "--steps", "50"]
    )
    assert result.exit_code == 0, result.output
    assert "a red cube" in result.stdout and "memattn detect" in result.stdout


def test_first_step_only_makes_one_unet_call(model_dir):
    from memattn.detection.detect import detect
    from memattn.loading import load_pipeline

    pipe = load_pipeline(str(model_dir))
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        detect(pipe, ["a dog", "a cat"], which=["e"], steps=50, progress=False)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_progress_per_step_and_the_users_pipeline_bar_left_alone(model_dir, capsys):
    from memattn.detection.detect import detect
    from memattn.loading import load_pipeline

    assert "disable" not in getattr(load_pipeline(str(model_dir)), "_progress_bar_config", {})
    assert load_pipeline(str(model_dir), progress_bar=False)._progress_bar_config == {"disable": True}
    pipe = load_pipeline(str(model_dir))
    pipe.set_progress_bar_config(desc="the user's bar")
    capsys.readouterr()
    detect(pipe, ["a dog", "a cat"], which=["d"], steps=3, batch_size=1)
    err = capsys.readouterr().err
    assert "detect" in err and "6/6" in err  # 2 batches x 3 steps, one tick per UNet step
    assert "the user's bar" not in err  # memattn's bar replaces the pipeline's during the run ...
    assert pipe._progress_bar_config == {"desc": "the user's bar"}  # ... and gives it back after
    pipe("a dog", num_inference_steps=2, output_type="latent")
    assert "the user's bar" in capsys.readouterr().err


def test_missing_model_is_one_line_exit_2():
    result = cli("detect", "a dog", "--model", "nobody/no-such-model-here")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not found locally; pass a local path" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["", "--steps", "2"], "prompt 0 is empty"),
        (["a dog", "--scores", "d", "--steps", "1"], "needs at least 2 denoising steps"),
        (["a dog", "--scores", "x"], "unknown score"),
        (["a dog", "--layer", "down_blocks.9", "--steps", "2"], "not a cross-attention layer"),
    ],
)
def test_bad_input_gives_clear_errors(model_dir, args, message):
    result = cli("detect", *args, "--model", str(model_dir))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_directory_without_pipeline_or_safetensors(tmp_path, model_dir):
    result = cli("detect", "a dog", "--model", str(tmp_path))
    assert result.returncode == 2 and "model_index.json is missing" in result.stderr
    file_path = tmp_path / "model.ckpt"
    file_path.write_bytes(b"not a checkpoint")
    result = cli("detect", "a dog", "--model", str(file_path))
    assert result.returncode == 2 and "single file" in result.stderr


@pytest.mark.parametrize("damage", ["random", "empty", "truncated"])
def test_a_corrupt_weights_file_is_named_in_one_line(tmp_path, model_dir, damage):
    """Random bytes gave a SafetensorError traceback; an empty or truncated file was misdiagnosed as
    'has no safetensors weights ... convert them'."""
    import os
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    weights = copy / "text_encoder" / "model.safetensors"
    data = weights.read_bytes()
    damaged = {"random": os.urandom(4096), "empty": b"", "truncated": data[: len(data) // 2]}
    weights.write_bytes(damaged[damage])
    result = cli("detect", "a dog", "--model", str(copy), "--steps", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{weights} is corrupt or truncated" in result.stderr


@pytest.mark.parametrize("command", [["detect", "a dog"], ["scan", "PROMPTS", "--out", "OUT"]])
def test_a_device_this_torch_cannot_use_is_one_line(tmp_path, model_dir, command):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    (tmp_path / "p.txt").write_text("a dog\n")
    paths = {"PROMPTS": str(tmp_path / "p.txt"), "OUT": str(tmp_path / "o")}
    args = [paths.get(a, a) for a in command]
    result = cli(*args, "--model", str(model_dir), "--device", "cuda")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "--device cuda: this torch" in result.stderr and "use --device cpu" in result.stderr


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["detect", "a dog", "--batch-size", "-1"], "--batch-size"),
        (["detect", "a dog", "--batch-size", "0"], "--batch-size"),
        (["detect", "a dog", "--scores", "e", "--steps", "0"], "--steps"),
        (["detect", "a dog", "--guidance", "-3"], "--guidance"),
        (["calibrate", "--clean", "x.txt", "--batch-size", "0"], "--batch-size"),
        (["calibrate", "--clean", "x.txt", "--steps", "0"], "--steps"),
        (["generate", "a dog", "--out", "x", "--steps", "0"], "--steps"),
        (["scan", "in.txt", "--out", "o", "--batch-size", "0"], "--batch-size"),
        (["scan", "in.txt", "--out", "o", "--top-k", "-1"], "--top-k"),
        (["bench", "detect", "--per-group", "0"], "--per-group"),
        (["bench", "mitigate", "--seeds", "0"], "--seeds"),
        (["testbed", "report", "--per-group", "-2"], "--per-group"),
        (["finetune", "--train-batch-size", "0"], "--train-batch-size"),
    ],
)
def test_zero_or_negative_sizes_are_refused_before_any_work(args, option):
    """A count, size or step number below its minimum exits 2 naming the option (``detect --batch-size
    -1`` printed an empty table and exited 0), before a model loads."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.replace("│", " ").split())  # rich wraps the error box
    assert option in text and "greater than or equal" in text


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "a dog", "--steps", "2", "--out"],
        ["scan", "PROMPTS", "--steps", "1", "--out"],
        ["report", "RESULTS", "--out"],
        ["testbed", "report", "--out"],
        ["bench", "detect", "--out"],
        ["calibrate", "--clean", "PROMPTS", "--fpr", "1", "--out"],
        ["finetune", "--max-train-steps", "1", "--output-dir"],
        ["testbed", "train", "--fast", "--out"],
    ],
)
def test_an_unwritable_out_is_refused_before_the_work(args, tmp_path, model_dir):
    """``--out`` under /proc (or any unwritable place) is one line and exit 2 before anything runs
    (``generate`` made its directory after generating, so the images were lost)."""
    (tmp_path / "p.txt").write_text("a dog\n")
    (tmp_path / "results").mkdir()
    args = [
        a.replace("PROMPTS", str(tmp_path / "p.txt")).replace("RESULTS", str(tmp_path / "results"))
        for a in args
    ]
    target = "/proc/memattn-out/x.html" if args[0] == "report" else "/proc/memattn-out"
    if args[0] == "calibrate":
        target += "/guard.json"
    model = "testbed" if args[0] in ("testbed", "bench", "finetune") else str(model_dir)
    model_option = [] if args[:2] == ["testbed", "train"] else ["--model", model]
    result = subprocess.run(
        [sys.executable, "-m", "memattn", *args, target, *model_option],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 2, result.stderr
    option = "--output-dir" if args[0] == "finetune" else "--out"
    assert result.stderr.startswith(f"error: {option} /proc/memattn-out"), result.stderr
    assert "cannot be written" in result.stderr
    assert "Traceback" not in result.stderr


def test_guidance_at_most_one_says_what_changes(model_dir):
    """``--guidance 0.5`` gave results identical to 1 without a word; now a note says why, and what is
    unavailable; the results stay those of guidance 1."""
    low = CliRunner().invoke(
        app,
        [
            "detect",
            "a dog",
            "--model",
            str(model_dir),
            "--steps",
            "2",
            "--scores",
            "e",
            "--json",
            "--guidance",
            "0.5",
        ],
    )
    one = CliRunner().invoke(
        app,
        [
            "detect",
            "a dog",
            "--model",
            str(model_dir),
            "--steps",
            "2",
            "--scores",
            "e",
            "--json",
            "--guidance",
            "1",
        ],
    )
    assert low.exit_code == 0 and one.exit_code == 0, low.output
    assert "guidance 0.5 <= 1 runs no unconditional branch" in low.stderr
    assert "noise-norm scores (Wen, bright ending) are unavailable" in low.stderr
    rows = [[json.loads(x)["score_e"] for x in r.stdout.splitlines() if x[:1] == "{"] for r in (low, one)]
    assert rows[0] == rows[1]


def test_generate_says_what_was_mitigated(model_dir, tmp_path):
    result = cli(
        "generate",
        "a dog",
        "--model",
        str(model_dir),
        "--steps",
        "2",
        "--method",
        "rta",
        "--out",
        str(tmp_path / "g"),
    )
    assert result.returncode == 0, result.stderr
    assert "1 images in" in result.stdout and "every image mitigated by rta" in result.stdout
    plain = cli(
        "generate",
        "a dog",
        "hello " * 90,
        "--model",
        str(model_dir),
        "--steps",
        "2",
        "--out",
        str(tmp_path / "p"),
    )
    assert plain.returncode == 0 and "no mitigation" in plain.stdout
    assert plain.stderr.count("prompt truncated to 77 tokens") == 1 and "'hello hello" in plain.stderr
    assert "generate: 100%" in plain.stderr and "2/2" in plain.stderr  # per-step progress


def test_defaults_come_from_the_model_and_are_printed(model_dir):
    """The testbed is evaluated at 25 steps and guidance 2; the commands defaulted to 50 and 7.5 on it.
    Every run now prints the settings in effect and where they came from."""
    testbed = CliRunner().invoke(
        app, ["detect", "a small red circle in the center", "--model", "testbed", "--scores", "e", "--json"]
    )
    assert testbed.exit_code == 0, testbed.output
    announced = "settings: steps 25 (the testbed's evaluation setting), guidance 2 (the testbed's"
    assert announced in testbed.stderr
    tiny = CliRunner().invoke(
        app, ["detect", "a dog", "--model", str(model_dir), "--scores", "e", "--json", "--steps", "3"]
    )
    assert "settings: steps 3 (given), guidance 7.5 (the paper's setting)" in tiny.stderr


def _commands(group, path=()):
    for name, command in group.commands.items():
        yield (*path, name), command
        if hasattr(command, "commands"):  # a group (typer ships its own click: no isinstance)
            yield from _commands(command, (*path, name))


def test_help_fits_80_columns_with_every_option_name_whole():
    import typer

    root = typer.main.get_command(app)
    runner = CliRunner()
    checked, paths = 0, set()
    for path, command in _commands(root):
        paths.add(path)
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert result.exit_code == 0, (path, result.output)
        assert all(len(line) <= 80 for line in result.output.splitlines()), path
        assert "…" not in result.output, path
        for param in command.params:
            for name in (*param.opts, *param.secondary_opts):
                if name.startswith("-"):
                    assert name in result.output, (path, name)
                    checked += 1
    assert checked > 150 and ("bench", "mitigate") in paths  # every command, the groups' ones included


def test_version():
    from memattn import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"memattn {__version__}"


@pytest.mark.parametrize("measured", ["testbed", "every"])
def test_tables_at_80_columns_never_cut_a_header_or_a_number(measured):
    from rich.console import Console

    from memattn.cli.bench_mitigate import COLUMN_FORMATS, _table
    from memattn.cli.console import print_table

    keys = list(COLUMN_FORMATS)
    if measured == "testbed":  # what a testbed run measures (no SSCD, no CLIP)
        keys = [k for k in keys if not k.startswith(("sscd", "clip"))]
    rows = [
        {"setting": setting, "model": "testbed", "mode": "testbed", "pareto": i == 0}
        | {k: 0.123456 for k in keys}
        for i, setting in enumerate(["none", "ren2024 C=1.25", "gni λ=0.5"])
    ]
    console = Console(width=80, record=True)
    print_table(console, _table(rows))
    text = console.export_text()
    assert "…" not in text and "0.12" in text and console.width == 80
    for key in keys:
        for word in COLUMN_FORMATS[key][0].replace("\\[", "[").split():
            assert word in text, word
    for row in rows:
        assert row["setting"] in text
    assert "Pareto" in text
