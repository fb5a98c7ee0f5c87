"""Every mitigation method on one model: copy similarity vs prompt alignment, wall time, one Pareto figure.

This module runs the rows; ``mitigate_settings`` parses and checks them, ``mitigate_outputs`` writes
the files.

Two ways to measure, chosen by what the user has:

- **testbed** (the bundled ``testbed`` or any pipeline directory with a ``memattn_testbed.json``, and
  neither ``--sscd`` nor ``--clip``): the testbed's own ground truth through
  ``memattn.testbed.evaluate``: copy rate and copy similarity (v1: detail, v2: whole image) of the
  128-copy items and templates,
  attribute alignment of clean prompts (never seen, novel compositions). Nothing to download.
- **images** (any pipeline, with the user's ``--memorized`` and ``--clean`` prompt files):
  copy similarity with an SSCD TorchScript file (``--sscd``) and alignment as the CLIP score of a local
  CLIP directory (``--clip``). Without ground-truth training images the copy measure is Kim & No's
  "[gen]" similarity: the SSCD cosine of each mitigated generation of a memorized prompt to the
  *unmitigated* generation with the same prompt and seed (1 for ``none``; lower = the mitigation moved
  the image further from what the model reproduces). With ``--reference-dir`` (the training images,
  named by prompt index) it also reports the similarity to them ("[train]").

``none`` always runs first: it is the reference for the time ratio and for the [gen] similarity. Every
setting uses the same prompts, seeds and schedule, in one process, so the rows compare like with like.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from memattn import defaults
from memattn.bench.guarded import GuardSetting, guard_rows
from memattn.bench.image_measures import SSCD, ClipScore, reference_images
from memattn.bench.mitigate_outputs import figure_axes
from memattn.bench.mitigate_settings import Setting, check_settings, parse_methods, settings_for
from memattn.bench.pareto import mark_pareto
from memattn.errors import MemattnError
from memattn.mitigation import registry as methods

# The groups mitigation_measures reads (the same as benchmarks/mitigation_sweep.py generates).
TESTBED_GROUPS = ("memorized_matching", "memorized_template", "never_seen", "novel_composition")
TESTBED_DEFAULTS = {**defaults.TESTBED, "per_group": 48}
IMAGE_DEFAULTS = defaults.PAPER

TESTBED_COLUMNS = (
    "copy_rate_128",
    "similarity_128",
    "copy_rate_template",
    "alignment_clean",
    "all_attributes_clean",
)
IMAGE_COLUMNS = ("sscd_gen", "sscd_train", "clip_score_clean", "clip_score_memorized")


# ------------------------------------------------------------------------------------------------- runs


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def _warm_up(pipe: Any, guidance: float) -> None:
    """One tiny untimed call, so that ``none`` (timed first) does not pay the process's lazy start-up."""
    pipe(
        ["warm up"],
        num_inference_steps=2,
        guidance_scale=guidance,
        output_type="np",
        generator=[torch.Generator().manual_seed(0)],
    )


def _generate(
    pipe: Any,
    setting: Setting,
    prompts: Sequence[str],
    *,
    seeds: int,
    steps: int,
    guidance: float,
    batch_size: int,
) -> list[Any]:
    """Prompt i with seed index s uses ``torch.Generator().manual_seed(1000·s + i)`` under every method."""
    jobs = [(i, prompt, s) for s in range(seeds) for i, prompt in enumerate(prompts)]
    images: list[Any] = []
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        prepared = methods.prepare(
            pipe, setting.method, [p for _, p, _ in batch], setting.strength, seed=start, steps=steps
        )
        generators = [torch.Generator().manual_seed(1000 * s + i) for i, _, s in batch]
        with prepared.context:
            images += pipe(
                prepared.prompts,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generators,
                output_type="pil",
            ).images
    return images


def _testbed_rows(
    path: Path,
    pipe: Any,
    settings: Sequence[Setting],
    *,
    seeds: int,
    steps: int,
    guidance: float,
    per_group: int,
    progress: bool,
) -> list[dict[str, Any]]:
    from memattn.testbed.evaluate import evaluate, mitigation_measures
    from memattn.testbed.manifest import dataset_for

    present = dataset_for(path).prompt_groups()  # v2 has no templates and no novel compositions
    groups = tuple(group for group in TESTBED_GROUPS if group in present)
    rows = []
    for setting in tqdm(settings, desc="mitigation bench", unit="setting", disable=not progress):
        started = time.perf_counter()
        evaluation = evaluate(
            path,
            guidance_scale=guidance,
            steps=steps,
            per_group=per_group,
            seeds=seeds,
            groups=groups,
            pipe=pipe,
            baseline={"method": setting.method, "strength": setting.strength},
            progress=False,
        )
        seconds = time.perf_counter() - started
        rows.append(
            {
                "setting": setting.label,
                "method": setting.method,
                "strength": _strength(setting),
                "images": len(evaluation.rows),
                "seconds": seconds,
                **mitigation_measures(evaluation.rows, evaluation.settings["copy_threshold"]),
            }
        )
    return rows


