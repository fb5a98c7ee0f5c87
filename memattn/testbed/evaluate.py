"""Generate from a trained testbed pipeline per ground-truth group: copy rate and detection scores."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

import memattn
from memattn.testbed.data import TestbedConfig, build_dataset
from memattn.testbed.measures import nearest_training_image


@dataclass
class GroupResult:
    """Per generated image of one group: similarity to the nearest training image and scores."""

    group: str
    captions: list[str] = field(default_factory=list)
    duplication: list[int] = field(default_factory=list)
    similarity: list[float] = field(default_factory=list)
    nearest_is_own: list[bool] = field(default_factory=list)
    score_d: list[float] = field(default_factory=list)
    score_e: list[float] = field(default_factory=list)
    layer_e: list[list[float]] = field(default_factory=list)
    bos_share: list[float] = field(default_factory=list)
    summary_share: list[float] = field(default_factory=list)


def load_manifest(model: Path) -> dict[str, Any]:
    return json.loads((model / "memattn_testbed.json").read_text())


def evaluate(
    model: Path,
    *,
    guidance_scale: float = 2.0,
    steps: int = 25,
    per_group: int = 48,
    seeds: int = 1,
    copy_threshold: float = 0.9,
    batch_size: int = 48,
    progress: bool = True,
) -> dict[str, Any]:
    """Copy rate per group (nearest training image correlation > threshold), D/E AUCs, attention shares."""
    from memattn.loading import load_pipeline

    manifest = load_manifest(model)
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in manifest["config"]["data"].items()}
    dataset = build_dataset(manifest["seed"], TestbedConfig(**raw))
    pipe = load_pipeline(str(model))
    train_items = [item for item in dataset.items if item.duplication > 0]
    train_images = dataset.images(train_items)
    train_index = {item.item_id: i for i, item in enumerate(train_items)}
    results: dict[str, GroupResult] = {}
    rng = np.random.default_rng(0)
    for group in manifest["groups"]:
        items = list(dataset.group(group))
        if len(items) > per_group:
            items = [items[i] for i in sorted(rng.choice(len(items), per_group, replace=False))]
        result = results[group] = GroupResult(group)
        jobs = [(item, seed) for item in items for seed in range(seeds)]
        for start in tqdm(range(0, len(jobs), batch_size), desc=group, disable=not progress):
            batch = jobs[start : start + batch_size]
            generators = [torch.Generator().manual_seed(1000 * seed + item.item_id) for item, seed in batch]
            with memattn.trace(pipe) as tr:
                images = pipe(
                    [item.caption for item, _ in batch],
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    generator=generators,
                    output_type="np",
                ).images
            generated = images.transpose(0, 3, 1, 2) * 2 - 1
            match = nearest_training_image(generated, train_images)
            record = tr.record
            mean = memattn.scores.mean_attention(record)  # [step, image, token]
            for i, (item, _) in enumerate(batch):
                layout = record.layouts[i]
                result.captions.append(item.caption)
                result.duplication.append(item.duplication)
                result.similarity.append(float(match.similarity[i]))
                result.nearest_is_own.append(train_index.get(item.item_id) == int(match.index[i]))
                result.bos_share.append(float(mean[:, i, 0].mean()))
                result.summary_share.append(float(mean[:, i, layout.eos_index :].sum(-1).mean()))
            result.score_d += memattn.score_d(record).tolist()
            result.score_e += memattn.score_e(record).tolist()
            per_layer = memattn.layer_entropy_curves(record)[0]  # [layer, image]
            result.layer_e += per_layer.T.tolist()
    return summarize(results, copy_threshold, guidance_scale, steps, pipe)


def summarize(results: dict[str, GroupResult], threshold: float, guidance: float, steps: int, pipe) -> dict:
    groups = {}
    for name, r in results.items():
        sim = np.array(r.similarity)
        entry = {
            "n": len(sim),
            "copy_rate": float((sim > threshold).mean()) if len(sim) else None,
            "median_similarity": float(np.median(sim)) if len(sim) else None,
            "bos_share": float(np.mean(r.bos_share)),
            "summary_share": float(np.mean(r.summary_share)),
        }
        if name == "memorized_matching":
            dup = np.array(r.duplication)
            entry["copy_rate_by_duplication"] = {
                int(d): float((sim[dup == d] > threshold).mean()) for d in sorted(set(dup.tolist()))
            }
        groups[name] = entry
    aucs = {}
    negatives = [g for g in ("seen_once", "never_seen") if g in results]
    positives = [g for g in ("memorized_matching", "memorized_template") if g in results]
    n_negative = sum(len(results[n].score_d) for n in negatives)
    for pos in positives:
        y = np.array([1] * len(results[pos].score_d) + [0] * n_negative)
        for score in ("score_d", "score_e"):
            values = getattr(results[pos], score) + sum((getattr(results[n], score) for n in negatives), [])
            aucs[f"{pos}/{score}"] = float(roc_auc_score(y, values))
        layers = np.array(results[pos].layer_e + sum((results[n].layer_e for n in negatives), []))
        aucs[f"{pos}/layer_e"] = [float(roc_auc_score(y, layers[:, i])) for i in range(layers.shape[1])]
    names = list(pipe.unet.attn_processors)
    return {
        "guidance_scale": guidance,
        "steps": steps,
        "copy_threshold": threshold,
        "groups": groups,
        "auc_vs_seen_once_and_never_seen": aucs,
        "cross_attention_layers": [n.removesuffix(".processor") for n in names if "attn2" in n],
    }
