"""The ``memattn`` command line: thin typer commands over the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from memattn.errors import MemattnError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Find training-data memorization in text-to-image diffusion models through their cross-attention.",
)
err = Console(stderr=True)


@app.callback()
def _root() -> None:
    """memattn command line."""


@app.command()
def detect(
    prompts: Annotated[list[str], typer.Argument(help="Prompts to score.")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="Local diffusers pipeline directory or hub id.")
    ],
    scores: Annotated[
        str, typer.Option(help="Comma-separated scores: d (full generation), e (first step).")
    ] = "d,e",
    steps: Annotated[int, typer.Option(help="Denoising steps (the paper: 50).")] = 50,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 7.5,
    seed: Annotated[int, typer.Option(help="Base seed; prompt i uses seed + i.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Prompts per pipeline call.")] = 8,
    layer: Annotated[
        str | None, typer.Option(help="Layer for score E: forward index or diffusers name.")
    ] = None,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16.")] = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per prompt.")] = False,
) -> None:
    """Score prompts with the paper's detection scores D and E (higher = more memorized)."""
    from memattn.detect import detect as run_detect
    from memattn.loading import load_pipeline, parse_dtype

    _quiet_loading()
    pipe = load_pipeline(model, dtype=parse_dtype(dtype), device=device)
    chosen_layer: int | str | None = (
        int(layer) if layer is not None and layer.lstrip("-").isdigit() else layer
    )
    results = run_detect(
        pipe,
        prompts,
        which=[s.strip().lower() for s in scores.split(",") if s.strip()],
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
        batch_size=batch_size,
        layer=chosen_layer,
        progress=not as_json,
    )
    for result in results:
        if result.truncated:
            err.print(f"[yellow]warning:[/] prompt truncated to 77 tokens: {result.prompt[:60]!r}")
    if as_json:
        for result in results:
            sys.stdout.write(json.dumps({"model": model, **result.to_dict()}) + "\n")
        return
    table = Table(title=f"memattn detect — {model}")
    for column in ("#", "prompt", "D", "E", "tokens", "trigger tokens"):
        table.add_column(column, overflow="fold")
    for i, result in enumerate(results):
        table.add_row(
            str(i),
            result.prompt,
            "-" if result.score_d is None else f"{result.score_d:.4f}",
            "-" if result.score_e is None else f"{result.score_e:.4f}",
            f"{result.n_tokens}{'+' if result.truncated else ''}",
            ", ".join(f"{token} {share:.1%}" for token, share in result.triggers),
        )
    Console().print(table)


testbed_app = typer.Typer(no_args_is_help=True, help="The CPU-scale memorization testbed.")
app.add_typer(testbed_app, name="testbed")


@testbed_app.command("train")
def testbed_train(
    out: Annotated[Path, typer.Option(help="Run directory: checkpoints/ and the exported pipeline/.")],
    fast: Annotated[bool, typer.Option(help="The small recipe (a few minutes; used by CI).")] = False,
    steps: Annotated[int | None, typer.Option(help="Override the recipe's number of steps.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in --out.")] = True,
) -> None:
    """Train the testbed model (seeded, resumable); writes OUT/pipeline, loadable with from_pretrained."""
    from memattn.testbed.train import FAST, TrainConfig, train, with_steps

    config = with_steps(FAST if fast else TrainConfig(), steps)
    target = train(config, out, resume=resume)
    Console().print(f"testbed pipeline written to {target}")


@testbed_app.command("info")
def testbed_info(
    model: Annotated[Path, typer.Argument(help="A testbed pipeline directory.")],
) -> None:
    """Print a testbed pipeline's manifest: recipe, training time and ground-truth groups."""
    path = model / "memattn_testbed.json"
    if not path.is_file():
        raise MemattnError(f"{model} has no memattn_testbed.json: not a testbed pipeline directory")
    data = json.loads(path.read_text())
    table = Table(title=f"testbed {model}")
    for column in ("group", "prompts", "duplication counts", "example"):
        table.add_column(column, overflow="fold")
    for name, items in data["groups"].items():
        counts = sorted({item["duplication"] for item in items})
        table.add_row(
            name, str(len(items)), ", ".join(map(str, counts)), items[0]["caption"] if items else ""
        )
    console = Console()
    console.print(table)
    console.print(
        f"memattn {data['memattn_version']}, seed {data['seed']}, {data['training_seconds']} s of training "
        f"({data['config']['steps']} steps) on {data['machine']}\ncommand: {data['command']}"
    )


def _quiet_loading() -> None:
    """Loading bars of diffusers/transformers would bury the command's own output."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def main() -> None:
    """Entry point: library errors become one line on stderr and exit code 2."""
    try:
        app()
    except MemattnError as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
