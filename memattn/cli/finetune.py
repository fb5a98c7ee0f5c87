"""``memattn finetune``: the typer command over :func:`memattn.training.finetune`.

Registered on any typer app by :func:`register` (the main CLI calls it once). Option names follow
diffusers' ``train_text_to_image.py`` (dashes for underscores). Heavy imports happen inside the command,
so ``--help`` stays fast. Runs under ``accelerate launch -m memattn.cli.finetune finetune ...`` too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memattn.errors import run_cli
from memattn.quiet import quiet_loading


def register(app: typer.Typer) -> None:
    """Add the ``finetune`` command to ``app``."""
    app.command("finetune")(finetune)


def finetune(
    output_dir: Annotated[
        Path, typer.Option(help="Run directory: checkpoints/, log.jsonl and the exported pipeline/.")
    ],
    model: Annotated[
        str, typer.Option("--model", "-m", help="Base pipeline directory or hub id ('testbed': bundled).")
    ] = "testbed",
    data: Annotated[
        str,
        typer.Option(
            help="'testbed' (the dataset in the base's testbed manifest) or a directory of images with "
            'captions.jsonl ({"file_name", "text"} per line).'
        ),
    ] = "testbed",
    mitigation: Annotated[
        str,
        typer.Option(
            help="none, entropy, noise-norm, caption-aug, or random-drop (the control: drops "
            "--drop-prob of the samples blind; docs/training.md)."
        ),
    ] = "none",
    rule: Annotated[
        str | None,
        typer.Option(
            help="Threshold rule: fixed or zscore (default: zscore for entropy, fixed for noise-norm)."
        ),
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Fixed rule's threshold (noise-norm default: Wen's 2.0).")
    ] = None,
    z: Annotated[float, typer.Option(help="z-score rule: drop when the robust z-score passes ±z.")] = 2.0,
    drop: Annotated[
        str, typer.Option(help="Which tail is dropped: high or low (measure it: docs/training.md).")
    ] = "high",
    window: Annotated[
        int,
        typer.Option(
            min=0, help="z-score statistics: 0 = per batch, N = running window of N scores per bin."
        ),
    ] = 0,
    timestep_bins: Annotated[
        int, typer.Option(min=1, help="z-score statistics kept separately per this many timestep bins.")
    ] = 1,
    min_samples: Annotated[
        int, typer.Option(min=1, help="z-score: fewer reference scores than this keep all.")
    ] = 8,
    layers: Annotated[
        str | None,
        typer.Option(help="Entropy: comma-separated cross-attention layers (indices or names); default all."),
    ] = None,
    caption_aug_prob: Annotated[
        float, typer.Option(help="caption-aug: probability a caption gets random tokens (Somepalli: 0.1).")
    ] = 0.1,
    caption_aug_tokens: Annotated[int, typer.Option(min=1, help="caption-aug: random tokens inserted.")] = 2,
    drop_prob: Annotated[
        float, typer.Option(help="random-drop: probability each captioned sample is dropped.")
    ] = 0.0,
    monitor: Annotated[
        bool,
        typer.Option(help="Log entropy and noise norm of every sample (extra cost; drops nothing more)."),
    ] = False,
    max_train_steps: Annotated[int, typer.Option(min=1, help="Optimizer steps in all.")] = 1000,
    train_batch_size: Annotated[int, typer.Option(min=1, help="Samples per micro-batch per process.")] = 16,
    gradient_accumulation_steps: Annotated[
        int, typer.Option(min=1, help="Micro-batches per optimizer step.")
    ] = 1,
    learning_rate: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-4,
    lr_scheduler: Annotated[
        str, typer.Option(help="diffusers schedule: constant, constant_with_warmup, linear, cosine, ...")
    ] = "constant",
    lr_warmup_steps: Annotated[int, typer.Option(min=0, help="Warm-up steps of the LR schedule.")] = 0,
    adam_weight_decay: Annotated[float, typer.Option(min=0.0, help="AdamW weight decay.")] = 1e-2,
    max_grad_norm: Annotated[
        float, typer.Option(min=0.0, help="Gradient clipping norm; 0 turns clipping off.")
    ] = 1.0,
    caption_dropout: Annotated[
        float, typer.Option(help="Share of captions replaced by the empty prompt (trains the CFG branch).")
    ] = 0.0,
    resolution: Annotated[
        int | None,
        typer.Option(help="Image side for --data DIR (default: the UNet's sample size x VAE factor)."),
    ] = None,
    random_flip: Annotated[bool, typer.Option(help="Flip images horizontally at random (seeded).")] = False,
    mixed_precision: Annotated[str, typer.Option(help="no, fp16 or bf16 (accelerate).")] = "no",
    use_ema: Annotated[bool, typer.Option(help="Keep an EMA of the UNet and export it.")] = False,
    ema_decay: Annotated[float, typer.Option(help="EMA decay (warm-up: min(decay, (1+s)/(10+s))).")] = 0.9999,
    checkpointing_steps: Annotated[
        int, typer.Option(min=1, help="Write a checkpoint every N steps (and at the end).")
    ] = 500,
    checkpoints_total_limit: Annotated[
        int | None, typer.Option(min=1, help="Keep only the newest N checkpoints.")
    ] = None,
    resume_from_checkpoint: Annotated[
        str | None, typer.Option(help="'latest' (new run if there is none) or a checkpoints/step-N path.")
    ] = None,
    seed: Annotated[
        int, typer.Option(min=0, help="Seeds the batches, noise, timesteps and augmentation.")
    ] = 0,
    progress: Annotated[bool, typer.Option(help="Show the progress bar (loss, drop rate).")] = True,
) -> None:
    """Fine-tune a pipeline's UNet (text encoder frozen) with a training-time memorization mitigation."""
    from memattn.cli.console import stderr
    from memattn.paths import writable_directory
    from memattn.training import FinetuneConfig, MitigationConfig
    from memattn.training import finetune as run

    writable_directory(output_dir, "--output-dir")  # before the base pipeline loads
    quiet_loading()
    config = FinetuneConfig(
        output_dir=str(output_dir),
        model=model,
        data=data,
        max_train_steps=max_train_steps,
        train_batch_size=train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        learning_rate=learning_rate,
        lr_scheduler=lr_scheduler,
        lr_warmup_steps=lr_warmup_steps,
        adam_weight_decay=adam_weight_decay,
        max_grad_norm=max_grad_norm or None,
        caption_dropout=caption_dropout,
        resolution=resolution,
        random_flip=random_flip,
        mixed_precision=mixed_precision,
        use_ema=use_ema,
        ema_decay=ema_decay,
        checkpointing_steps=checkpointing_steps,
        checkpoints_total_limit=checkpoints_total_limit,
        resume_from_checkpoint=resume_from_checkpoint,
        seed=seed,
        mitigation=MitigationConfig(
            kind=mitigation,
            rule=rule,
            threshold=threshold,
            z=z,
            drop=drop,
            window=window,
            timestep_bins=timestep_bins,
            min_samples=min_samples,
            layers=None if layers is None else tuple(x.strip() for x in layers.split(",") if x.strip()),
            caption_aug_prob=caption_aug_prob,
            caption_aug_tokens=caption_aug_tokens,
            drop_prob=drop_prob,
            monitor=monitor,
        ),
        progress=progress,
    )
    target = run(config)
    stderr.print(f"fine-tuned pipeline written to {target}; per-step log: {output_dir / 'log.jsonl'}")


