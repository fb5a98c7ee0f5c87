"""``memattn report``: one self-contained HTML page about a scan's results (the Parquet of ``memattn scan``).

The page holds every figure as an inline base64 PNG and no script; a Content-Security-Policy meta tag
forbids scripts and any non-``data:`` resource, so even a broken escape could not run a prompt's
``<script>``. Prompts are user data: the page is rendered by jinja2 with autoescape and no prompt is ever
marked safe. Trigger tokens are highlighted by cutting the prompt into plain-text segments in Python
(:func:`highlight_segments`); the template escapes each segment and wraps triggers in ``<mark>``.

Sections:

- counts and settings of the scan (rows, ok, skipped, flagged, threshold, model, version);
- score distributions: a histogram per score column, flagged vs not flagged, with the threshold line;
- detection: ROC curves, AUC and TPR at 1 % FPR per score when the table has a 0/1 ``label`` column;
- the top flagged prompts (or the highest-scoring, when nothing is flagged) with trigger tokens marked;
- DAAM-style per-token attention overlays and entropy-over-steps curves, flagged vs clean: the scan keeps
  no attention, so the selected prompts are generated again with the same seeds under
  :func:`memattn.trace`. Without a loadable model these two sections say why they are missing.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from jinja2 import Environment, PackageLoader, select_autoescape  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from memattn.errors import MemattnError  # noqa: E402

MANIFEST_FILE = "_memattn_scan.json"  # written by `memattn scan` next to its part files
NO_MODEL = "none"  # model="none" (--model none): no regeneration, no heat maps or entropy curves

# Score columns of the scan, in display order; higher means "more memorized" for the detection scores.
SCORE_LABELS = {
    "score_e": "E (step-1 attention entropy)",
    "wen_step1": "Wen (step-1 noise-difference norm)",
    "score_combined": "combined step-1 detector",
    "score_d": "D (full-generation score)",
    "bos_share": "BOS attention share (step 1)",
    "summary_share": "summary-token attention share (step 1)",
}
# Scores a threshold may apply to, in the order they are tried when the results do not say which.
THRESHOLD_SCORES = ("score_e", "wen_step1", "score_combined", "score_d")
FLAGGED_COLOR, CLEAN_COLOR, UNKNOWN_COLOR = "#c0392b", "#2980b9", "#7f8c8d"
MAX_PROMPT_CHARS = 1000  # longer prompts are cut in the page (the table keeps them whole)
MAP_STEPS = 5  # denoising steps whose full attention maps are averaged for the overlays
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


# ---- reading the results ----------------------------------------------------------------------------


def read_scan_results(path: str | Path) -> pa.Table:
    """A scan's rows (one Parquet file or a directory of part files), sorted by ``row`` when present."""
    path = Path(path)
    if not path.exists():
        raise MemattnError(f"results {path} do not exist; pass the --out of `memattn scan`")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise MemattnError(f"{path} is not a readable Parquet file or directory of parts ({error})") from None
    if "prompt" not in table.column_names:
        raise MemattnError(
            f"{path} has no 'prompt' column (found: {', '.join(table.column_names)}); "
            "is it the output of `memattn scan`?"
        )
    return table.sort_by("row") if "row" in table.column_names else table


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The scan manifest next to the parts (settings, calibration), or {} when there is none."""
    manifest = Path(path) / MANIFEST_FILE
    if not manifest.is_file():
        return {}
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _manifest_part(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    """``manifest["identity"][name]`` when it is a mapping, else {}."""
    identity = manifest.get("identity")
    part = identity.get(name) if isinstance(identity, dict) else None
    return part if isinstance(part, dict) else {}


def _floats(table: pa.Table, name: str) -> np.ndarray | None:
    """A numeric column as float64 with NaN for nulls; None when absent or not numeric."""
    if name not in table.column_names:
        return None
    column = table.column(name)
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
        return None
    return np.asarray(pc.fill_null(column.cast(pa.float64()), math.nan).to_numpy(zero_copy_only=False))


def _tristate(table: pa.Table, name: str) -> np.ndarray:
    """A bool/0-1 column as int8: 1, 0, or -1 for null, absent or anything else."""
    if name not in table.column_names:
        return np.full(table.num_rows, -1, dtype=np.int8)
    column = table.column(name)
    kind = column.type
    if pa.types.is_boolean(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind):
        values = pc.fill_null(column.cast(pa.float64()), -1.0).to_numpy(zero_copy_only=False)
        out = np.full(table.num_rows, -1, dtype=np.int8)
        out[values == 1] = 1
        out[values == 0] = 0
        return out
    return np.full(table.num_rows, -1, dtype=np.int8)


@dataclass
class Results:
    """The columns the report needs, as numpy arrays over all rows."""

    table: pa.Table
    ok: np.ndarray  # bool
    flagged: np.ndarray  # int8: 1, 0, -1 (not calibrated / skipped)
    label: np.ndarray  # int8: 1, 0, -1 (no label)
    scores: dict[str, np.ndarray]  # present score columns with at least one finite value
    threshold: float | None
    threshold_score: str | None
    rank_score: str | None

    @classmethod
    def from_table(cls, table: pa.Table, manifest: dict[str, Any], score: str | None = None) -> Results:
        if "status" in table.column_names:
            ok = np.asarray(pc.fill_null(pc.equal(table.column("status"), "ok"), False).to_numpy(
                zero_copy_only=False), dtype=bool)
        else:
            ok = np.asarray(pc.is_valid(table.column("prompt")).to_numpy(zero_copy_only=False), dtype=bool)
        scores = {}
        for name in SCORE_LABELS:
            values = _floats(table, name)
            if values is not None and np.isfinite(values[ok]).any():
                scores[name] = values
        flagged = np.where(ok, _tristate(table, "flagged"), -1).astype(np.int8)
        thresholds = _floats(table, "threshold")
        finite = thresholds[np.isfinite(thresholds)] if thresholds is not None else np.empty(0)
        threshold = float(finite[0]) if len(finite) else None
        threshold_score = None
        if threshold is not None:
            threshold_score = _threshold_score(scores, flagged, threshold, manifest)
        if score is not None and score not in scores:
            raise MemattnError(
                f"score {score!r} is not a score column of these results; they have "
                f"{', '.join(scores) or 'none'}"
            )
        rank = score or threshold_score or next((s for s in THRESHOLD_SCORES if s in scores), None)
        return cls(table, ok, flagged, _tristate(table, "label"), scores, threshold, threshold_score, rank)

    @property
    def n(self) -> int:
        return self.table.num_rows

    def ranking(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Row indices (ok rows only, or those given): flagged first, then by rank score, highest first."""
        index = np.flatnonzero(self.ok) if rows is None else np.asarray(rows)
        score = self.scores.get(self.rank_score) if self.rank_score else None
        key = np.zeros(len(index))
        if score is not None:
            key = np.where(np.isfinite(score[index]), score[index], -np.inf)
        order = np.lexsort((index, -key, -(self.flagged[index] == 1).astype(np.int8)))
        return index[order]


