"""Generate from a trained testbed pipeline per ground-truth group and measure everything at once.

Per generated image: the testbed's calibrated copy measure (``copy_similarity``: v1, detail similarity
to the nearest training image; v2, correlation outside the object (the background) with the prompt's
own training image or, if higher, with another memorized item's image: leakage;
``measures.OwnImageMatcher``), v1's whole-image pixel correlation with the nearest training image,
attribute alignment, the
detection scores (D, E, E of every layer) and where the attention went (BOS / prompt / summary tokens,
entropy over steps). ``Evaluation.summary()`` turns that into per-group rates and detection metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import memattn
from memattn.detection.baselines import NoiseDifference
from memattn.detection.metrics import detection_metrics
from memattn.mitigation import registry as methods
from memattn.testbed.alignment import CLASSIFIER_FILE, alignment, load_classifier
from memattn.testbed.manifest import dataset_for, load_manifest, scene_of
from memattn.testbed.measures import (
    DetailMatcher,
    OwnImageMatcher,
    copy_threshold_for,
    nearest_training_image,
)
from memattn.testbed.objects import SCENE as OBJECT_SCENE

# Scores the summary's detection table reports (higher = memorized); step-1 ones need one UNet call.
DETECTION_SCORES = (
    "score_d",
    "score_e",
    "e_preregistered",
    "wen_step1",
    "wen_all_steps",
    "minus_bos_share_step0",
    "minus_bos_share",
    "summary_share_step0",
)
STEP1_SCORES = ("score_e", "e_preregistered", "wen_step1", "minus_bos_share_step0", "summary_share_step0")
# E's layer per testbed scene, fixed before the bundled model was trained: on v2 it was chosen on a pilot
# model (6,000 seen-once items, its own training run; AUC 0.96 there) and is the row ``e_preregistered``
# (benchmarks/RESULTS.md, "Testbed v2"). v1 has none: its paper's-layer E is ``score_e``.
PRE_REGISTERED_E_LAYER = {OBJECT_SCENE: "up_blocks.0.attentions.1.transformer_blocks.0.attn2"}
NON_MEMORIZED = ("seen_once", "rare_word_seen_once", "never_seen", "novel_composition")
MEMORIZED = ("memorized_matching", "memorized_template")


@dataclass
class Evaluation:
    """Per-image rows, the generated and nearest training images, and the run's settings."""

    rows: list[dict[str, Any]]
    generated: np.ndarray  # [image, 3, H, W] in [-1, 1]
    nearest: np.ndarray  # [image, 3, H, W]: the training image with the most similar detail
    entropy: np.ndarray  # [image, step] entropy of the layer-mean attention (all 77 tokens)
    summary_entropy: np.ndarray  # [image, step]
    settings: dict[str, Any]
    layer_names: list[str] = field(default_factory=list)

    def column(self, name: str, groups: tuple[str, ...] | None = None) -> np.ndarray:
        return np.array([row[name] for row in self.rows if groups is None or row["group"] in groups])

    def summary(self, copy_threshold: float | None = None, fpr: float = 0.01) -> dict[str, Any]:
        """Per-group copy rate, alignment and attention shares; detection metrics per positive group."""
        threshold = self.settings["copy_threshold"] if copy_threshold is None else copy_threshold
        groups: dict[str, Any] = {}
        for name in dict.fromkeys(row["group"] for row in self.rows):
            rows = [row for row in self.rows if row["group"] == name]
            similarity = np.array([r["copy_similarity"] for r in rows])
            own = np.array([r["nearest_is_own"] for r in rows], dtype=bool)
            entry = {
                "n": len(rows),
                "copy_rate": float((similarity > threshold).mean()),
                "own_copy_rate": float(((similarity > threshold) & own).mean()),
                "leakage_rate": float(((similarity > threshold) & ~own).mean()),
                "median_copy_similarity": float(np.median(similarity)),
                "alignment": float(np.mean([r["alignment"] for r in rows])),
                "all_attributes_right": float(np.mean([r["alignment"] == 1.0 for r in rows])),
                "bos_share": float(np.mean([r["bos_share"] for r in rows])),
                "prompt_share": float(np.mean([r["prompt_share"] for r in rows])),
                "summary_share": float(np.mean([r["summary_share"] for r in rows])),
            }
            if all(r.get("pixel_similarity") is not None for r in rows):  # v1 only (v2: no such measure)
                entry["pixel_copy_rate_0.9"] = float(np.mean([r["pixel_similarity"] > 0.9 for r in rows]))
            duplications = sorted({r["duplication"] for r in rows})
            if name == "memorized_matching" and len(duplications) > 1:
                entry["copy_rate_by_duplication"] = {
                    d: float(
                        np.mean([r["copy_similarity"] > threshold for r in rows if r["duplication"] == d])
                    )
                    for d in duplications
                }
            groups[name] = entry
        detection: dict[str, Any] = {}
        negatives = [row for row in self.rows if row["group"] in NON_MEMORIZED]
        scores = [
            name for name in DETECTION_SCORES if self.rows and np.isfinite(self.rows[0].get(name, np.nan))
        ]
        for positive in ("memorized_matching", "memorized_template"):
            rows = [row for row in self.rows if row["group"] == positive]
            if not rows or not negatives:
                continue
            labels = [1] * len(rows) + [0] * len(negatives)
            for score in scores:
                values = [r[score] for r in rows + negatives]
                detection[f"{positive}/{score}"] = detection_metrics(labels, values, fpr)
            detection[f"{positive}/layer_e_auc"] = [
                detection_metrics(labels, [r["layer_e"][i] for r in rows + negatives], fpr)["auc"]
                for i in range(len(self.layer_names))
            ]
        by_group: dict[str, dict[str, float]] = {}  # memorized vs each non-memorized group alone
        layer_by_group: dict[str, list[float]] = {}  # the same for E in every layer (forward order)
        positives = [row for row in self.rows if row["group"] in ("memorized_matching", "memorized_template")]
        for group in NON_MEMORIZED:
            members = [row for row in negatives if row["group"] == group]
            if not members or not positives:
                continue
            labels = [1] * len(positives) + [0] * len(members)
            by_group[group] = {
                score: detection_metrics(labels, [r[score] for r in positives + members], fpr)["auc"]
                for score in scores
            }
            layer_by_group[group] = [
                detection_metrics(labels, [r["layer_e"][i] for r in positives + members], fpr)["auc"]
                for i in range(len(self.layer_names))
            ]
        copied = [row for row in self.rows if row["copy_similarity"] > threshold]
        clean = [row for row in negatives if row["copy_similarity"] <= threshold]
        if copied and clean:  # outcome-based: does the score flag the generations that are copies?
            labels = [1] * len(copied) + [0] * len(clean)
            for score in ("score_d", "score_e"):
                values = [r[score] for r in copied + clean]
                detection[f"copies/{score}"] = detection_metrics(labels, values, fpr)
        null = np.array([row["copy_similarity"] for row in negatives])
        return {
            **self.settings,
            "copy_threshold": threshold,
            "non_memorized_copy_similarity": {
                "max": float(null.max()) if len(null) else None,
                "p99": float(np.quantile(null, 0.99)) if len(null) else None,
                "median": float(np.median(null)) if len(null) else None,
            },
            "groups": groups,
            "detection_vs_non_memorized": detection,
            "detection_auc_by_negative_group": by_group,
            "layer_e_auc_by_negative_group": layer_by_group,
            "non_memorized_groups": [g for g in NON_MEMORIZED if g in groups],
            "cross_attention_layers": self.layer_names,
        }


