"""A readable report of a testbed evaluation: one HTML page (jinja2, autoescaped) and PNG figures.

Figures: first a headline a person can read in ten seconds (ROC of the best step-1 detector next to
the paper's D and E; copies and clean-prompt fidelity with and without the paper's mitigation), then
generated images next to their nearest training images (what the copy threshold calls a copy and what
it does not), the copy-similarity histogram per group with the threshold, entropy over the denoising
steps per group, the attention share on BOS / prompt / summary tokens per group, ROC curves of D and
E, and the AUC of E in every cross-attention layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape
from sklearn.metrics import roc_curve

from memattn.plotting import subplots
from memattn.testbed.evaluate import (
    MEMORIZED,
    NON_MEMORIZED,
    STEP1_SCORES,
    Evaluation,
    mitigation_measures,
)

GROUP_COLORS = {
    "memorized_matching": "#c0392b",
    "memorized_template": "#e67e22",
    "seen_once": "#2980b9",
    "rare_word_seen_once": "#8e44ad",
    "never_seen": "#27ae60",
    "novel_composition": "#16a085",
}


def _to_rgb(image: np.ndarray) -> np.ndarray:
    return np.clip((image.transpose(1, 2, 0) + 1) / 2, 0, 1)


def _groups(evaluation: Evaluation) -> list[str]:
    return list(dict.fromkeys(row["group"] for row in evaluation.rows))


def copies_figure(evaluation: Evaluation, path: Path, threshold: float, per_group: int = 6) -> list[dict]:
    """Per group, the generations with the highest and lowest detail similarity above their nearest
    training images. Returns the shown examples (for the HTML captions)."""
    groups = _groups(evaluation)
    shown: list[list[int]] = []
    for group in groups:
        index = [i for i, row in enumerate(evaluation.rows) if row["group"] == group]
        index.sort(key=lambda i: -evaluation.rows[i]["copy_similarity"])
        half = per_group // 2
        picked = index[:half] + [i for i in index[-(per_group - half) :] if i not in index[:half]]
        shown.append(picked)
    per_group = max(1, max(len(picked) for picked in shown))  # no empty columns in a small run
    fig, axes = subplots(
        2 * len(groups), per_group, figsize=(1.4 * per_group, 2.9 * len(groups)), squeeze=False
    )
    examples = []
    for g, (group, picked) in enumerate(zip(groups, shown, strict=True)):
        for column in range(per_group):
            top, bottom = axes[2 * g, column], axes[2 * g + 1, column]
            for ax in (top, bottom):
                ax.set_xticks([])
                ax.set_yticks([])
            if column >= len(picked):
                top.axis("off")
                bottom.axis("off")
                continue
            i = picked[column]
            row = evaluation.rows[i]
            top.imshow(_to_rgb(evaluation.generated[i]), interpolation="nearest")
            bottom.imshow(_to_rgb(evaluation.nearest[i]), interpolation="nearest")
            verdict = "COPY" if row["copy_similarity"] > threshold else "new"
            top.set_title(
                f"{row['copy_similarity']:.2f} {verdict}",
                fontsize=7,
                color="#c0392b" if verdict == "COPY" else "#333",
            )
            if column == 0:  # group names run to 18 characters: break them so tight_layout keeps them
                name = group.replace("_", "\n")
                top.set_ylabel(f"{name}\ngenerated", fontsize=7)
                bottom.set_ylabel("nearest\ntraining", fontsize=7)
            examples.append(
                {
                    "group": group,
                    "caption": row["caption"],
                    "similarity": row["copy_similarity"],
                    "is_copy": verdict == "COPY",
                    "own": row["nearest_is_own"],
                }
            )
    fig.suptitle(
        f"generated (top) vs nearest training image (bottom)\nby {evaluation.settings.get('copy_measure')}; "
        f"copy: similarity > {threshold}",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the suptitle
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return examples


def similarity_figure(evaluation: Evaluation, path: Path, threshold: float) -> None:
    fig, ax = subplots(figsize=(7, 3.4))
    bins = np.linspace(-0.1, 1.0, 45)
    for group in _groups(evaluation):
        values = evaluation.column("copy_similarity", (group,))
        ax.hist(values, bins=bins, histtype="step", linewidth=1.6, label=group, color=GROUP_COLORS.get(group))
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"copy threshold {threshold}")
    ax.set_xlabel(f"{evaluation.settings.get('copy_measure', 'similarity')} with the nearest training image")
    ax.set_ylabel("generations")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def entropy_figure(evaluation: Evaluation, path: Path) -> None:
    fig, axes = subplots(1, 2, figsize=(10, 3.4))
    for group in _groups(evaluation):
        mask = np.array([row["group"] == group for row in evaluation.rows])
        for ax, curves in zip(axes, (evaluation.entropy, evaluation.summary_entropy), strict=True):
            ax.plot(curves[mask].mean(axis=0), label=group, color=GROUP_COLORS.get(group))
    axes[0].set_title("attention entropy (all 77 tokens), layer mean", fontsize=9)
    axes[1].set_title("summary-token entropy (EOS and padding)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("denoising step")
        ax.set_ylabel("nats")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def shares_figure(evaluation: Evaluation, path: Path) -> None:
    groups = _groups(evaluation)
    shares = {
        key: [evaluation.column(key, (g,)).mean() for g in groups]
        for key in ("bos_share", "prompt_share", "summary_share")
    }
    fig, ax = subplots(figsize=(8, 3.4))
    bottom = np.zeros(len(groups))
    for key, color in zip(shares, ("#34495e", "#f1c40f", "#95a5a6"), strict=True):
        ax.bar(groups, shares[key], bottom=bottom, label=key.removesuffix("_share"), color=color)
        bottom += np.array(shares[key])
    ax.set_ylabel("attention share")
    ax.set_ylim(0, 1)
    ax.tick_params(axis="x", labelsize=7, rotation=15)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def roc_figure(evaluation: Evaluation, path: Path) -> None:
    negatives = [row for row in evaluation.rows if row["group"] in NON_MEMORIZED]
    fig, axes = subplots(1, 2, figsize=(8, 3.6))
    for ax, positive in zip(axes, ("memorized_matching", "memorized_template"), strict=True):
        rows = [row for row in evaluation.rows if row["group"] == positive]
        if rows and negatives:
            labels = [1] * len(rows) + [0] * len(negatives)
            for score in ("score_d", "score_e"):
                fpr, tpr, _ = roc_curve(labels, [r[score] for r in rows + negatives])
                ax.plot(fpr, tpr, label=score)
        ax.plot([0, 1], [0, 1], color="#aaa", linestyle=":")
        ax.set_title(f"{positive} vs non-memorized", fontsize=9)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def layer_figure(summary: dict, path: Path) -> None:
    layers = summary["cross_attention_layers"]
    fig, ax = subplots(figsize=(8, 3.4))
    width = 0.4
    for k, positive in enumerate(("memorized_matching", "memorized_template")):
        aucs = summary["detection_vs_non_memorized"].get(f"{positive}/layer_e_auc")
        if aucs:
            ax.bar(np.arange(len(aucs)) + (k - 0.5) * width, aucs, width, label=positive)
    ax.axhline(0.5, color="#aaa", linestyle=":")
    ax.set_xticks(
        range(len(layers)),
        [name.removesuffix(".transformer_blocks.0.attn2") for name in layers],
        rotation=30,
        ha="right",
        fontsize=6,
    )
    ax.set_ylabel("AUC of E in this layer")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def detection_ranking(summary: dict) -> list[dict[str, Any]]:
    """Every score (E of every layer included), best AUC first: memorized vs all non-memorized groups."""
    ranked = []
    detection = summary["detection_vs_non_memorized"]
    groups = list(summary.get("detection_auc_by_negative_group", {}))
    for key, value in detection.items():
        positive, score = key.split("/")
        if positive != "memorized_matching":
            continue
        if isinstance(value, dict):
            ranked.append(
                {
                    "score": score,
                    "auc": value["auc"],
                    "tpr_at_fpr": value["tpr_at_fpr"],
                    "step1": score in STEP1_SCORES,
                    "by_group": {
                        g: v.get(score) for g, v in summary.get("detection_auc_by_negative_group", {}).items()
                    },
                }
            )
        else:
            layer_by_group = summary.get("layer_e_auc_by_negative_group", {})
            for i, (name, auc) in enumerate(zip(summary["cross_attention_layers"], value, strict=True)):
                short = name.removesuffix(".transformer_blocks.0.attn2")
                ranked.append(
                    {
                        "score": f"E {short}",
                        "auc": auc,
                        "tpr_at_fpr": None,
                        "step1": True,
                        "by_group": {g: layer_by_group.get(g, [None] * len(value))[i] for g in groups},
                    }
                )
    return sorted(ranked, key=lambda r: -r["auc"])


SCORE_LABELS = {
    "score_d": "D (paper)",
    "score_e": "E, paper's layer",
    "e_preregistered": "E, pre-registered layer",
}


BAR_LABELS = {
    "plain": "plain",
    "mitigated": "paper's edit, every image",
    "guarded": "guard (only flagged images edited)",
}


def guard_flag_shares(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Share of the 128x items' and of the never-seen prompts' generations the guard flagged."""
    heavy = [
        r["guard_flagged"] for r in rows if r["group"] == "memorized_matching" and r["duplication"] == 128
    ]
    clean = [r["guard_flagged"] for r in rows if r["group"] == "never_seen"]
    return {
        "flagged_128": float(np.mean(heavy)) if heavy else float("nan"),
        "flagged_clean": float(np.mean(clean)) if clean else float("nan"),
    }


