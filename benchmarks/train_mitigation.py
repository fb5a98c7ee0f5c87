"""Training-time mitigation on the testbed: every rule, same seed, data and budget.

Every run starts from the same untrained testbed model (``memattn.training.untrained_testbed``: exactly
what ``memattn testbed train`` starts from) and trains on the recipe's data — heavy duplication: in
the fast recipe 4 items × 128 copies and 4 × 32 plus 2 templates × 32 copies are 62 % of the 1,144
training pairs — with the recipe's hyperparameters through ``memattn finetune`` (``--mitigation none``
reproduces ``memattn testbed train`` bit for bit). Then, per rule:

- copy rate of the most duplicated items and of the templates, clean-prompt alignment
  (``memattn.testbed.evaluate``, guidance 2, 25 DDIM steps, the same prompts and seeds for every rule);
- final loss, drop rate, precision/recall of the dropped samples against the known duplicates (the
  memorized groups), drop rate per group (from the per-step log);
- wall time: each run's training seconds, and the overhead vs ``none`` measured side by side (all
  rules' trainers built at once and timed in interleaved rounds of a few steps on the same machine).

Rules that need a number get it label-free from a first ``monitor`` run (``--mitigation none
--monitor``: both signals logged for every sample, weights identical to ``none``): a fixed threshold
is the 90th (drop high) or 10th (drop low) percentile of the monitor run's scores over the second half
of training. The monitor run also says which signal separates duplicates at all (AUC of each signal,
per layer, within timestep bins, and per sixth of training for the most duplicated items vs seen-once
ones); which direction works is measured, both are run. The ``random-drop-*`` rules are the control:
blind drops at 10/20/30/50 %, and every rule is compared with them at its own drop rate.

Recipes: ``fast``/``full`` train testbed v1 (``testbed-detail``: fine-detail and template copies);
``objects-fast``/``objects`` train testbed v2 (``testbed``: whole-image copies on random backgrounds, the
EOS-copy text encoder pre-trained first and frozen; no templates, so the template column is empty).

Usage:
    .venv/bin/python benchmarks/train_mitigation.py --out artifacts/train-mitigation   # fast recipe
    .venv/bin/python benchmarks/train_mitigation.py --recipe objects-fast --out /tmp/tm-v2   # v2
    .venv/bin/python benchmarks/train_mitigation.py --recipe full --rules none,entropy-z-running-high
    .venv/bin/python benchmarks/train_mitigation.py --quick --out /tmp/tm-quick          # seconds
The run is resumable: rerun the same command and finished runs/evaluations are reused, a killed
run resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memattn.cli.finetune import cli_args
from memattn.quiet import quiet_loading
from memattn.testbed.data import MEMORIZED_GROUPS, TestbedConfig
from memattn.testbed.model import ModelConfig
from memattn.testbed.objects import ObjectsConfig
from memattn.testbed.train import (
    DETAIL,
    DETAIL_FAST,
    OBJECTS,
    OBJECTS_FAST,
    TrainConfig,
    from_testbed_recipe,
    untrained_testbed,
)
from memattn.training import (
    MitigationConfig,
    finetune,
    read_log,
)

QUICK = TrainConfig(
    steps=8,
    batch_size=8,
    checkpoint_every=4,
    classifier_steps=5,
    data=TestbedConfig(
        matching_counts=(4, 16),
        matching_items_per_count=2,
        n_templates=1,
        template_copies=4,
        seen_once=20,
        rare_word_seen_once=4,
        never_seen=4,
        novel_composition=4,
    ),
    model=ModelConfig(block_out_channels=(32, 32, 32), text_hidden=32, text_layers=1),
)
QUICK_OBJECTS = replace(  # the same smoke run on testbed v2 data (pre-trained EOS-copy encoder)
    OBJECTS_FAST,
    steps=8,
    batch_size=8,
    checkpoint_every=4,
    classifier_steps=5,
    text_pretrain_steps=2,
    text_pretrain_batch=16,
    data=ObjectsConfig(
        matching_items_per_count=2, matching_counts=(16,), seen_once=20, rare_word_seen_once=4, never_seen=4
    ),
    model=ModelConfig(block_out_channels=(32, 32, 32), text_hidden=32, text_layers=1),
)
# testbed v1 (testbed-detail): fast, full; testbed v2 (testbed): objects-fast, objects (the bundled recipe)
RECIPES = {"fast": DETAIL_FAST, "full": DETAIL, "objects-fast": OBJECTS_FAST, "objects": OBJECTS}
CLEAN_GROUPS = ("never_seen", "novel_composition")
RANDOM_DROP_RATES = (0.1, 0.2, 0.3, 0.5)  # the fast recipe ran the first three
TARGETS = {"copy_rate_ratio": 0.10, "alignment_drop": 0.02, "overhead": 1.05}


@dataclass(frozen=True)
class Calibration:
    """Label-free numbers from the monitor run: percentiles of each signal over its second half."""

    entropy_q10: float
    entropy_q90: float
    noise_norm_q10: float
    noise_norm_q90: float


def rules(cal: Calibration, window: int) -> dict[str, MitigationConfig]:
    """Every rule the benchmark runs (names are stable: RESULTS.md refers to them)."""
    z_running = dict(rule="zscore", z=2.0, window=window, timestep_bins=10, min_samples=32)
    return {
        "none": MitigationConfig(),
        "entropy-fixed-high": MitigationConfig(kind="entropy", rule="fixed", threshold=cal.entropy_q90),
        "entropy-fixed-low": MitigationConfig(
            kind="entropy", rule="fixed", threshold=cal.entropy_q10, drop="low"
        ),
        "entropy-z-batch-high": MitigationConfig(kind="entropy", rule="zscore", z=2.0),
        "entropy-z-batch-low": MitigationConfig(kind="entropy", rule="zscore", z=2.0, drop="low"),
        "entropy-z-running-high": MitigationConfig(kind="entropy", **z_running),
        "entropy-z-running-low": MitigationConfig(kind="entropy", drop="low", **z_running),
        "noise-norm-wen-tau2": MitigationConfig(kind="noise-norm", rule="fixed", threshold=2.0),
        "noise-norm-fixed-q90": MitigationConfig(
            kind="noise-norm", rule="fixed", threshold=cal.noise_norm_q90
        ),
        "noise-norm-z-running-high": MitigationConfig(kind="noise-norm", **z_running),
        "caption-aug": MitigationConfig(kind="caption-aug", caption_aug_prob=0.1, caption_aug_tokens=2),
        # The control: blind drops at fixed rates. A filter earns its cost only if it beats this curve
        # (copy rate vs drop rate) at its own drop rate.
        **{
            f"random-drop-{p:.1f}": MitigationConfig(kind="random-drop", drop_prob=p)
            for p in RANDOM_DROP_RATES
        },
    }


# ---- training-log measures -----------------------------------------------------------------------------


def truth_of(base: Path) -> dict[int, dict[str, Any]]:
    from memattn.testbed.manifest import dataset_for

    return {
        item.item_id: {
            "group": item.group,
            "duplication": item.duplication,
            "memorized": item.group in MEMORIZED_GROUPS,
        }
        for item in dataset_for(base).items
    }


def samples(log: list[dict], since: float = 0.0) -> list[dict[str, Any]]:
    """One row per captioned sample (uncaptioned ones are never judged) of steps after ``since``."""
    first = int(len(log) * since)
    out = []
    for entry in log[first:]:
        dropped = set(entry["dropped_at"])
        no_caption = set(entry["no_caption"])
        for i, sample_id in enumerate(entry["ids"]):
            if i in no_caption:
                continue
            row = {
                "id": sample_id,
                "t": entry["timesteps"][i],
                "dropped": i in dropped,
                "step": entry["step"],
            }
            for signal in ("entropy", "noise_norm"):
                if signal in entry:
                    row[signal] = entry[signal][i]
            if "layer_entropy" in entry:
                row["layers"] = entry["layer_entropy"][i]
            out.append(row)
    return out


def log_measures(log: list[dict], truth: dict[int, dict]) -> dict[str, Any]:
    rows = samples(log)
    memorized = np.array([truth[r["id"]]["memorized"] for r in rows], bool)
    dropped = np.array([r["dropped"] for r in rows], bool)
    tail = max(1, len(log) // 10)
    groups = {}
    for name in sorted({truth[r["id"]]["group"] for r in rows}):
        mask = np.array([truth[r["id"]]["group"] == name for r in rows])
        groups[name] = float(dropped[mask].mean()) if mask.any() else float("nan")
    by_dup = {}
    for count in sorted(
        {truth[r["id"]]["duplication"] for r in rows if truth[r["id"]]["group"] == "memorized_matching"}
    ):
        mask = np.array(
            [
                truth[r["id"]]["group"] == "memorized_matching" and truth[r["id"]]["duplication"] == count
                for r in rows
            ]
        )
        by_dup[str(count)] = float(dropped[mask].mean())
    true_drops = int((dropped & memorized).sum())
    return {
        "steps": len(log),
        "final_loss": float(np.mean([e["loss"] for e in log[-tail:]])),
        "drop_rate": float(np.mean([e["dropped"] / e["n"] for e in log])),
        "drop_rate_captioned": float(dropped.mean()) if len(dropped) else 0.0,
        "precision": true_drops / int(dropped.sum()) if dropped.any() else float("nan"),
        "recall": true_drops / int(memorized.sum()) if memorized.any() else float("nan"),
        "drop_rate_by_group": groups,
        "drop_rate_matching_by_duplication": by_dup,
        "augmented_rate": float(np.mean([len(e["augmented"]) / e["n"] for e in log])),
        "training_seconds": float(sum(e["seconds"] for e in log)),
    }


def signal_analysis(log: list[dict], truth: dict[int, dict], bins: int = 10) -> dict[str, Any]:
    """AUC (memorized = positive) of each monitored signal; > 0.5: memorized samples score higher."""
    from sklearn.metrics import roc_auc_score

    rows = samples(log, since=0.5)
    labels = np.array([truth[r["id"]]["memorized"] for r in rows], int)
    t = np.array([r["t"] for r in rows])
    if labels.min() == labels.max():
        return {"note": "one class only"}

    def auc(values: np.ndarray) -> float:
        return float(roc_auc_score(labels, values))

    def within_bins(values: np.ndarray) -> np.ndarray:  # percentile rank inside its timestep bin
        ranks = np.zeros(len(values))
        which = np.minimum((t * bins) // 1000, bins - 1)
        for b in range(bins):
            mask = which == b
            if mask.sum() > 1:
                ranks[mask] = values[mask].argsort().argsort() / (mask.sum() - 1)
        return ranks

    out: dict[str, Any] = {"samples": len(rows), "memorized_share": float(labels.mean())}
    for signal in ("entropy", "noise_norm"):
        values = np.array([r[signal] for r in rows])
        thirds = {}
        for lo, hi in ((0, 333), (333, 666), (666, 1000)):
            mask = (t >= lo) & (t < hi)
            if labels[mask].min() != labels[mask].max():
                thirds[f"t{lo}-{hi}"] = float(roc_auc_score(labels[mask], values[mask]))
        out[signal] = {"auc": auc(values), "auc_within_timestep_bins": auc(within_bins(values)), **thirds}
    if rows and "layers" in rows[0]:
        layers = np.array([r["layers"] for r in rows])
        out["entropy_per_layer_auc"] = [auc(layers[:, i]) for i in range(layers.shape[1])]
        out["entropy_per_layer_auc_within_bins"] = [
            auc(within_bins(layers[:, i])) for i in range(layers.shape[1])
        ]
    return out


def phase_analysis(log: list[dict], truth: dict[int, dict], phases: int = 6) -> dict[str, Any]:
    """AUC of each signal for the most duplicated items vs seen-once samples, per sixth of training and
    timestep half: whether (and when) the signal that a rule would threshold tells them apart."""
    from sklearn.metrics import roc_auc_score

    rows = samples(log)
    group = [truth[r["id"]]["group"] for r in rows]
    duplication = [truth[r["id"]]["duplication"] for r in rows]
    top_count = max(
        (d for g, d in zip(group, duplication, strict=True) if g == "memorized_matching"), default=0
    )
    top = np.array(
        [g == "memorized_matching" and d == top_count for g, d in zip(group, duplication, strict=True)]
    )
    once = np.array([g == "seen_once" for g in group])
    step, t = np.array([r["step"] for r in rows]), np.array([r["t"] for r in rows])
    edges = np.linspace(0, len(log), phases + 1).astype(int)
    out: dict[str, Any] = {"positives": f"memorized_matching x{top_count}", "negatives": "seen_once"}
    for signal in ("entropy", "noise_norm"):
        values = np.array([r[signal] for r in rows])
        table = []
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            row: dict[str, Any] = {"steps": f"{lo + 1}-{hi}"}
            for name, (t_lo, t_hi) in {"t<333": (0, 333), "t>=333": (333, 1000)}.items():
                mask = (step > lo) & (step <= hi) & (t >= t_lo) & (t < t_hi) & (top | once)
                if top[mask].any() and once[mask].any():
                    row[name] = float(roc_auc_score(top[mask], values[mask]))
            table.append(row)
        out[signal] = table
    return out


def calibrate(log: list[dict]) -> Calibration:
    rows = samples(log, since=0.5)
    entropy = np.array([r["entropy"] for r in rows])
    norm = np.array([r["noise_norm"] for r in rows])
    return Calibration(
        entropy_q10=float(np.quantile(entropy, 0.1)),
        entropy_q90=float(np.quantile(entropy, 0.9)),
        noise_norm_q10=float(np.quantile(norm, 0.1)),
        noise_norm_q90=float(np.quantile(norm, 0.9)),
    )


# ---- generation measures -------------------------------------------------------------------------------


def generation_measures(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    from memattn.testbed.evaluate import evaluate
    from memattn.testbed.manifest import load_manifest, scene_of
    from memattn.testbed.measures import copy_threshold_for

    common = dict(
        guidance_scale=args.guidance, steps=args.eval_steps, per_group=args.eval_per_group, progress=False
    )
    rows = []
    rows += evaluate(model, groups=("memorized_matching",), seeds=args.eval_seeds_memorized, **common).rows
    known = set(load_manifest(model)["groups"])  # v2 has no templates and no novel compositions
    others = tuple(g for g in ("memorized_template", *CLEAN_GROUPS) if g in known)
    rows += evaluate(model, groups=others, seeds=args.eval_seeds, **common).rows
    threshold = copy_threshold_for(scene_of(model))  # v1: 0.55 on the detail; v2: 0.8 on the background
    matching = [r for r in rows if r["group"] == "memorized_matching"]
    top = max((r["duplication"] for r in matching), default=0)
    by_dup = {
        str(d): float(np.mean([r["copy_similarity"] > threshold for r in matching if r["duplication"] == d]))
        for d in sorted({r["duplication"] for r in matching})
    }
    heavy = [r for r in matching if r["duplication"] == top]
    template = [r for r in rows if r["group"] == "memorized_template"]
    clean = [r for r in rows if r["group"] in CLEAN_GROUPS]

    def mean(values: list) -> float:
        return float(np.mean(values)) if values else float("nan")

    return {
        "top_duplication": top,
        "copy_rate_top": mean([r["copy_similarity"] > threshold for r in heavy]),
        "similarity_top": mean([r["copy_similarity"] for r in heavy]),
        "copy_rate_by_duplication": by_dup,
        "copy_rate_template": mean([r["copy_similarity"] > threshold for r in template]),
        "alignment_clean": mean([r["alignment"] for r in clean]),
        "all_attributes_clean": mean([r["alignment"] == 1.0 for r in clean]),
        "copy_rate_clean": mean([r["copy_similarity"] > threshold for r in clean]),
        "generations": len(rows),
    }


# ---- side-by-side overhead -----------------------------------------------------------------------------


def overhead(
    base: Path,
    recipe: TrainConfig,
    mitigations: dict[str, MitigationConfig],
    work: Path,
    steps: int,
    rounds: int,
) -> dict[str, Any]:
    """Per-step wall time of every rule, timed in interleaved rounds (rule order rotates each round)."""
    from memattn.training import Finetuner

    tuners = {}
    for name, mitigation in mitigations.items():
        config = from_testbed_recipe(recipe, base, work / name, mitigation)
        tuner = Finetuner(config)
        tuner.__enter__()
        for _ in range(2):  # warm-up (allocator, first-call costs)
            tuner.train_step()
        tuners[name] = tuner
    times: dict[str, list[float]] = {name: [] for name in tuners}
    names = list(tuners)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            started = time.perf_counter()
            for _ in range(steps):
                tuners[name].train_step()
            times[name].append((time.perf_counter() - started) / steps)
    for tuner in tuners.values():
        tuner.__exit__(None, None, None)
    reference = statistics.median(times["none"])
    return {
        name: {
            "median_step_seconds": statistics.median(values),
            "ratio_vs_none": statistics.median(values) / reference,
            "per_round": values,
        }
        for name, values in times.items()
    }


# ---- main ----------------------------------------------------------------------------------------------


def run_one(
    name: str,
    mitigation: MitigationConfig,
    base: Path,
    recipe: TrainConfig,
    out: Path,
    args: argparse.Namespace,
    truth: dict,
) -> dict[str, Any]:
    run = out / "runs" / name
    config = from_testbed_recipe(recipe, base, run, mitigation, resume_from_checkpoint="latest")
    started = time.time()
    finetune(config, command="memattn finetune " + " ".join(cli_args(config)))
    wall = time.time() - started
    result: dict[str, Any] = {
        "rule": name,
        "mitigation": asdict(mitigation),
        "command": "memattn finetune " + " ".join(cli_args(config)),
        "wall_seconds_this_session": round(wall, 1),
        **log_measures(read_log(run), truth),
    }
    cached = run / "eval.json"
    settings = [
        args.guidance,
        args.eval_steps,
        args.eval_per_group,
        args.eval_seeds,
        args.eval_seeds_memorized,
    ]
    previous = json.loads(cached.read_text()) if cached.is_file() else {}
    if previous.get("settings") == settings:
        result.update(previous["measures"])
    else:
        measures = generation_measures(run / "pipeline", args)
        cached.write_text(json.dumps({"settings": settings, "measures": measures}))
        result.update(measures)
    return result


def control_curve(results: dict[str, dict], measure: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(drop rate, measure) of `none` and the random-drop runs, sorted: what blind dropping buys."""
    points = [(0.0, results["none"][measure])] + [
        (r["drop_rate_captioned"], r[measure]) for n, r in results.items() if n.startswith("random-drop")
    ]
    if len(points) < 2:
        return None
    points.sort()
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def at_drop_rate(curve: tuple[np.ndarray, np.ndarray] | None, rate: float) -> float:
    """The control's value at ``rate``, interpolated; NaN beyond its largest drop rate (no extrapolation)."""
    if curve is None or rate > curve[0][-1] + 1e-9:
        return float("nan")
    return float(np.interp(rate, *curve))