def mitigation_measures(
    rows: list[dict[str, Any]],
    threshold: float,
    clean_groups: tuple[str, ...] = ("never_seen", "novel_composition"),
) -> dict[str, float]:
    """What a mitigation trades: copying of the 128-copy items and templates vs clean-prompt alignment."""
    heavy = [r for r in rows if r["group"] == "memorized_matching" and r["duplication"] == 128]
    template = [r for r in rows if r["group"] == "memorized_template"]
    clean = [r for r in rows if r["group"] in clean_groups]

    def mean(values: list) -> float:
        return float(np.mean(values)) if values else float("nan")

    return {
        "copy_rate_128": mean([r["copy_similarity"] > threshold for r in heavy]),
        "similarity_128": mean([r["copy_similarity"] for r in heavy]),
        "alignment_128": mean([r["alignment"] for r in heavy]),
        "copy_rate_template": mean([r["copy_similarity"] > threshold for r in template]),
        "similarity_template": mean([r["copy_similarity"] for r in template]),
        "alignment_clean": mean([r["alignment"] for r in clean]),
        "all_attributes_clean": mean([r["alignment"] == 1.0 for r in clean]),
    }


def _pick(items: list, per_group: int, rng: np.random.Generator) -> list:
    if len(items) <= per_group:
        return items
    return [items[i] for i in sorted(rng.choice(len(items), per_group, replace=False))]


