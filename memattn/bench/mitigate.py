"""Every mitigation method on one model: copy similarity vs prompt alignment, wall time, one Pareto figure.

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

import csv
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from memattn import defaults
from memattn.bench.guarded import GuardSetting, guard_rows
from memattn.bench.image_measures import SSCD, ClipScore, reference_images
from memattn.bench.pareto import mark_pareto, pareto_figure
from memattn.errors import MemattnError
from memattn.mitigation import registry as methods

# The groups mitigation_measures reads (the same as benchmarks/mitigation_sweep.py generates).
TESTBED_GROUPS = ("memorized_matching", "memorized_template", "never_seen", "novel_composition")
TESTBED_DEFAULTS = {**defaults.TESTBED, "per_group": 48}
IMAGE_DEFAULTS = defaults.PAPER

NO_STRENGTH = tuple(name for name, value in methods.DEFAULT_STRENGTH.items() if value is None)

TESTBED_COLUMNS = (
    "copy_rate_128",
    "similarity_128",
    "copy_rate_template",
    "alignment_clean",
    "all_attributes_clean",
)
IMAGE_COLUMNS = ("sscd_gen", "sscd_train", "clip_score_clean", "clip_score_memorized")


@dataclass(frozen=True)
class Setting:
    """One row of the benchmark: a registered method (``memattn.mitigation.registry``) at one strength
    (None: its default)."""

    method: str
    strength: float | None = None

    @property
    def label(self) -> str:
        value = self.strength if self.strength is not None else methods.DEFAULT_STRENGTH[self.method]
        return self.method if value is None else f"{self.method} {value:g}"


# ---------------------------------------------------------------------------------------------- inputs


def parse_methods(text: str | Sequence[str] | None) -> list[str]:
    """Comma-separated (or listed) method names; ``None`` or ``all``: every method of the registry."""
    if text is None:
        return list(methods.METHODS)
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if names == ["all"]:
        return list(methods.METHODS)
    if not names:
        raise MemattnError(f"--methods is empty; choose from {', '.join(methods.METHODS)}")
    unknown = [n for n in names if n not in methods.METHODS]
    if unknown:
        raise MemattnError(
            f"unknown mitigation method {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(methods.METHODS)}"
        )
    return list(dict.fromkeys(names))


def _number(method: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MemattnError(f"strength {value!r} for {method} is not a number") from None
    if not math.isfinite(number) or isinstance(value, bool):
        raise MemattnError(f"strength {value!r} for {method} is not a finite number")
    return number


def parse_strengths(values: Sequence[str] | None) -> dict[str, list[float]]:
    """``METHOD=V[,V...]`` items, or JSON objects ``{"rta": [1, 4], "gni": 0.5}``, merged in order."""
    out: dict[str, list[float]] = {}
    for text in values or ():
        text = text.strip()
        if text.startswith("{"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as error:
                raise MemattnError(f"--strengths {text!r} is not valid JSON ({error.msg})") from None
            if not isinstance(parsed, dict):
                raise MemattnError("--strengths JSON must be an object: method -> number or list of numbers")
            items = [(k, v if isinstance(v, list) else [v]) for k, v in parsed.items()]
        else:
            method, sep, rest = text.partition("=")
            if not sep or not rest.strip():
                raise MemattnError(f"--strengths {text!r}: write METHOD=VALUE[,VALUE...], e.g. rta=1,4,10")
            items = [(method.strip(), [v for v in rest.split(",") if v.strip()])]
        for method, raw in items:
            if method not in methods.METHODS:
                raise MemattnError(
                    f"--strengths names unknown method {method!r}; choose from {', '.join(methods.METHODS)}"
                )
            if method in NO_STRENGTH:
                raise MemattnError(f"{method} has no strength to sweep (remove it from --strengths)")
            if not raw:
                raise MemattnError(f"--strengths gives no value for {method}")
            out.setdefault(method, []).extend(_number(method, v) for v in raw)
    return {k: list(dict.fromkeys(v)) for k, v in out.items()}


def settings_for(
    method_names: Sequence[str] | None = None, strengths: dict[str, list[float]] | None = None
) -> list[Setting]:
    """``none`` first, then each method at its default or at each requested strength."""
    names = parse_methods(method_names) if method_names is not None else list(methods.METHODS)
    strengths = strengths or {}
    extra = [m for m in strengths if m not in names]
    if extra:
        raise MemattnError(f"--strengths names {', '.join(extra)}, which --methods does not include")
    out = [Setting("none")]
    for name in names:
        if name == "none":
            continue
        out += [Setting(name, v) for v in strengths[name]] if name in strengths else [Setting(name)]
    return out


def check_settings(pipe: Any, settings: Sequence[Setting], *, steps: int, guidance: float) -> None:
    """Fail before the first (slow) generation: build and enter each method's context once, run nothing."""
    for setting in settings:
        if setting.method in ("stp", "opposite-guidance", "wen") and guidance <= 1:
            raise MemattnError(
                f"{setting.method} acts on classifier-free guidance: use --guidance > 1 or drop it"
            )
        prepared = methods.prepare(pipe, setting.method, ["a photo"], setting.strength, steps=steps)
        with prepared.context:
            pass


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