def headline_figure(
    evaluation: Evaluation, path: Path, mitigated: Evaluation | None, guarded: Evaluation | None = None
) -> dict[str, Any]:
    """ROC of the best step-1 score vs D and E; copies / clean fidelity without and with mitigation
    (the paper's edit on every image, and the guard: the edit of its flagged images only)."""
    positives = [row for row in evaluation.rows if row["group"] in MEMORIZED]
    negatives = [row for row in evaluation.rows if row["group"] in NON_MEMORIZED]
    fig, axes = subplots(1, 2, figsize=(10, 3.8))
    best = None
    if positives and negatives:
        labels = [1] * len(positives) + [0] * len(negatives)
        from sklearn.metrics import roc_auc_score

        available = [s for s in STEP1_SCORES if s != "score_e" and np.isfinite(positives[0].get(s, np.nan))]
        aucs = {s: roc_auc_score(labels, [r[s] for r in positives + negatives]) for s in available}
        best = max(aucs, key=aucs.get) if aucs else None
        for score in [s for s in (best, "score_e", "score_d") if s]:
            values = [r[score] for r in positives + negatives]
            fpr, tpr, _ = roc_curve(labels, values)
            auc = roc_auc_score(labels, values)
            kind = "step 1" if score in STEP1_SCORES else "all steps"
            name = SCORE_LABELS.get(score, score)
            axes[0].plot(fpr, tpr, lw=2 if score == best else 1.2, label=f"{name} ({kind}) AUC {auc:.2f}")
    axes[0].plot([0, 1], [0, 1], color="#aaa", linestyle=":")
    axes[0].set_xlabel("false-positive rate")
    axes[0].set_ylabel("true-positive rate")
    axes[0].set_title("detection: memorized vs non-memorized prompts", fontsize=9)
    axes[0].legend(fontsize=7, loc="lower right")
    threshold = evaluation.settings["copy_threshold"]
    plain = mitigation_measures(evaluation.rows, threshold)
    bars = {"plain": plain}
    if mitigated is not None:
        bars["mitigated"] = mitigation_measures(mitigated.rows, threshold)
    if guarded is not None:
        bars["guarded"] = mitigation_measures(guarded.rows, threshold)
    names = ("copy_rate_128", "all_attributes_clean")
    x = np.arange(len(names))
    width = 0.8 / len(bars)
    for k, (label, measures) in enumerate(bars.items()):
        values = [measures[n] for n in names]
        axes[1].bar(
            x + (k - (len(bars) - 1) / 2) * width,
            values,
            width,
            label=BAR_LABELS.get(label, label),
            color=("#7f8c8d", "#27ae60", "#2f6fb0")[k],
        )
        for xi, v in zip(x, values, strict=True):
            axes[1].text(
                xi + (k - (len(bars) - 1) / 2) * width, v + 0.02, f"{v:.2f}", ha="center", fontsize=8
            )
    axes[1].set_xticks(x, ["copies of 128x prompts", "clean prompts: all attributes right"], fontsize=8)
    axes[1].set_ylim(0, 1.3)  # room for the legend above the bars
    axes[1].set_yticks(np.linspace(0, 1, 6))
    title = "the paper's mitigation" if mitigated is not None else "copies and fidelity"
    if mitigated is not None:
        title += f" ({mitigated.settings.get('mitigation')})"
    if guarded is not None:
        title += " and the guard"
    axes[1].set_title(title, fontsize=9)
    axes[1].legend(fontsize=7, loc="upper center", ncol=len(bars), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return {"best_step1_score": best, **{f"{k}_{n}": v[n] for k, v in bars.items() for n in v}}


def write_report(
    evaluation: Evaluation,
    out: Path,
    extra: dict[str, Any] | None = None,
    mitigated: Evaluation | None = None,
    guarded: Evaluation | None = None,
    guard_settings: dict[str, Any] | None = None,
) -> Path:
    """Write ``out/report.html``, its PNGs, ``summary.json`` and ``rows.jsonl``; returns the HTML path.

    ``mitigated``: the same prompts generated under a mitigation (the headline compares the two).
    ``guarded``: the same prompts generated by the guard (rows carry ``guard_flagged``), described by
    ``guard_settings`` (layer, edit, threshold and how it was calibrated).
    """
    out.mkdir(parents=True, exist_ok=True)
    summary = evaluation.summary()
    threshold = summary["copy_threshold"]
    headline = headline_figure(evaluation, out / "headline.png", mitigated, guarded)
    summary["headline"] = headline
    if mitigated is not None:
        summary["mitigation"] = {
            "settings": mitigated.settings.get("mitigation"),
            "plain": mitigation_measures(evaluation.rows, threshold),
            "mitigated": mitigation_measures(mitigated.rows, threshold),
        }
    if guarded is not None:
        summary["guard"] = {
            "settings": guard_settings or {},
            "plain": mitigation_measures(evaluation.rows, threshold),
            "guarded": mitigation_measures(guarded.rows, threshold),
            **guard_flag_shares(guarded.rows),
        }
    ranking = detection_ranking(summary)
    examples = copies_figure(evaluation, out / "copies.png", threshold)
    similarity_figure(evaluation, out / "copy_similarity.png", threshold)
    entropy_figure(evaluation, out / "entropy_over_steps.png")
    shares_figure(evaluation, out / "attention_shares.png")
    roc_figure(evaluation, out / "roc.png")
    layer_figure(summary, out / "layer_e_auc.png")
    (out / "summary.json").write_text(json.dumps({**summary, **(extra or {})}, indent=1))
    with (out / "rows.jsonl").open("w") as handle:
        for row in evaluation.rows:
            handle.write(json.dumps(row) + "\n")
    environment = Environment(loader=PackageLoader("memattn.testbed"), autoescape=select_autoescape(["html"]))
    html = environment.get_template("report.html").render(
        summary=summary, examples=examples, extra=extra or {}, rows=evaluation.rows, ranking=ranking
    )
    path = out / "report.html"
    path.write_text(html)
    return path
