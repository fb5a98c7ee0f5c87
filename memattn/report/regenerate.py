"""Generate selected prompts again under the probe: full attention maps and entropy curves."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memattn.errors import MemattnError
from memattn.report.constants import MAP_STEPS, NO_MODEL
from memattn.report.figures import overlay_figure
from memattn.report.results import Results, value_counts
from memattn.report.text import token_label, token_text

# ---- regeneration: attention maps and entropy curves ------------------------------------------------


@dataclass
class Regenerated:
    """One prompt generated again under a trace: its image, token overlays and entropy curves."""

    row: dict[str, Any]
    group: str  # "flagged"/"clean", or "highest-scoring"/"others" when nothing is flagged
    figure: str = ""
    tokens: list[dict[str, Any]] = field(default_factory=list)
    entropy: np.ndarray = field(default_factory=lambda: np.empty(0))
    summary_entropy: np.ndarray = field(default_factory=lambda: np.empty(0))
    error: str | None = None


def map_steps_for(steps: int, count: int = MAP_STEPS) -> list[int]:
    """``count`` denoising steps spread evenly over the schedule, first and last included."""
    return sorted({int(round(x)) for x in np.linspace(0, steps - 1, min(count, steps))})


def token_heat(record: Any, positions: Sequence[int], size: tuple[int, int], image: int = 0) -> np.ndarray:
    """``[len(positions), H, W]``: each token's attention map, heads averaged, upsampled (bilinear) to
    ``size`` and averaged over every recorded (step, layer) map: DAAM's aggregation."""
    import torch
    import torch.nn.functional as F

    total = torch.zeros(len(positions), *size)
    count = 0
    for (_, layer), maps in record.maps.items():
        h, w = record.map_sizes.get(layer, (0, 0))
        if h * w != maps.shape[2] or w == 1:
            continue  # query grid of unknown shape: cannot be laid over the image
        chosen = maps[image][:, :, list(positions)].mean(dim=0)  # [query, token]
        grid = chosen.T.reshape(1, len(positions), h, w).float()
        total += F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0]
        count += 1
    if not count:
        raise MemattnError("no attention map with a known spatial shape was recorded")
    return (total / count).numpy()


def regenerate(
    pipe: Any,
    selected: list[tuple[dict[str, Any], str]],
    *,
    steps: int,
    guidance_scale: float,
    triggers_k: int = 3,
    progress: bool = True,
) -> list[Regenerated]:
    """Generate each selected row again (its seed, one prompt per call) under a trace with attention maps."""
    import torch
    from tqdm.auto import tqdm

    from memattn.attention.trace import trace
    from memattn.detection import scores

    out = []
    map_steps = map_steps_for(steps)
    for row, group in tqdm(selected, desc="report: regenerate", unit=" prompt", disable=not progress):
        item = Regenerated(row=row, group=group)
        out.append(item)
        try:
            generator = torch.Generator(device="cpu").manual_seed(int(row.get("seed") or 0))
            with torch.no_grad(), trace(pipe, map_steps=map_steps) as tr:
                images = pipe(
                    [row["prompt"]],
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    generator=[generator],
                    output_type="np",
                ).images
            record = tr.record
            image = np.clip(np.asarray(images[0], dtype=np.float32), 0, 1)
            layout = record.require_layouts()[0]
            mass = scores.token_mass(record)[0]
            positions = _stored_triggers(row, layout) or [
                t.position for t in scores.trigger_tokens(record, k=triggers_k)[0]
            ]
            chosen = [(0, False)] + [(p, True) for p in positions] + [(layout.eos_index, False)]
            height, width = image.shape[:2]
            scale = max(1, math.ceil(128 / max(height, width)))  # smooth maps over tiny images
            heat = token_heat(record, [p for p, _ in chosen], (height * scale, width * scale))
            item.tokens = [
                {
                    "position": p,
                    "label": token_label(layout.token(p) if layout.tokens else f"#{p}"),
                    "trigger": trigger,
                    "share": float(mass[p]),
                    "heat": heat[i],
                }
                for i, (p, trigger) in enumerate(chosen)
            ]
            item.entropy = scores.entropy_curve(record)[:, 0].numpy()
            item.summary_entropy = scores.summary_entropy_curve(record)[:, 0].numpy()
            item.figure = overlay_figure(image, item.tokens)
            for token in item.tokens:
                del token["heat"]  # only the figure is kept
        except Exception as error:  # one prompt failing must not lose the whole report
            item.error = f"{type(error).__name__}: {error}"
    return out