def _threshold_score(
    scores: dict[str, np.ndarray], flagged: np.ndarray, threshold: float, manifest: dict[str, Any]
) -> str | None:
    """The score column the threshold applies to: the manifest's calibration, else the one that agrees
    with the flags (flagged exactly when score > threshold)."""
    calibration = _manifest_part(manifest, "calibration")
    named = {"e": "score_e", "wen": "wen_step1"}.get(str(calibration.get("score")))
    if named in scores:
        return named
    known = flagged >= 0
    for name in THRESHOLD_SCORES:
        values = scores.get(name)
        if values is None:
            continue
        usable = known & np.isfinite(values)
        if usable.any() and np.array_equal(values[usable] > threshold, flagged[usable] == 1):
            return name
    return None


# ---- prompt text: plain segments, never HTML ---------------------------------------------------------


def _token_text(token: str) -> str:
    return token.replace("</w>", "").strip().lower()


def tokenization(tokenizer: Any, prompt: str | None) -> Tokenization | None:
    """Character offsets and token strings of a prompt as the pipeline tokenizes it (BOS at 0), or None
    when the tokenizer cannot give offsets."""
    if tokenizer is None or prompt is None:
        return None
    try:
        encoded = tokenizer(prompt, truncation=True, max_length=int(tokenizer.model_max_length),
                            return_offsets_mapping=True)
        tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
        offsets = [tuple(int(x) for x in pair) for pair in encoded["offset_mapping"]]
    except Exception:  # a slow tokenizer (no offsets), or anything unexpected: match by text instead
        return None
    return Tokenization(offsets, [str(t) for t in tokens]) if len(offsets) == len(tokens) else None