def cli_args(config) -> list[str]:  # noqa: ANN001 (a FinetuneConfig; kept import-free)
    """The ``memattn finetune`` arguments that reproduce ``config`` (the benchmark records them)."""
    m = config.mitigation
    args = [
        "--output-dir",
        config.output_dir,
        "--model",
        config.model,
        "--data",
        config.data,
        "--mitigation",
        m.kind,
        "--max-train-steps",
        str(config.max_train_steps),
        "--train-batch-size",
        str(config.train_batch_size),
        "--gradient-accumulation-steps",
        str(config.gradient_accumulation_steps),
        "--learning-rate",
        repr(config.learning_rate),
        "--lr-scheduler",
        config.lr_scheduler,
        "--lr-warmup-steps",
        str(config.lr_warmup_steps),
        "--adam-weight-decay",
        repr(config.adam_weight_decay),
        "--max-grad-norm",
        repr(config.max_grad_norm or 0.0),
        "--caption-dropout",
        repr(config.caption_dropout),
        "--mixed-precision",
        config.mixed_precision,
        "--checkpointing-steps",
        str(config.checkpointing_steps),
        "--seed",
        str(config.seed),
    ]
    if config.use_ema:
        args += ["--use-ema", "--ema-decay", repr(config.ema_decay)]
    if config.resolution is not None:
        args += ["--resolution", str(config.resolution)]
    if config.random_flip:
        args += ["--random-flip"]
    if m.kind in ("entropy", "noise-norm"):
        args += ["--rule", m.rule, "--drop", m.drop]
        if m.threshold is not None:
            args += ["--threshold", repr(m.threshold)]
        if m.rule == "zscore":
            args += [
                "--z",
                repr(m.z),
                "--window",
                str(m.window),
                "--timestep-bins",
                str(m.timestep_bins),
                "--min-samples",
                str(m.min_samples),
            ]
    if m.layers is not None:
        args += ["--layers", ",".join(str(x) for x in m.layers)]
    if m.kind == "caption-aug":
        args += [
            "--caption-aug-prob",
            repr(m.caption_aug_prob),
            "--caption-aug-tokens",
            str(m.caption_aug_tokens),
        ]
    if m.kind == "random-drop":
        args += ["--drop-prob", repr(m.drop_prob)]
    if m.monitor:
        args += ["--monitor"]
    return args


def main() -> None:
    """``python -m memattn.cli.finetune finetune ...`` (and ``accelerate launch -m ...``)."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None)

    @app.callback()
    def _root() -> None:
        """memattn fine-tuning."""

    register(app)
    run_cli(app)


if __name__ == "__main__":
    main()
