"""The docs cannot drift: every Python block of README.md and docs/*.md runs, every `memattn` command line
in them parses against the real CLI, and every line cheap enough on 2 CPU cores runs and exits 0.

Placeholders are substituted, never the commands: ``DIR``, ``path/to/sd-v1-4`` and the SD path of the
Python blocks become a tiny Stable Diffusion pipeline of the real classes saved to disk; fp16/CUDA become
fp32/CPU; the prompt files the lines name are written with real prompts of the bundled benchmark set.
Lines that train or benchmark for minutes, need CUDA or weights that cannot be here (SSCD, CLIP), or
elide their arguments (``...``) are parsed only; :data:`PARSE_ONLY` says which and why.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from conftest import HANG_GUARD_S
from typer.testing import CliRunner

from memattn.cli import app
from memattn.testing import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROMPTS = ROOT / "data" / "prompts" / "nonmemorized_500.txt"

# (pattern in the command line, why it is parsed and not run here)
PARSE_ONLY = [
    (r"\.\.\.", "elides its arguments"),
    (r"^memattn bench detect\b", "a benchmark: minutes to hours (its runs are in benchmarks/RESULTS.md)"),
    (r"^memattn bench mitigate\b", "a benchmark: every method swept (benchmarks/RESULTS.md)"),
    (r"^memattn finetune\b", "trains for minutes (tests/test_finetune.py runs short recipes)"),
    (r"^memattn testbed (train|report)\b", "trains the testbed or runs its full report (minutes: make demo)"),
    (r"--device cuda|--sscd|--clip", "needs CUDA or weights that cannot be downloaded here"),
]
SYNOPSIS = re.compile(r"[\[\]|]|\b[A-Z]{2,}\b")  # [optional] a|b PLACEHOLDER: a usage line, not a command


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    text: str


def blocks() -> list[Block]:
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].startswith("```"):
                lang, start, body = lines[i][3:].strip(), i + 1, []
                i += 1
                while not lines[i].startswith("```"):
                    body.append(lines[i])
                    i += 1
                found.append(Block(path, start, lang, "\n".join(body)))
            i += 1
    return found


def command_lines(block: Block) -> list[list[str]]:
    """The memattn invocations of a shell block, continuation lines joined, comments dropped."""
    joined = block.text.replace("\\\n", " ")
    commands = []
    for raw in joined.splitlines():
        words = shlex.split(raw, comments=True)
        if "memattn.cli.finetune" in words:  # accelerate launch / torchrun -m memattn.cli.finetune
            words = ["memattn", *words[words.index("memattn.cli.finetune") + 1 :]]
        if words and words[0] == "memattn":
            commands.append(words)
    return commands


def parse_only_reason(words: list[str]) -> str | None:
    line = shlex.join(words)
    for pattern, why in PARSE_ONLY:
        if re.search(pattern, line):
            return why
    return None


def resolve(words: list[str]) -> tuple[typer.core.TyperCommand, list[str]]:
    """The click command a line names and its arguments."""
    command = typer.main.get_command(app)  # typer's own click (typer._click): duck-typed below
    args = words[1:]
    while hasattr(command, "commands") and args and args[0] in command.commands:
        command, args = command.commands[args[0]], args[1:]
    return command, args


def check_options(words: list[str]) -> None:
    """Every option a line names exists on its command (usage lines and elided lines included)."""
    command, args = resolve(words)
    known = {name for p in command.params for name in (*p.opts, *p.secondary_opts)}
    for word in args:
        option = word.split("=", 1)[0]
        if option.startswith("--"):
            assert option in known, f"{shlex.join(words)}: {command.name} has no {option}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory where the docs' placeholders exist: DIR (a tiny SD pipeline) and the prompt files."""
    work = tmp_path_factory.mktemp("docs")
    tiny_pipeline("sd1", seed=3).save_pretrained(work / "DIR", safe_serialization=True)
    clean = PROMPTS.read_text().splitlines()[:100]  # --fpr 0.01 needs at least 100 clean prompts
    for name in ("clean_prompts.txt", "clean.txt"):
        (work / name).write_text("\n".join(clean) + "\n")
    (work / "prompts.txt").write_text("\n".join(clean[:6]) + "\n")
    (work / "prompts.jsonl").write_text("".join(f'{{"prompt": "{p}"}}\n' for p in clean[:3]))
    return work