def _stored_triggers(row: dict[str, Any], layout: Any) -> list[int]:
    """Trigger positions the scan stored, when every one holds the stored token in this tokenization
    (else [] and the regenerated record's own trigger tokens are shown)."""
    positions = []
    for trigger in row.get("trigger_tokens") or []:
        position = trigger.get("position") if isinstance(trigger, dict) else None
        if not (isinstance(position, int) and position in layout.prompt_span and layout.tokens):
            return []
        if token_text(layout.token(position)) != token_text(str(trigger.get("token") or "")):
            return []
        positions.append(position)
    return positions


def select_for_maps(results: Results, ranking: np.ndarray, k: int) -> list[tuple[int, str]]:
    """The top ``k`` flagged rows (the ``k`` highest-scoring when none is flagged) and ``k`` clean rows
    spread evenly over the clean rows' scores (typical clean prompts, not only the most clean)."""
    if k <= 0 or not len(ranking):
        return []
    flagged = [int(i) for i in ranking if results.flagged[i] == 1]
    if flagged:
        top, names = flagged[:k], ("flagged", "clean")
        clean = [int(i) for i in ranking if results.flagged[i] == 0]
    else:  # nothing flagged: the highest-ranked against the rest
        top = [int(i) for i in ranking[: min(k, len(ranking) // 2 or 1)]]
        names = ("highest-scoring", "others")
        clean = [int(i) for i in ranking if int(i) not in top]
    if len(clean) > k:
        clean = [clean[int(round(j))] for j in np.linspace(0, len(clean) - 1, k)]
    return [(i, names[0]) for i in top] + [(i, names[1]) for i in clean]


def load_model(model: str | None, results: Results, device: str, dtype: str) -> tuple[Any, str | None, str]:
    """(pipeline or None, why not, model name). An implicit model (the table's) must be local."""
    from memattn.loading import load_pipeline, parse_dtype, resolve_model

    explicit = model is not None
    if model is None:
        names = Counter({m: n for m, n in value_counts(results.table, "model").items() if m})
        if not names:
            return None, "the results name no model; pass --model to regenerate the selected prompts", ""
        model = names.most_common(1)[0][0]
    if model.lower() == NO_MODEL:
        return None, "no model was given (--model none)", model
    if not explicit:
        try:
            local = Path(resolve_model(model)).expanduser()
        except MemattnError as error:
            return None, str(error), model
        if not local.is_dir():
            return (
                None,
                (
                    f"the scan's model {model!r} is not a local pipeline directory; "
                    "pass --model DIR or hub id to regenerate the selected prompts"
                ),
                model,
            )
    try:
        pipe = load_pipeline(model, dtype=parse_dtype(dtype), device=device, progress_bar=False)
    except Exception as error:  # a model that cannot be loaded only costs two sections
        return None, f"model {model!r} could not be loaded ({type(error).__name__}: {error})", model
    return pipe, None, model


def local_tokenizer(model: str | None, results: Results) -> Any:
    """The tokenizer of the given (or the scan's) model when it is a local pipeline directory, else None:
    it places trigger tokens exactly in the prompt, even when no pipeline is loaded."""
    if model is None:
        names = Counter({m: n for m, n in value_counts(results.table, "model").items() if m})
        model = names.most_common(1)[0][0] if names else None
    if not model or model.lower() == NO_MODEL:
        return None
    try:
        from transformers import AutoTokenizer

        from memattn.loading import resolve_model

        path = Path(resolve_model(model)).expanduser() / "tokenizer"
        return AutoTokenizer.from_pretrained(str(path)) if path.is_dir() else None
    except Exception:  # only a nicer highlight is lost
        return None