# ---------------------------------------------------------------------------------- figure and files


def figure_axes(rows: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """(copy similarity, alignment) columns: lower x = less copying, higher y = more faithful."""
    if rows and rows[0].get("mode") == "testbed":
        return "similarity_128", "alignment_clean"
    measured = any(math.isfinite(row.get("sscd_train", float("nan"))) for row in rows)
    return ("sscd_train" if measured else "sscd_gen"), "clip_score_clean"


def bench_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What the table cannot say by itself: unmeasured columns and measure caveats."""
    notes = []
    if not rows:
        return notes
    if rows[0].get("mode") == "testbed":
        if any(not math.isfinite(row["copy_rate_128"]) for row in rows):
            notes.append("no 128-copy item among the sampled prompts: raise --per-group (48 samples all)")
        if any(row["method"] == "guard" for row in rows):
            notes.append(
                "guard rows: threshold at the stated FPR on 300 seen-once captions (never generated here); "
                "flagged_128 / flagged_clean: share of those generations the guard edited"
            )
        if any(row["method"] == "wen" for row in rows):
            notes.append(
                "wen's default target loss (3) is SD1's scale; testbed noise norms are ~15 (try 15,10,5)"
            )
        return notes
    if all(not math.isfinite(row["sscd_gen"]) for row in rows):
        notes.append("copy similarity not measured: pass --sscd FILE (an SSCD TorchScript model)")
    else:
        notes.append(
            "sscd_gen: SSCD cosine to the unmitigated generation of the same prompt and seed (none = 1)"
        )
    if all(not math.isfinite(row["clip_score_clean"]) for row in rows):
        notes.append("alignment not measured: pass --clip DIR (a local CLIP model) and --clean FILE")
    return notes


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_outputs(
    rows: Sequence[dict[str, Any]], out: str | Path, title: str | None = None
) -> dict[str, Path]:
    """``mitigation_bench.csv``, ``mitigation_bench.json`` (rows + notes) and ``pareto.png`` in ``out``."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MemattnError(f"cannot create --out {out} ({error.strerror})") from None
    columns = list(dict.fromkeys(key for row in rows for key in row))
    written = {"csv": out / "mitigation_bench.csv", "json": out / "mitigation_bench.json"}
    with written["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    x_key, y_key = figure_axes(rows)
    payload = {
        "rows": [{k: _json_value(v) for k, v in row.items()} for row in rows],
        "notes": bench_notes(rows),
        "pareto_axes": [x_key, y_key],
    }
    written["json"].write_text(json.dumps(payload, indent=1))
    if rows:
        run = rows[0]
        title = title or (
            f"mitigations on {run['model']} ({run['mode']} measures; guidance {run['guidance']:g}, "
            f"{run['steps']} steps, {run['seeds']} seed(s))"
        )
        figure = pareto_figure(rows, out / "pareto.png", x_key, y_key, title)
        if figure is not None:
            written["png"] = figure
    return written