def substitute(words: list[str], work: Path) -> list[str]:
    tiny = str(work / "DIR")
    mapping = {"DIR": tiny, "path/to/sd-v1-4": tiny}
    return [mapping.get(word, word) for word in words]


def all_commands() -> list[tuple[str, list[str]]]:
    found = []
    for block in blocks():
        if block.lang in ("", "bash", "sh", "console"):
            for words in command_lines(block):
                found.append((f"{block.path.name}:{block.line}", words))
    return found


COMMANDS = all_commands()


def test_the_docs_have_commands_and_python_to_check():
    assert len(COMMANDS) >= 20
    assert sum(b.lang == "python" for b in blocks()) >= 4


@pytest.mark.parametrize(("where", "words"), COMMANDS, ids=[f"{w} {' '.join(c[1:3])}" for w, c in COMMANDS])
def test_every_command_line_names_real_options(where, words):
    check_options(words)
    if SYNOPSIS.search(shlex.join(words[1:])) or parse_only_reason(words):
        return
    command, args = resolve(words)
    command.make_context(command.name, list(args))  # types, ranges, required options: as the CLI parses


def runnable(words: list[str]) -> bool:
    line = shlex.join(words[1:]).replace("DIR", "d")  # DIR is substituted, not a usage placeholder
    return not parse_only_reason(words) and not SYNOPSIS.search(line)


RUNNABLE = [(w, c) for w, c in COMMANDS if runnable(c)]


@pytest.fixture(scope="module")
def readme_runs(workdir) -> list[tuple[str, list[str], object]]:
    """The runnable lines in the docs' order (README's calibrate writes what generate and the guard read)."""
    import os

    runner, results = CliRunner(), []
    before = os.getcwd()
    os.chdir(workdir)
    try:
        for where, words in RUNNABLE:
            results.append((where, words, runner.invoke(app, substitute(words, workdir)[1:])))
    finally:
        os.chdir(before)
    return results


def test_the_runnable_commands_run(readme_runs, workdir):
    assert len(readme_runs) >= 11
    for where, words, result in readme_runs:
        assert result.exit_code == 0, f"{where}: {shlex.join(words)}\n{result.output[-3000:]}"
    assert (workdir / "DIR" / "memattn_guard.json").is_file()  # the README's guard reads it next
    assert (workdir / "report.html").is_file() and (workdir / "images" / "verdicts.json").is_file()


PYTHON_PRELUDE = {
    # docs/training.md's loop, on a tiny UNet and one batch: the names the fragment leaves to the reader
    "training.md": """
import torch
from memattn.testing import tiny_pipeline
_pipe = tiny_pipeline("sd1", seed=0)
unet = _pipe.unet
with torch.no_grad():  # a frozen text encoder, as in the loops the filters are for
    text = _pipe.encode_prompt(["a dog", "a cat on a mat"], "cpu", 1, False)[0]
_size = unet.config.sample_size
noisy = torch.randn(2, unet.config.in_channels, _size, _size)
target = torch.randn_like(noisy)
t = torch.tensor([10, 700])
caption_dropped = torch.tensor([False, False])
loader = [0, 1]
""",
}


def python_source(path: Path, work: Path) -> str:
    code = "\n\n".join(b.text for b in blocks() if b.path == path and b.lang == "python")
    code = code.replace('"path/to/stable-diffusion-v1-4"', repr(str(work / "DIR")))
    code = code.replace("torch.float16", "torch.float32").replace('.to("cuda")', '.to("cpu")')
    return PYTHON_PRELUDE.get(path.name, "") + code


@pytest.mark.parametrize("name", ["README.md", "scan.md", "training.md"])
def test_the_python_blocks_run(name, workdir, readme_runs):
    """After the README's commands: the guard reads the calibration they wrote, scan.md the scan's
    results.parquet."""
    path = next(p for p in DOCS if p.name == name)
    source = python_source(path, workdir)
    assert source.strip()
    done = subprocess.run(
        [sys.executable, "-c", source], cwd=workdir, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert done.returncode == 0, f"{name}:\n{done.stderr[-3000:]}"


def test_every_python_block_is_run():
    ran = {"README.md", "scan.md", "training.md"}
    assert {b.path.name for b in blocks() if b.lang == "python"} == ran
