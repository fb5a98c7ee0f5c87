"""The report's figures as inline PNG data URIs: score histograms, ROC, token overlays, entropy curves."""

from __future__ import annotations

import base64
import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from memattn.plotting import subplots
from memattn.report.constants import CLEAN_COLOR, FLAGGED_COLOR, SCORE_LABELS, UNKNOWN_COLOR
from memattn.report.results import Results
from memattn.report.text import mpl_text

if TYPE_CHECKING:
    from memattn.report.regenerate import Regenerated

# ---- figures ------------------------------------------------------------------------------------------


def figure_uri(fig: Any, dpi: int = 100) -> str:
    """A figure as a ``data:image/png;base64,...`` URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def score_histograms(results: Results) -> str | None:
    """One histogram per score column: flagged vs not flagged (vs not calibrated), threshold marked."""
    names = list(results.scores)
    if not names:
        return None
    columns = min(2, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = subplots(rows, columns, figsize=(5.2 * columns, 2.9 * rows), squeeze=False)
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
                ax.hist(
                    chosen,
                    bins=bins,
                    histtype="stepfilled",
                    alpha=0.45,
                    color=color,
                    label=f"{label} ({len(chosen)})",
                )
        if name == results.threshold_score and results.threshold is not None:
            ax.axvline(
                results.threshold,
                color="black",
                linestyle="--",
                linewidth=1,
                label=f"threshold {results.threshold:.4g}",
            )
        ax.set_title(SCORE_LABELS[name], fontsize=9)
        ax.set_ylabel("prompts", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    return figure_uri(fig)


def detection(results: Results, fpr: float = 0.01) -> tuple[str | None, list[dict[str, Any]], str | None]:
    """ROC figure, per-score metrics and a note (why there is no ROC) from the ``label`` column."""
    from sklearn.metrics import roc_curve

    from memattn.detection.metrics import detection_metrics

    if "label" not in results.table.column_names:
        return None, [], "The results have no label column: no ROC (add a 0/1 label to the scanned prompts)."
    labelled = results.ok & (results.label >= 0)
    labels = results.label[labelled]
    if not (labels == 1).any() or not (labels == 0).any():
        return (
            None,
            [],
            (
                f"The label column needs both memorized (1) and clean (0) scored prompts for a ROC; it has "
                f"{int((labels == 1).sum())} and {int((labels == 0).sum())}."
            ),
        )
    fig, ax = subplots(figsize=(5.2, 4.2))
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
        metrics.append(
            {
                "score": "flagged",
                "label": "the scan's flags at its threshold",
                "auc": None,
                "tpr_at_fpr": None,
                "flag_fpr": point[0],
                "flag_tpr": point[1],
                "positives": int((y == 1).sum()),
                "negatives": int((y == 0).sum()),
            }
        )
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
    fig, axes = subplots(1, panels, figsize=(1.9 * panels, 2.15), squeeze=False)
    height, width = image.shape[:2]
    extent = (0, width, height, 0)
    axes[0, 0].imshow(image, extent=extent, interpolation="nearest")
    axes[0, 0].set_title("generated\n(share: all steps)", fontsize=8)  # the table's shares are step 1
    for ax, token in zip(axes[0, 1:], tokens, strict=True):
        heat = token["heat"]
        peak = float(heat.max())
        ax.imshow(image, extent=extent, interpolation="nearest")
        ax.imshow(
            heat / peak if peak > 0 else heat,
            extent=extent,
            cmap="jet",
            alpha=0.5,
            vmin=0,
            vmax=1,
            interpolation="bilinear",
        )
        ax.set_title(
            f"{mpl_text(token['label'])[:18]}  {100 * token['share']:.1f}%",
            fontsize=8,
            color=FLAGGED_COLOR if token["trigger"] else "black",
        )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.4)
    return figure_uri(fig, dpi=90)


def entropy_figure(regenerated: list[Regenerated]) -> str | None:
    """Entropy over denoising steps (all tokens; summary tokens) per group (flagged vs clean), mean thick."""
    if not regenerated:
        return None
    fig, axes = subplots(1, 2, figsize=(10, 3.4))
    groups = list(dict.fromkeys(r.group for r in regenerated))
    for group, color in zip(groups, (FLAGGED_COLOR, CLEAN_COLOR), strict=False):
        members = [r for r in regenerated if r.group == group]
        for ax, attribute in zip(axes, ("entropy", "summary_entropy"), strict=True):
            curves = [getattr(r, attribute) for r in members]
            for curve in curves:
                ax.plot(curve, color=color, alpha=0.3, linewidth=0.8)
            length = min(len(c) for c in curves)
            ax.plot(
                np.mean([c[:length] for c in curves], axis=0),
                color=color,
                linewidth=2.2,
                label=f"{group} (mean of {len(curves)})",
            )
    axes[0].set_title("attention entropy over all tokens (layer mean)", fontsize=9)
    axes[1].set_title("summary-token entropy (EOS and padding)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("denoising step")
        ax.set_ylabel("nats")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_uri(fig)
