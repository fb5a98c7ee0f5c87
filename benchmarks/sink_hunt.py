"""The sink hunt: testbed v2 recipes that might give normal prompts a BOS attention sink, as in SD.

Each variant trains (resumable, into ``--out/VARIANT``), then is evaluated as ``memattn testbed report``
evaluates (every group, 24 prompts x 2 seeds, guidance 2, 25 DDIM steps). One JSON per variant holds the
recipe, training time, the per-checkpoint BOS / summary share of every layer (``sink_log``) and the
detection AUCs (all non-memorized groups and each alone), copies and alignment.

Variants (all v2 data, 3,000 steps unless said):
- ``c``: the contrastive encoder with the EOS state copied over the padding, 3,000 steps (bundled first).
- ``c-long``: ``c`` trained to 6,000 steps: the bundled recipe (``OBJECTS``) since it won the hunt.
- ``c-seed1``: ``c-long`` with seed 1 (data, encoder and UNet).
- ``ii-summary-pool``: contrastive encoder trained on a random summary position (EOS or any padding
  state) instead of the EOS alone, no EOS copy: the far padding made prompt-specific by training.
- ``iii-big-bos``: ``ii`` plus a large-norm BOS state (x4): a distinctive BOS with prompt-dependent padding.

Usage: .venv/bin/python benchmarks/sink_hunt.py VARIANT [VARIANT ...] --out /tmp/sink [--resume-from RUN]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from memattn.quiet import quiet_loading
from memattn.testbed.evaluate import evaluate
from memattn.testbed.train import OBJECTS, train

VARIANTS = {
    "c": replace(OBJECTS, steps=3000),
    "c-long": OBJECTS,
    "c-seed1": replace(OBJECTS, seed=1),
    "ii-summary-pool": replace(OBJECTS, steps=3000, text_encoder="contrastive", text_pretrain_pool="summary"),
    "iii-big-bos": replace(
        OBJECTS, steps=3000, text_encoder="contrastive", text_pretrain_pool="summary", bos_scale=4.0
    ),
}


def run(name: str, out: Path, resume_from: Path | None) -> dict:
    recipe = VARIANTS[name]
    run_dir = out / name
    if resume_from is not None and not run_dir.exists():
        shutil.copytree(resume_from / "checkpoints", run_dir / "checkpoints")
        shutil.copytree(resume_from / "text-encoder", run_dir / "text-encoder")
    started = time.time()
    pipeline = train(recipe, run_dir, progress=False)
    seconds = time.time() - started
    evaluation = evaluate(pipeline, per_group=24, seeds=2, progress=False)
    summary = evaluation.summary()
    manifest = json.loads((pipeline / "memattn_testbed.json").read_text())
    result = {
        "variant": name,
        "recipe": asdict(recipe),
        "seconds_this_invocation": round(seconds, 1),
        "training_seconds": manifest["training_seconds"],
        "text_encoder_pretraining": manifest["text_encoder_pretraining"],
        "sink_log": manifest["sink_log"],
        "groups": summary["groups"],
        "detection_auc": {
            k: v["auc"] if isinstance(v, dict) else v
            for k, v in summary["detection_vs_non_memorized"].items()
        },
        "detection_auc_by_negative_group": summary["detection_auc_by_negative_group"],
        "layers": summary["cross_attention_layers"],
    }
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    last = manifest["sink_log"][-1]
    print(
        f"{name}: {seconds:.0f} s; BOS share (seen once) per layer at step {last['step']}: "
        f"{last['seen_once']['bos_share']}; AUCs {result['detection_auc']}",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume-from", type=Path, help="a run directory of the same recipe to extend")
    args = parser.parse_args()
    quiet_loading()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        run(name, args.out, args.resume_from if name == "c-long" else None)


if __name__ == "__main__":
    main()