@dataclass(frozen=True)
class Tokenization:
    offsets: list[tuple[int, ...]]
    tokens: list[str]


def _trigger_spans(trigger: dict[str, Any], lower: str, tokens: Tokenization | None) -> list[tuple[int, int]]:
    """Where a trigger token lies in the (lowercased) prompt: exactly, from its position and the
    tokenizer's offsets when they agree on the token; else by matching its text."""
    raw = str(trigger.get("token") or "")
    token = _token_text(raw)
    position = trigger.get("position")
    if tokens is not None and isinstance(position, int) and 0 < position < len(tokens.tokens):
        start, stop = tokens.offsets[position]
        if stop > start and _token_text(tokens.tokens[position]) == token:
            return [(start, stop)]
    if not token:
        return []
    starts = [m.start() for m in re.finditer(re.escape(token), lower)]
    word_starts = [s for s in starts if s == 0 or not lower[s - 1].isalnum()]
    end = len(token)
    words = [s for s in word_starts if s + end == len(lower) or not lower[s + end].isalnum()]
    return [(s, s + end) for s in (words if raw.endswith("</w>") else []) or word_starts or starts]


def highlight_segments(
    prompt: str | None,
    triggers: Sequence[dict[str, Any]] | None,
    limit: int = MAX_PROMPT_CHARS,
    tokens: Tokenization | None = None,
) -> list[dict[str, Any]]:
    """Cut a prompt into ``{"text", "trigger", "token", "share"}`` segments; trigger tokens get their own.

    With ``tokens`` (:func:`tokenization` by the pipeline's tokenizer) a trigger's stored ``position``
    marks exactly its characters. Otherwise, or when the token there differs, its text is matched
    case-insensitively (CLIP lowercases) where it is a whole word (a BPE token ending in ``</w>`` ends a
    word), else where it starts a word, else anywhere. Segments are plain text: the template escapes each.
    """
    if prompt is None:
        return []
    cut = len(prompt) > limit
    text = prompt[:limit]
    lower = text.lower()
    if tokens is not None and len(lower) != len(prompt[:limit]):
        tokens = None  # lowercasing changed the length (rare scripts): offsets would not line up
    best: list[tuple[float, str] | None] = [None] * len(text)
    for trigger in triggers or ():
        share = trigger.get("share")
        share = float(share) if isinstance(share, int | float) and math.isfinite(share) else 0.0
        label = _token_label(str(trigger.get("token") or ""))
        for start, stop in _trigger_spans(trigger, lower, tokens):
            for i in range(start, min(stop, len(text))):
                if best[i] is None or share > best[i][0]:
                    best[i] = (share, label)
    segments: list[dict[str, Any]] = []
    for char, mark in zip(text, best, strict=True):
        if segments and segments[-1]["_mark"] == mark:
            segments[-1]["text"] += char
        else:
            segments.append({"text": char, "_mark": mark})
    for segment in segments:
        mark = segment.pop("_mark")
        segment.update(trigger=mark is not None, share=None if mark is None else mark[0],
                       token=None if mark is None else mark[1])
    if cut:
        segments.append({"text": f" … ({len(prompt) - limit} more characters)", "trigger": False,
                         "share": None, "token": None, "cut": True})
    return segments


