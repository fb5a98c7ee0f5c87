"""`memattn calibrate`, `memattn generate --guard` and `memattn testbed prompts` on the bundled testbed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S

RUN = [sys.executable, "-m", "memattn"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*RUN, *args], capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=cwd)


@pytest.mark.slow
def test_calibrate_then_generate_with_the_guard(tmp_path):
    prompts = run("testbed", "prompts", "never_seen")
    assert prompts.returncode == 0, prompts.stderr
    clean = prompts.stdout.splitlines()
    assert len(clean) == 200
    (tmp_path / "clean.txt").write_text("\n".join(clean[:40]))
    calibration = tmp_path / "guard.json"
    calibrate = run(
        "calibrate",
        "--model",
        "testbed",
        "--clean",
        str(tmp_path / "clean.txt"),
        "--fpr",
        "0.05",
        "--steps",
        "10",
        "--guidance",
        "2",
        "--out",
        str(calibration),
    )
    assert calibrate.returncode == 0, calibrate.stderr
    stored = json.loads(calibration.read_text())
    assert stored["score"] == "e" and stored["n_clean"] == 40 and "flags 2 of 40" in calibrate.stdout
    assert stored["steps"] == 10 and stored["guidance_scale"] == 2 and stored["empirical_fpr"] == 0.05
    assert stored["scheduler"] == "DDIMScheduler" and stored["resolution"] == [16, 16]
    other_steps = run(
        "generate", clean[0], "--model", "testbed", "--guard", "--calibration", str(calibration),
        "--steps", "4", "--guidance", "2", "--out", str(tmp_path / "refused"),
    )  # fmt: skip
    assert other_steps.returncode == 2
    assert "measured at steps 10, this run uses 4: run with --steps 10" in other_steps.stderr
    out = tmp_path / "images"
    memorized = run("testbed", "prompts", "memorized_matching", "--duplication", "128").stdout.splitlines()[
        :2
    ]
    generate = run(
        "generate",
        *memorized,
        clean[0],
        "--model",
        "testbed",
        "--guard",
        "--threshold",
        str(stored["threshold"]),
        "--steps",
        "10",
        "--guidance",
        "2",
        "--out",
        str(out),
    )
    assert generate.returncode == 0, generate.stderr
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert [v["prompt"] for v in verdicts] == [*memorized, clean[0]]
    assert all(
        {"score", "threshold", "flagged", "mitigated", "trigger_tokens", "image"} <= set(v) for v in verdicts
    )
    assert all((out / v["image"]).read_bytes()[:4] == b"\x89PNG" for v in verdicts)


def test_calibrate_refuses_too_few_prompts_and_never_writes_into_the_package(tmp_path):
    (tmp_path / "one.txt").write_text("a red circle in the center\n")
    few = run("calibrate", "--model", "testbed", "--clean", str(tmp_path / "one.txt"), "--fpr", "0.01")
    assert few.returncode == 2
    assert "--fpr 0.01 needs at least 100 clean prompts" in few.stderr and "has 1" in few.stderr
    (tmp_path / "many.txt").write_text("a red circle in the center\n" * 100)
    bundled = run("calibrate", "--model", "testbed", "--clean", str(tmp_path / "many.txt"))
    assert bundled.returncode == 2 and "bundled inside the memattn package" in bundled.stderr


def test_cli_errors_are_one_line(tmp_path):
    missing = run("calibrate", "--model", "testbed", "--clean", str(tmp_path / "nope.txt"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    no_threshold = run("generate", "a red circle", "-m", "testbed", "--guard", "--steps", "2", cwd=tmp_path)
    assert no_threshold.returncode == 2 and "memattn calibrate" in no_threshold.stderr
    assert not (tmp_path / "generated").exists()  # a refused run leaves no empty --out behind
    unknown = run("testbed", "prompts", "nope")
    assert unknown.returncode == 2 and "unknown group 'nope'" in unknown.stderr
    none = run("testbed", "prompts", "memorized_matching", "--duplication", "7")
    assert none.returncode == 2 and "has no item seen 7 times; its duplication counts: 128" in none.stderr


def test_generate_with_a_method(tmp_path):
    prompt = "a small red circle in the center on a gray background"
    done = run(
        "generate",
        prompt,
        "--model",
        "testbed",
        "--method",
        "rna",
        "--strength",
        "2",
        "--steps",
        "2",
        "--guidance",
        "2",
        "--out",
        str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    verdict = json.loads((tmp_path / "verdicts.json").read_text())[0]
    assert verdict["method"] == "rna" and sum(w.isdigit() for w in verdict["generated_prompt"].split()) == 2
    both = run("generate", prompt, "--model", "testbed", "--guard", "--method", "gni", "--steps", "2")
    assert both.returncode == 2 and "do not combine it with --method" in both.stderr