def verdicts(results: dict[str, dict], timing: dict[str, dict] | None) -> dict[str, dict[str, Any]]:
    none = results["none"]
    copy_curve = control_curve(results, "copy_rate_top")
    align_curve = control_curve(results, "alignment_clean")
    out = {}
    for name, r in results.items():
        ratio = r["copy_rate_top"] / none["copy_rate_top"] if none["copy_rate_top"] > 0 else float("nan")
        over = timing[name]["ratio_vs_none"] if timing and name in timing else float("nan")
        out[name] = {
            "copy_rate_ratio_vs_none": ratio,
            "alignment_change": r["alignment_clean"] - none["alignment_clean"],
            "overhead": over,
            "meets_copy_target": bool(ratio <= TARGETS["copy_rate_ratio"]),
            "meets_alignment_target": bool(
                r["alignment_clean"] >= none["alignment_clean"] - TARGETS["alignment_drop"]
            ),
            "meets_overhead_target": bool(over <= TARGETS["overhead"]),
            "random_drop_copy_rate_at_same_drop_rate": at_drop_rate(copy_curve, r["drop_rate_captioned"]),
            "random_drop_alignment_at_same_drop_rate": at_drop_rate(align_curve, r["drop_rate_captioned"]),
        }
    return out


def print_table(results: dict[str, dict], judged: dict[str, dict]) -> None:
    head = (
        f"{'rule':28} {'copy top':>8} {'templ':>6} {'align':>6} {'loss':>7} {'drop':>6} "
        f"{'prec':>5} {'rec':>5} {'s/step':>7} {'x none':>6} {'blind':>6}  targets (copy/align/time)"
    )
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        j = judged[name]
        marks = "/".join(
            "y" if j[k] else "n"
            for k in ("meets_copy_target", "meets_alignment_target", "meets_overhead_target")
        )
        per_step = r["training_seconds"] / max(r["steps"], 1)
        blind = j["random_drop_copy_rate_at_same_drop_rate"]  # the control's copy rate at this drop rate
        print(
            f"{name:28} {r['copy_rate_top']:8.2f} {r['copy_rate_template']:6.2f} {r['alignment_clean']:6.3f} "
            f"{r['final_loss']:7.4f} {r['drop_rate']:6.1%} {r['precision']:5.2f} {r['recall']:5.2f} "
            f"{per_step:7.3f} {j['overhead']:6.3f} {blind:6.2f}  {marks}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("artifacts/train-mitigation"))
    parser.add_argument("--recipe", choices=tuple(RECIPES), default="fast")
    parser.add_argument("--quick", action="store_true", help="tiny recipe and evaluation: a smoke run")
    parser.add_argument("--rules", default="all", help="comma-separated rule names (default all)")
    parser.add_argument("--window", type=int, default=512, help="running z-score window per timestep bin")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--eval-steps", type=int, default=25)
    parser.add_argument("--eval-per-group", type=int, default=48)
    parser.add_argument("--eval-seeds", type=int, default=2, help="seeds per template / clean prompt")
    parser.add_argument("--eval-seeds-memorized", type=int, default=8, help="seeds per duplicated item")
    parser.add_argument("--timing-steps", type=int, default=5, help="steps per rule per timing round")
    parser.add_argument("--timing-rounds", type=int, default=6)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--none-from-monitor",
        action="store_true",
        help="take the `none` row from the monitor run (its weights are bit-identical: "
        "tests/test_finetune.py::test_monitoring_changes_no_weight) instead of training it again; "
        "saves one full run on the full recipe. `none` is still timed side by side",
    )
    args = parser.parse_args()
    if args.quick:
        args.eval_steps, args.eval_per_group, args.eval_seeds, args.eval_seeds_memorized = 4, 4, 1, 1
        args.timing_steps, args.timing_rounds, args.window = 1, 2, 16
    quiet_loading()

    quick = QUICK_OBJECTS if args.recipe.startswith("objects") else QUICK
    recipe = quick if args.quick else RECIPES[args.recipe]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    base = out / "base" / "pipeline"
    if not (base / "model_index.json").is_file():
        untrained_testbed(recipe, out / "base")
    truth = truth_of(base)
    print(
        f"base model {base} ({time.time() - started:.0f} s); "
        f"recipe {args.recipe}{' (quick)' if args.quick else ''}: "
        f"{recipe.steps} steps x batch {recipe.batch_size}",
        flush=True,
    )

    monitor = run_one("monitor", MitigationConfig(monitor=True), base, recipe, out, args, truth)
    monitor_log = read_log(out / "runs" / "monitor")
    analysis = signal_analysis(monitor_log, truth)
    analysis["by_phase_top_vs_seen_once"] = phase_analysis(monitor_log, truth)
    cal = calibrate(monitor_log)
    print(f"monitor: {json.dumps(analysis, indent=None)[:600]}\ncalibration: {cal}", flush=True)

    every = rules(cal, args.window)
    chosen = (
        list(every) if args.rules == "all" else ["none", *[r for r in args.rules.split(",") if r != "none"]]
    )
    unknown = [r for r in chosen if r not in every]
    if unknown:
        raise SystemExit(f"unknown rules {unknown}; known: {', '.join(every)}")
    results = {}
    for name in chosen:
        if name == "none" and args.none_from_monitor:
            results[name] = {
                **monitor,
                "rule": "none",
                "mitigation": asdict(every["none"]),
                "derived_from": "monitor run (bit-identical weights; its training seconds include the "
                "monitor's extra pass, see the side-by-side timing for cost)",
            }
        else:
            results[name] = run_one(name, every[name], base, recipe, out, args, truth)
        r = results[name]
        print(
            f"{name}: copy {r['copy_rate_top']:.2f}, align {r['alignment_clean']:.3f}, "
            f"drop {r['drop_rate']:.1%}, "
            f"precision {r['precision']:.2f}, recall {r['recall']:.2f} ({time.time() - started:.0f} s)",
            flush=True,
        )
    from safetensors.torch import load_file

    unet = Path("pipeline") / "unet" / "diffusion_pytorch_model.safetensors"
    # Not checked when `none` is the monitor run itself; not comparable when the two runs (or parts of a
    # resumed one) ran at different torch thread counts: CPU results are bit-exact only at one count.
    monitor_identical: bool | str | None = None
    if not args.none_from_monitor:
        threads = {
            n: sorted({e.get("threads") for e in read_log(out / "runs" / n)}) for n in ("monitor", "none")
        }
        if threads["monitor"] != threads["none"] or len(threads["none"]) != 1:
            monitor_identical = f"not comparable: torch threads per run {threads}"
        else:
            a, b = (load_file(out / "runs" / n / unet) for n in ("monitor", "none"))
            monitor_identical = all(torch.equal(a[k], b[k]) for k in a)

    timing = overhead(
        base,
        recipe,
        {n: every[n] for n in chosen} | {"monitor": MitigationConfig(monitor=True)},
        out / "timing",
        args.timing_steps,
        args.timing_rounds,
    )
    judged = verdicts(results, timing)
    print_table(results, judged)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "recipe": args.recipe + (" (quick)" if args.quick else ""),
        "recipe_config": asdict(recipe),
        "evaluation": {
            k: getattr(args, k)
            for k in ("guidance", "eval_steps", "eval_per_group", "eval_seeds", "eval_seeds_memorized")
        },
        "monitor_signal_analysis": analysis,
        "monitor_weights_identical_to_none": monitor_identical,
        "calibration": asdict(cal),
        "monitor": monitor,
        "results": results,
        "timing_side_by_side": timing,
        "verdicts": judged,
        "targets": TARGETS,
        "total_seconds": round(time.time() - started, 1),
    }
    text = json.dumps(report, indent=1)
    (out / "results.json").write_text(text)
    if args.json:
        args.json.write_text(text)
    print(
        f"monitor weights identical to none: {monitor_identical}; total {report['total_seconds']:.0f} s; "
        f"results: {out / 'results.json'}"
    )


if __name__ == "__main__":
    main()