def evaluate(
    model: Path,
    *,
    guidance_scale: float = 2.0,
    steps: int = 25,
    per_group: int = 48,
    seeds: int = 1,
    groups: tuple[str, ...] | None = None,
    copy_threshold: float | None = None,
    batch_size: int = 64,
    pipe: Any = None,
    mitigation: dict[str, Any] | None = None,
    baseline: dict[str, Any] | None = None,
    prompt_transform: Callable[[list[str]], list[str]] | None = None,
    guard: Any = None,
    progress: bool = True,
) -> Evaluation:
    """Generate ``per_group`` prompts x ``seeds`` per group (seed of image = 1000·seed + item id).

    ``mitigation``: keyword arguments of ``memattn.mitigate`` (e.g. ``{"c": 1.25}``) to generate under it.
    ``baseline``: ``{"method": NAME, "strength": VALUE}``, any registered method (strength optional;
    ``memattn.mitigation.registry``); ``prompt_transform`` rewrites each batch's captions (analysis:
    paraphrases). ``guard``: a :class:`memattn.Guard` on ``pipe`` generates instead of the plain call
    (its verdicts land in each row: ``guard_score``, ``guard_flagged``).
    Copies and alignment are still judged against each item's own caption and image.
    ``copy_threshold``: None takes the testbed's calibrated one (``measures.copy_threshold_for``).
    """
    from contextlib import nullcontext

    from memattn.loading import load_pipeline
    from memattn.mitigation.cross_attention import mitigate

    model = Path(model)
    manifest = load_manifest(model)
    dataset = dataset_for(model)
    scene = scene_of(model)
    copy_threshold = copy_threshold_for(scene) if copy_threshold is None else copy_threshold
    pipe = pipe if pipe is not None else load_pipeline(str(model), progress_bar=False)
    classifier, _ = load_classifier(model / CLASSIFIER_FILE)
    train_items = [item for item in dataset.items if item.duplication > 0]
    if scene == OBJECT_SCENE:
        memorized = [item for item in train_items if item.group == "memorized_matching"]
        matcher: Any = OwnImageMatcher(dataset, train_items, memorized)
    else:
        matcher = DetailMatcher.for_items(dataset, train_items)
        train_images = dataset.images(train_items)
    rng = np.random.default_rng(0)
    jobs = [
        (item, seed)
        for group in (groups or tuple(manifest["groups"]))
        for item in _pick(list(dataset.group(group)), per_group, rng)
        for seed in range(seeds)
    ]
    rows: list[dict[str, Any]] = []
    generated, entropy, summary_entropy = [], [], []
    layer_names: list[str] = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="testbed evaluation", disable=not progress):
        batch = jobs[start : start + batch_size]
        generators = [torch.Generator().manual_seed(1000 * seed + item.item_id) for item, seed in batch]
        edit = mitigate(pipe, **mitigation) if mitigation is not None else nullcontext()
        captions = [item.caption for item, _ in batch]
        if prompt_transform is not None:
            captions = prompt_transform(captions)
        other: Any = nullcontext()
        if baseline is not None:
            prepared = methods.prepare(
                pipe, baseline["method"], captions, baseline.get("strength"), seed=start, steps=steps
            )
            captions, other = prepared.prompts, prepared.context
        # Wen's scores only for plain generation: a method's extra UNet calls would enter the norms.
        plain = mitigation is None and baseline is None and guard is None and guidance_scale > 1
        noise = NoiseDifference(pipe) if plain else nullcontext()
        verdicts: list[Any] = [None] * len(batch)
        with edit, other, memattn.trace(pipe) as tr, noise as nd:
            output = (guard if guard is not None else pipe)(
                captions,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generators,
                output_type="np",
            )
            images = output.images
            verdicts = list(getattr(output, "verdicts", verdicts))
        record = tr.record
        layer_names = list(record.layer_names)
        generated.append(images.transpose(0, 3, 1, 2) * 2 - 1)
        mean = memattn.detection.scores.mean_attention(record)  # [step, image, token]
        entropy.append(memattn.entropy_curve(record).T.numpy())
        summary_entropy.append(memattn.summary_entropy_curve(record).T.numpy())
        d, e = memattn.score_d(record).tolist(), memattn.score_e(record).tolist()
        chosen = PRE_REGISTERED_E_LAYER.get(scene)
        e_pre = (
            memattn.score_e(record, chosen).tolist()
            if chosen in record.layer_names
            else [float("nan")] * len(batch)
        )
        wen1 = nd.wen(1).tolist() if nd is not None else [float("nan")] * len(batch)
        wen_all = nd.wen(len(nd.norms)).tolist() if nd is not None else [float("nan")] * len(batch)
        per_layer = memattn.layer_entropy_curves(record)[0].T.tolist()  # [image, layer] at step 0
        for i, (item, seed) in enumerate(batch):
            eos = record.layouts[i].eos_index
            rows.append(
                {
                    "group": item.group,
                    "caption": item.caption,
                    "item_id": item.item_id,
                    "template_id": item.template_id,
                    "duplication": item.duplication,
                    "seed": seed,
                    "score_d": d[i],
                    "score_e": e[i],
                    "e_preregistered": e_pre[i],
                    "wen_step1": wen1[i],
                    "wen_all_steps": wen_all[i],
                    "layer_e": per_layer[i],
                    "bos_share": float(mean[:, i, 0].mean()),
                    "prompt_share": float(mean[:, i, 1:eos].sum(-1).mean()),
                    "summary_share": float(mean[:, i, eos:].sum(-1).mean()),
                    "bos_share_step0": float(mean[0, i, 0]),
                    "minus_bos_share_step0": -float(mean[0, i, 0]),
                    "minus_bos_share": -float(mean[:, i, 0].mean()),
                    "summary_share_step0": float(mean[0, i, eos:].sum()),
                    **(
                        {"guard_score": verdicts[i].score, "guard_flagged": verdicts[i].flagged}
                        if verdicts[i] is not None
                        else {}
                    ),
                }
            )
    images = np.concatenate(generated) if generated else np.zeros((0, 3, 1, 1), np.float32)
    if scene == OBJECT_SCENE:  # the nearest of all training images is no copy measure here (RESULTS.md)
        by_detail = matcher.match(images, [row["item_id"] for row in rows])
        pixel_similarity: list[float | None] = [None] * len(images)
        nearest_images = matcher.images(by_detail.index) if len(images) else images
    else:
        by_detail = matcher.match(images)
        pixel_similarity = nearest_training_image(images, train_images).similarity.tolist()
        nearest_images = train_images[by_detail.index] if len(images) else images
    aligned = alignment(classifier, images, [dataset.items[row["item_id"]].attributes for row in rows])
    for i, row in enumerate(rows):
        nearest = train_items[int(by_detail.index[i])]
        own = nearest.item_id == row["item_id"] or (
            row["template_id"] is not None and nearest.template_id == row["template_id"]
        )
        row.update(
            copy_similarity=float(by_detail.similarity[i]),
            nearest_item_id=nearest.item_id,
            nearest_group=nearest.group,
            nearest_is_own=bool(own),
            pixel_similarity=pixel_similarity[i],
            alignment=float(aligned.accuracy[i]),
            attributes_correct=aligned.correct[i].tolist(),
        )
    settings = {
        "model": str(model),
        "guidance_scale": guidance_scale,
        "steps": steps,
        "per_group": per_group,
        "seeds": seeds,
        "copy_threshold": copy_threshold,
        "copy_measure": "background correlation" if scene == OBJECT_SCENE else "detail similarity",
        "scene": scene,
        "mitigation": mitigation,
        "baseline": baseline,
    }
    return Evaluation(
        rows=rows,
        generated=images,
        nearest=nearest_images,
        entropy=np.concatenate(entropy) if entropy else np.zeros((0, steps)),
        summary_entropy=np.concatenate(summary_entropy) if summary_entropy else np.zeros((0, steps)),
        settings=settings,
        layer_names=layer_names,
    )