def _mpl(text: str) -> str:
    """Data shown in a matplotlib label: ``$`` would start mathtext (and can fail to parse)."""
    return text.replace("\\", "\\\\").replace("$", r"\$")


def _token_label(token: str) -> str:
    if token == "<|startoftext|>":
        return "BOS"
    if token == "<|endoftext|>":
        return "EOS"
    return token.replace("</w>", "")


# ---- figures ------------------------------------------------------------------------------------------


def figure_uri(fig: Any, dpi: int = 100) -> str:
    """A figure as a ``data:image/png;base64,...`` URI (the figure is closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def score_histograms(results: Results) -> str | None:
    """One histogram per score column: flagged vs not flagged (vs not calibrated), threshold marked."""
    names = list(results.scores)
    if not names:
        return None
    columns = min(2, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 2.9 * rows), squeeze=False)
    groups = (
        ("flagged", results.flagged == 1, FLAGGED_COLOR),
        ("not flagged", results.flagged == 0, CLEAN_COLOR),
        ("no threshold", (results.flagged == -1) & results.ok, UNKNOWN_COLOR),
    )
    for ax, name in zip(axes.flat, names, strict=False):
        values = results.scores[name]
        finite = np.isfinite(values) & results.ok
        bins = np.histogram_bin_edges(values[finite], bins=min(40, max(5, int(finite.sum() ** 0.5) * 2)))
        for label, mask, color in groups:
            chosen = values[mask & finite]
            if len(chosen):
                ax.hist(chosen, bins=bins, histtype="stepfilled", alpha=0.45, color=color,
                        label=f"{label} ({len(chosen)})")
        if name == results.threshold_score and results.threshold is not None:
            ax.axvline(results.threshold, color="black", linestyle="--", linewidth=1,
                       label=f"threshold {results.threshold:.4g}")
        ax.set_title(SCORE_LABELS[name], fontsize=9)
        ax.set_ylabel("prompts", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return figure_uri(fig)


def detection(results: Results, fpr: float = 0.01) -> tuple[str | None, list[dict[str, Any]], str | None]:
    """ROC figure, per-score metrics and a note (why there is no ROC) from the ``label`` column."""
    from sklearn.metrics import roc_curve

    from memattn.metrics import detection_metrics

    if "label" not in results.table.column_names:
        return None, [], "The results have no label column: no ROC (add a 0/1 label to the scanned prompts)."
    labelled = results.ok & (results.label >= 0)
    labels = results.label[labelled]
    if not (labels == 1).any() or not (labels == 0).any():
        return None, [], (
            f"The label column needs both memorized (1) and clean (0) scored prompts for a ROC; it has "
            f"{int((labels == 1).sum())} and {int((labels == 0).sum())}."
        )
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    metrics = []
    for name, values in results.scores.items():
        usable = labelled & np.isfinite(values)
        y, s = results.label[usable], values[usable]
        if not ((y == 1).any() and (y == 0).any()):
            continue
        found = detection_metrics(y.astype(int), s, fpr)
        false_positive, true_positive, _ = roc_curve(y, s)
        ax.plot(false_positive, true_positive, label=f"{name} (AUC {found['auc']:.3f})")
        metrics.append({"score": name, "label": SCORE_LABELS[name], **found})
    flags = labelled & (results.flagged >= 0)
    if flags.any() and (results.label[flags] == 1).any() and (results.label[flags] == 0).any():
        y, f = results.label[flags], results.flagged[flags] == 1
        point = (float(f[y == 0].mean()), float(f[y == 1].mean()))
        ax.plot(*point, "o", color="black", label=f"flagged (FPR {point[0]:.3f}, TPR {point[1]:.3f})")
        metrics.append({"score": "flagged", "label": "the scan's flags at its threshold", "auc": None,
                        "tpr_at_fpr": None, "flag_fpr": point[0], "flag_tpr": point[1],
                        "positives": int((y == 1).sum()), "negatives": int((y == 0).sum())})
    ax.plot([0, 1], [0, 1], color="#aaa", linestyle=":")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("memorized (label 1) vs clean (label 0)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return figure_uri(fig), metrics, None


def overlay_figure(image: np.ndarray, tokens: list[dict[str, Any]]) -> str:
    """The image, then per token its attention map (normalised to its own maximum) over the image."""
    panels = 1 + len(tokens)
    fig, axes = plt.subplots(1, panels, figsize=(1.9 * panels, 2.15), squeeze=False)
    height, width = image.shape[:2]
    extent = (0, width, height, 0)
    axes[0, 0].imshow(image, extent=extent, interpolation="nearest")
    axes[0, 0].set_title("generated", fontsize=8)
    for ax, token in zip(axes[0, 1:], tokens, strict=True):
        heat = token["heat"]
        peak = float(heat.max())
        ax.imshow(image, extent=extent, interpolation="nearest")
        ax.imshow(heat / peak if peak > 0 else heat, extent=extent, cmap="jet", alpha=0.5, vmin=0, vmax=1,
                  interpolation="bilinear")
        ax.set_title(f"{_mpl(token['label'])[:18]}  {100 * token['share']:.1f}%",
                     fontsize=8, color=FLAGGED_COLOR if token["trigger"] else "black")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.4)
    return figure_uri(fig, dpi=90)


def entropy_figure(regenerated: list[Regenerated]) -> str | None:
    """Entropy over denoising steps (all tokens; summary tokens) per group (flagged vs clean), mean thick."""
    if not regenerated:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    groups = list(dict.fromkeys(r.group for r in regenerated))
    for group, color in zip(groups, (FLAGGED_COLOR, CLEAN_COLOR), strict=False):
        members = [r for r in regenerated if r.group == group]
        for ax, attribute in zip(axes, ("entropy", "summary_entropy"), strict=True):
            curves = [getattr(r, attribute) for r in members]
            for curve in curves:
                ax.plot(curve, color=color, alpha=0.3, linewidth=0.8)
            length = min(len(c) for c in curves)
            ax.plot(np.mean([c[:length] for c in curves], axis=0), color=color, linewidth=2.2,
                    label=f"{group} (mean of {len(curves)})")
    axes[0].set_title("attention entropy over all tokens (layer mean)", fontsize=9)
    axes[1].set_title("summary-token entropy (EOS and padding)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("denoising step")
        ax.set_ylabel("nats")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_uri(fig)


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

    from memattn import scores
    from memattn.probe import trace

    out = []
    map_steps = map_steps_for(steps)
    for row, group in tqdm(selected, desc="report: regenerate", unit=" prompt", disable=not progress):
        item = Regenerated(row=row, group=group)
        out.append(item)
        try:
            generator = torch.Generator(device="cpu").manual_seed(int(row.get("seed") or 0))
            with torch.no_grad(), trace(pipe, map_steps=map_steps) as tr:
                images = pipe([row["prompt"]], num_inference_steps=steps, guidance_scale=guidance_scale,
                              generator=[generator], output_type="np").images
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
                {"position": p, "label": _token_label(layout.token(p) if layout.tokens else f"#{p}"),
                 "trigger": trigger, "share": float(mass[p]), "heat": heat[i]}
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
        if _token_text(layout.token(position)) != _token_text(str(trigger.get("token") or "")):
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


def _load_model(model: str | None, results: Results, device: str, dtype: str) -> tuple[Any, str | None, str]:
    """(pipeline or None, why not, model name). An implicit model (the table's) must be local."""
    from memattn.loading import load_pipeline, parse_dtype, resolve_model

    explicit = model is not None
    if model is None:
        names = Counter({m: n for m, n in _value_counts(results.table, "model").items() if m})
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
            return None, (
                f"the scan's model {model!r} is not a local pipeline directory; pass --model DIR or hub id "
                "to regenerate the selected prompts"
            ), model
    try:
        pipe = load_pipeline(model, dtype=parse_dtype(dtype), device=device)
    except Exception as error:  # a model that cannot be loaded only costs two sections
        return None, f"model {model!r} could not be loaded ({type(error).__name__}: {error})", model
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe, None, model


def _local_tokenizer(model: str | None, results: Results) -> Any:
    """The tokenizer of the given (or the scan's) model when it is a local pipeline directory, else None:
    it places trigger tokens exactly in the prompt, even when no pipeline is loaded."""
    if model is None:
        names = Counter({m: n for m, n in _value_counts(results.table, "model").items() if m})
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


# ---- the page ------------------------------------------------------------------------------------------


def _row_view(row: dict[str, Any], results: Results, index: int, tokenizer: Any = None) -> dict[str, Any]:
    triggers = [t for t in (row.get("trigger_tokens") or []) if isinstance(t, dict)]
    shown = [{"token": _token_label(str(t.get("token"))), "share": t.get("share")} for t in triggers]
    prompt = row.get("prompt")
    return {
        "row": row.get("row", index),
        "segments": highlight_segments(prompt, triggers, tokens=tokenization(tokenizer, prompt)),
        "prompt": row.get("prompt"),
        "flagged": row.get("flagged"),
        "label": row.get("label") if "label" in results.table.column_names else None,
        "scores": {name: row.get(name) for name in results.scores},
        "triggers": shown,
        "n_tokens": row.get("n_tokens"),
        "truncated": bool(row.get("truncated")),
        "seed": row.get("seed"),
        "reason": row.get("reason"),
    }


def _value_counts(table: pa.Table, name: str, rows: np.ndarray | None = None) -> Counter:
    """Counts of a column's values (over ``rows`` when given), computed in Arrow (results can be large)."""
    if name not in table.column_names:
        return Counter()
    column = table.column(name)
    if rows is not None:
        column = pc.filter(column, pa.array(rows, type=pa.bool_()))
    counts = pc.value_counts(column).to_pylist()
    return Counter({item["values"]: item["counts"] for item in counts})


def _counts(results: Results) -> dict[str, Any]:
    truncated = _tristate(results.table, "truncated")
    versions = sorted(v for v in _value_counts(results.table, "memattn_version") if v)
    models = Counter({m: n for m, n in _value_counts(results.table, "model").items() if m})
    return {
        "rows": results.n,
        "ok": int(results.ok.sum()),
        "skipped": int(results.n - results.ok.sum()),
        "flagged": int((results.flagged == 1).sum()),
        "calibrated": bool((results.flagged >= 0).any()),
        "truncated": int((truncated == 1).sum()),
        "labelled": int((results.label >= 0).sum()) if "label" in results.table.column_names else None,
        "models": [m for m, _ in models.most_common(5)],
        "versions": versions,
    }


def _skip_reasons(results: Results, limit: int = 10) -> list[tuple[str, int]]:
    if results.ok.all():
        return []
    if "reason" not in results.table.column_names:
        return [("no reason given", int((~results.ok).sum()))]
    counts = Counter()
    for reason, n in _value_counts(results.table, "reason", ~results.ok).items():
        counts[reason or "no reason given"] += n
    return counts.most_common(limit)


def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def write_scan_report(
    results_path: str | Path,
    out_path: str | Path,
    model: str | None = None,
    top: int = 20,
    maps: int = 4,
    *,
    steps: int = 25,
    guidance_scale: float | None = None,
    score: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool = True,
    pipe: Any = None,
) -> Path:
    """Write one self-contained HTML report of a scan's results to ``out_path``; returns its path.

    ``model`` regenerates the top ``maps`` flagged and ``maps`` clean prompts (same seeds) for the heat
    maps and entropy curves: a pipeline directory, hub id or ``"testbed"``; ``None`` takes the table's
    ``model`` column when it is a local directory (or the bundled testbed); ``"none"`` skips them.
    ``pipe`` reuses a loaded pipeline instead. ``steps``: denoising steps of the regeneration;
    ``guidance_scale``: default the scan's (from its manifest), else 7.5. ``score`` ranks the prompts
    (default: the score the threshold applies to, else E).
    """
    if top < 0 or maps < 0:
        raise MemattnError(f"--top and --maps must be ≥ 0, got {top} and {maps}")
    if steps < 2:
        raise MemattnError(f"--steps {steps}: entropy over steps needs at least 2")
    results_path, out_path = Path(results_path), Path(out_path)
    if out_path.is_dir():
        raise MemattnError(f"--out {out_path} is a directory; give the HTML file to write")
    table = read_scan_results(results_path)
    manifest = read_manifest(results_path) if results_path.is_dir() else {}
    results = Results.from_table(table, manifest, score)
    settings = _manifest_part(manifest, "settings")
    if guidance_scale is None:
        stored = settings.get("guidance_scale")
        guidance_scale = float(stored) if isinstance(stored, int | float) else 7.5

    ranking = results.ranking()
    regenerated: list[Regenerated] = []
    maps_note = entropy_note = None
    model_name = ""
    selection = select_for_maps(results, ranking, maps)
    if not selection:
        maps_note = entropy_note = (
            "Not available: no scored prompt to regenerate." if maps else "Not available: --maps 0."
        )
    else:
        why = None
        if pipe is None:
            pipe, why, model_name = _load_model(model, results, device, dtype)
        else:
            model_name = model or "(given pipeline)"
        if pipe is None:
            maps_note = entropy_note = (
                f"Not available: {why}. The scan stores no attention maps; they come from generating "
                "the selected prompts again with the same seeds (memattn report --model PATH)."
            )
        else:
            picked = table.take(pa.array([i for i, _ in selection], type=pa.int64())).to_pylist()
            regenerated = regenerate(pipe, [(row, group) for row, (_, group) in zip(picked, selection,
                                                                                    strict=True)],
                                     steps=steps, guidance_scale=guidance_scale, progress=progress)
            good = [r for r in regenerated if r.error is None]
            if not good:
                maps_note = entropy_note = "Not available: every regeneration failed (the errors follow)."
    tokenizer = getattr(pipe, "tokenizer", None) or _local_tokenizer(model, results)
    for item in regenerated:
        item.row = {**_row_view(item.row, results, -1, tokenizer), "group": item.group}
    shown = ranking[:top]
    rows = table.take(pa.array(shown, type=pa.int64())).to_pylist() if len(shown) else []
    top_rows = [_row_view(row, results, int(i), tokenizer) for row, i in zip(rows, shown, strict=True)]
    n_flagged = int((results.flagged == 1).sum())
    if n_flagged:
        top_rows = [r for r in top_rows if r["flagged"]]
        top_title = f"Top flagged prompts ({len(top_rows)} of {n_flagged} flagged)"
    elif (results.flagged == 0).any():
        top_title = f"No prompt was flagged; the {len(top_rows)} highest-scoring prompts"
    else:
        top_title = f"The {len(top_rows)} highest-scoring prompts (no threshold: the scan flagged nothing)"
    context = {
        "title": f"memattn scan report: {results_path.name}",
        "source": str(results_path),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "counts": _counts(results),
        "threshold": results.threshold,
        "threshold_score": results.threshold_score,
        "rank_score": results.rank_score,
        "score_labels": SCORE_LABELS,
        "score_columns": list(results.scores),
        "scan_settings": settings,
        "histograms": score_histograms(results),
        "top_title": top_title,
        "top_rows": top_rows,
        "skip_reasons": _skip_reasons(results),
        "model": model_name,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "map_steps": map_steps_for(steps),
        "regenerated": regenerated,
        "maps_note": maps_note,
        "entropy_figure": entropy_figure([r for r in regenerated if r.error is None]),
        "entropy_note": entropy_note,
        "csp": CSP,
    }
    context["roc"], context["metrics"], context["roc_note"] = detection(results)
    environment = Environment(loader=PackageLoader("memattn"), autoescape=select_autoescape(["html"]))
    environment.filters["num"] = _number
    html = environment.get_template("report.html").render(**context)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(html, encoding="utf-8")
    return out_path


__all__ = ["highlight_segments", "read_scan_results", "write_scan_report"]