def _image_rows(
    pipe: Any,
    settings: Sequence[Setting],
    *,
    memorized: list[str],
    clean: list[str],
    sscd: SSCD | None,
    clip: ClipScore | None,
    references: torch.Tensor | None,
    seeds: int,
    steps: int,
    guidance: float,
    batch_size: int,
    progress: bool,
) -> list[dict[str, Any]]:
    kwargs = dict(seeds=seeds, steps=steps, guidance=guidance, batch_size=batch_size)
    reference_gen: torch.Tensor | None = None
    memorized_prompts = [p for _ in range(seeds) for p in memorized]
    clean_prompts = [p for _ in range(seeds) for p in clean]
    rows = []
    for setting in tqdm(settings, desc="mitigation bench", unit="setting", disable=not progress):
        started = time.perf_counter()
        memorized_images = _generate(pipe, setting, memorized, **kwargs)
        clean_images = _generate(pipe, setting, clean, **kwargs) if clip is not None else []
        seconds = time.perf_counter() - started  # generation only: the measures cost the same for all
        row: dict[str, Any] = {
            "setting": setting.label,
            "method": setting.method,
            "strength": _strength(setting),
            "images": len(memorized_images) + len(clean_images),
            "seconds": seconds,
            **{column: float("nan") for column in IMAGE_COLUMNS},
        }
        if sscd is not None:
            embeddings = sscd.embed(memorized_images)
            if setting.method == "none":
                reference_gen = embeddings
            assert reference_gen is not None  # settings_for puts none first
            row["sscd_gen"] = _mean((embeddings * reference_gen).sum(1).tolist())
            if references is not None:
                row["sscd_train"] = _mean((embeddings * references.repeat(seeds, 1)).sum(1).tolist())
        if clip is not None:
            row["clip_score_clean"] = _mean(clip(clean_images, clean_prompts))
            row["clip_score_memorized"] = _mean(clip(memorized_images, memorized_prompts))
        rows.append(row)
    return rows


def _strength(setting: Setting) -> float | None:
    value = setting.strength if setting.strength is not None else methods.DEFAULT_STRENGTH[setting.method]
    return None if value is None else float(value)


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise MemattnError(f"--{name} must be at least 1, got {value}")
    return value


def run_mitigation_bench(
    model: str | Path = "testbed",
    *,
    method_names: Sequence[str] | str | None = None,
    strengths: dict[str, list[float]] | None = None,
    memorized: str | Path | None = None,
    clean: str | Path | None = None,
    sscd: str | Path | None = None,
    clip: str | Path | None = None,
    reference_dir: str | Path | None = None,
    seeds: int = 1,
    steps: int | None = None,
    guidance: float | None = None,
    per_group: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    pipe: Any = None,
    guards: Sequence[GuardSetting] = (),
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per setting (``none`` first): the measures, wall seconds and the time ratio to ``none``.

    ``guards``: the guard as extra rows (testbed only: it is calibrated on the testbed's held-out clean
    prompts, :mod:`memattn.bench.guarded`), with the share of memorized and clean generations flagged.

    Testbed model without ``sscd``/``clip``: the testbed's measures (``per_group`` prompts per group,
    ``mitigation_measures`` columns); ``seconds`` is the whole evaluation, generation and measures, as in
    ``benchmarks/mitigation_sweep.py``. Otherwise: generations of the ``memorized`` and ``clean`` prompt
    files; ``sscd_gen`` / ``sscd_train`` (mean SSCD cosine of memorized prompts' generations to the
    unmitigated generation of the same seed / to ``reference_dir``), ``clip_score_clean`` /
    ``clip_score_memorized`` (mean CLIP score); a measure without its model is NaN; ``seconds`` is
    generation only. Every row also has ``pareto`` (on the front of ``figure_axes``) and the run's
    settings. ``pipe`` reuses an already loaded pipeline of ``model``.
    """
    from memattn.loading import load_pipeline, resolve_model
    from memattn.prompts import read_prompts

    settings = settings_for(parse_methods(method_names), strengths)
    _positive("seeds", seeds)
    _positive("batch-size", batch_size)
    testbed = sscd is None and clip is None and defaults.is_testbed(model)
    if testbed:
        if memorized is not None or clean is not None or reference_dir is not None:
            raise MemattnError(
                "--memorized/--clean/--reference-dir are measured with --sscd/--clip; without them the "
                "testbed is measured on its own ground-truth groups"
            )
        steps = TESTBED_DEFAULTS["steps"] if steps is None else steps
        guidance = TESTBED_DEFAULTS["guidance"] if guidance is None else guidance
        per_group = _positive("per-group", TESTBED_DEFAULTS["per_group"] if per_group is None else per_group)
        if steps < 2:
            raise MemattnError("--steps must be at least 2 on the testbed (its detection score D needs two)")
    elif guards:
        raise MemattnError(
            "--guard rows run on a testbed model (calibrated on its ground-truth clean prompts); on another "
            "model calibrate with `memattn calibrate` and generate with `memattn generate --guard`"
        )
    else:
        if sscd is None and clip is None:
            raise MemattnError(
                f"{model} is not a testbed pipeline: pass --sscd FILE (an SSCD TorchScript model, for copy "
                "similarity) and/or --clip DIR (a local CLIP model, for prompt alignment), with "
                "--memorized FILE and --clean FILE"
            )
        if memorized is None:
            raise MemattnError(
                "pass --memorized FILE: the prompts suspected of copying (on a testbed, "
                "`memattn testbed prompts memorized_matching --duplication 128` prints them)"
            )
        if clip is not None and clean is None:
            raise MemattnError(
                "--clip scores the alignment of ordinary prompts: pass --clean FILE (on a testbed, "
                "`memattn testbed prompts never_seen` prints them)"
            )
        if reference_dir is not None and sscd is None:
            raise MemattnError("--reference-dir is compared through SSCD: pass --sscd FILE as well")
        steps = _positive("steps", IMAGE_DEFAULTS["steps"] if steps is None else steps)
        guidance = IMAGE_DEFAULTS["guidance"] if guidance is None else guidance
    if not math.isfinite(guidance) or guidance < 1:
        raise MemattnError(
            f"--guidance {guidance}: must be at least 1 (1 turns classifier-free guidance off)"
        )

    # Cheap inputs first (files, models of the measures), then the pipeline, then the settings on it.
    if testbed:
        path = Path(resolve_model(str(model)))
        if pipe is None:
            pipe = load_pipeline(str(path), dtype=dtype, device=device, progress_bar=False)
        check_settings(pipe, settings, steps=steps, guidance=guidance)
        _warm_up(pipe, guidance)
        rows = _testbed_rows(
            path,
            pipe,
            settings,
            seeds=seeds,
            steps=steps,
            guidance=guidance,
            per_group=per_group,
            progress=progress,
        )
        if guards:
            from memattn.testbed.manifest import dataset_for

            present = dataset_for(path).prompt_groups()
            rows += guard_rows(
                path,
                pipe,
                list(guards),
                groups=tuple(group for group in TESTBED_GROUPS if group in present),
                seeds=seeds,
                steps=steps,
                guidance=guidance,
                per_group=per_group,
            )
    else:
        memorized_prompts = read_prompts(memorized)  # type: ignore[arg-type]
        clean_prompts = read_prompts(clean) if clip is not None else []  # type: ignore[arg-type]
        descriptor = SSCD(sscd, device, batch_size) if sscd is not None else None
        scorer = ClipScore(clip, device, batch_size) if clip is not None else None
        references = None
        if reference_dir is not None:
            assert descriptor is not None
            references = descriptor.embed(reference_images(reference_dir, len(memorized_prompts)))
        if pipe is None:
            pipe = load_pipeline(str(model), dtype=dtype, device=device, progress_bar=False)
        check_settings(pipe, settings, steps=steps, guidance=guidance)
        _warm_up(pipe, guidance)
        rows = _image_rows(
            pipe,
            settings,
            memorized=memorized_prompts,
            clean=clean_prompts,
            sscd=descriptor,
            clip=scorer,
            references=references,
            seeds=seeds,
            steps=steps,
            guidance=guidance,
            batch_size=batch_size,
            progress=progress,
        )
    base = rows[0]["seconds"]
    run = {
        "model": str(model),
        "mode": "testbed" if testbed else "images",
        "steps": steps,
        "guidance": guidance,
        "seeds": seeds,
    }
    if testbed:
        run["per_group"] = per_group
    for row in rows:
        row["time_ratio"] = row["seconds"] / base if base > 0 else float("nan")
        row.update(run)
    x_key, y_key = figure_axes(rows)
    mark_pareto(rows, x_key, y_key)
    return rows
