"""The testbed's recipes and how they run: a recipe is a configuration of the one training loop.

``train(recipe, out)`` builds the untrained model the recipe describes (dataset, tokenizer, frozen text
encoder — pre-trained contrastively when the recipe says so, stored once in ``out/text-encoder`` —
and the seeded UNet init), saves it as a pipeline in ``out/base``, and trains it with
:func:`memattn.training.finetune` (``--data testbed``, no mitigation: batch, lr, caption dropout and EMA
from the recipe). Every step draws from generators seeded by ``(seed, step)``, so a run resumed from a
checkpoint takes exactly the steps of an uninterrupted one; checkpoints are atomic (the loop's). At
every checkpoint the sink probe logs where the EMA UNet's text attention goes; the export adds the
attribute classifier (the alignment measure) and the manifest (ground-truth groups, recipe, sink log).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from memattn._version import __version__
from memattn.errors import MemattnError
from memattn.testbed.alignment import CLASSIFIER_FILE, save_classifier, train_classifier
from memattn.testbed.data import TestbedConfig, TestbedDataset
from memattn.testbed.manifest import MANIFEST, build_any_dataset
from memattn.testbed.model import (
    TEXT_ENCODERS,
    ModelConfig,
    assemble_pipeline,
    build_text_encoder,
    build_tokenizer_files,
    build_unet,
    load_tokenizer,
)
from memattn.testbed.objects import ObjectsConfig, ObjectsDataset
from memattn.training.config import (
    CHECKPOINTS,
    LOG_FILE,
    PIPELINE,
    RUN_FILE,
    SAMPLING,
    FinetuneConfig,
    MitigationConfig,
)
from memattn.training.loop import Finetuner
from memattn.training.run import finetune

BASE = "base"  # the untrained pipeline a run trains from
MANIFEST_ITEMS_PER_GROUP = 1000  # captions per group listed in a manifest (the rest: rebuild the dataset)


@dataclass(frozen=True)
class TrainConfig:
    """The recipe. Defaults follow the feasibility run: AdamW 1e-3, batch 64, 10 % caption dropout, EMA.

    The defaults are testbed v1 (``DETAIL``); ``OBJECTS`` is v2, the bundled ``testbed``.
    ``text_encoder``: ``random`` (frozen at init), ``contrastive`` (CLIP loss against renders for
    ``text_pretrain_steps`` steps, then frozen) or ``contrastive-eoscopy`` (that, with every state after
    the first EOS replaced by the EOS state: ``TestbedCLIPTextModel``).
    """

    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    seed: int = 0
    prediction_type: str = "v_prediction"  # "epsilon" failed to sample well here (RESULTS.md)
    classifier_steps: int = 1500  # the attribute classifier exported with the model (alignment measure)
    data: TestbedConfig | ObjectsConfig = field(default_factory=TestbedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    text_encoder: str = "random"
    text_pretrain_steps: int = 0
    text_pretrain_batch: int = 256
    text_pretrain_pool: str = "eos"  # "summary": a random summary position per caption (far padding too)
    bos_scale: float = 1.0  # the text encoder's BOS state times this (TestbedCLIPTextModel)
    sampling: str = "uniform"  # "epochs": shuffled passes, every pair exactly once per pass

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLING:
            raise MemattnError(f"sampling must be one of {', '.join(SAMPLING)}, got {self.sampling!r}")
        if self.text_encoder not in TEXT_ENCODERS:
            raise MemattnError(
                f"text_encoder {self.text_encoder!r}: choose one of {', '.join(TEXT_ENCODERS)}"
            )
        if self.text_pretrain_pool not in ("eos", "summary"):
            raise MemattnError(f"text_pretrain_pool must be eos or summary, got {self.text_pretrain_pool!r}")
        if self.bos_scale <= 0:
            raise MemattnError(f"bos_scale must be > 0, got {self.bos_scale}")
        if self.text_encoder != "random" and self.text_pretrain_steps < 1:
            raise MemattnError(f"text_encoder {self.text_encoder!r} needs text_pretrain_steps >= 1")
        if self.model.image_size != self.data.canvas_size:
            raise MemattnError(
                f"the UNet's image_size ({self.model.image_size}) must equal the rendered image size "
                f"({self.data.canvas_size} = scene {self.data.image_size} + 2 x border {self.data.border})"
            )


DETAIL_FAST = TrainConfig(
    steps=400,
    checkpoint_every=100,
    classifier_steps=500,
    data=TestbedConfig(
        matching_counts=(32, 128),
        matching_items_per_count=4,
        n_templates=2,
        template_copies=32,
        seen_once=400,
        rare_word_seen_once=40,
        never_seen=40,
        novel_composition=40,
    ),
)


DETAIL = TrainConfig()
# The bundled v2: 18,248 pairs drawn uniformly, ~21 passes. 6,000 steps, not 3,000: at 3,000 the 128x
# items were own copies in 0.88 of generations and the BOS share was still rising (RESULTS.md, sink hunt).
OBJECTS = TrainConfig(
    steps=6000,
    checkpoint_every=250,
    classifier_steps=4000,
    data=ObjectsConfig(),
    text_encoder="contrastive-eoscopy",
    text_pretrain_steps=300,
)
# One pass over 192,000 pairs (every pair seen exactly once, 128 copies per memorized item seen 128
# times): measured, and it does not memorize (RESULTS.md, "one-pass recipe"); kept to reproduce that.
OBJECTS_ONE_PASS = replace(
    OBJECTS,
    data=ObjectsConfig(seen_once=189_752, caption_tags=12),
    sampling="epochs",
)
# CI trains it end to end. 400 UNet steps and 300 classifier steps, not 500/500: measured, 400 still copies
# all four 128x items (whole-image r 0.85-0.93, alignment 0.94); 300 copied three (RESULTS.md).
OBJECTS_FAST = TrainConfig(
    steps=400,
    checkpoint_every=100,
    classifier_steps=300,
    data=ObjectsConfig(matching_items_per_count=4, seen_once=1500, rare_word_seen_once=40, never_seen=40),
    text_encoder="contrastive-eoscopy",
    text_pretrain_steps=100,
    text_pretrain_batch=128,
)
FAST = OBJECTS_FAST  # what `memattn testbed train --fast` trains


class UntrainedModel:
    """The untrained model of one recipe: dataset, tokenizer, frozen text encoder and the UNet's init."""

    def __init__(self, config: TrainConfig, out: Path, *, progress: bool = False) -> None:
        self.config = config
        self.out = out
        self.dataset = build_any_dataset(config.seed, config.data)
        torch.manual_seed(config.seed)
        captions = [item.caption for item in self.dataset.items]
        self.tokenizer = load_tokenizer(build_tokenizer_files(captions, out / "tokenizer-build"))
        self.text_encoder = build_text_encoder(
            config.model,
            self.tokenizer,
            eos_copy=config.text_encoder.endswith("eoscopy"),
            bos_scale=config.bos_scale,
        ).requires_grad_(False)
        self.text_pretrain: dict = {}
        if config.text_encoder != "random":
            self.text_pretrain = self._pretrained_text_encoder(progress)
        torch.manual_seed(config.seed)  # the UNet's init does not depend on the encoder recipe
        self.unet = build_unet(config.model).eval()

    def _pretrained_text_encoder(self, progress: bool) -> dict:
        """Pre-train the encoder (seeded), or load what an earlier start of this run stored."""
        from memattn.testbed.text_pretrain import pretrain_text_encoder, summary_state_similarity

        cfg = self.config
        recipe = {
            "seed": cfg.seed,
            "steps": cfg.text_pretrain_steps,
            "batch": cfg.text_pretrain_batch,
            "pool": cfg.text_pretrain_pool,
            "text_encoder": cfg.text_encoder,
            "bos_scale": cfg.bos_scale,
            "model": asdict(cfg.model),
        }
        stored = self.out / "text-encoder"
        if (stored / "pretrain.json").is_file():
            info = json.loads((stored / "pretrain.json").read_text())
            if info["recipe"] == json.loads(json.dumps(recipe)):
                self.text_encoder.load_state_dict(load_file(stored / "model.safetensors"))
                return info
        log = pretrain_text_encoder(
            self.text_encoder,
            self.tokenizer,
            self.dataset,
            steps=cfg.text_pretrain_steps,
            seed=cfg.seed,
            batch_size=cfg.text_pretrain_batch,
            pool=cfg.text_pretrain_pool,
            progress=progress,
        )
        probe = [item.caption for item in self.dataset.group("seen_once")[:64]]
        info = {
            "recipe": recipe,
            **log.as_dict(),
            "summary_state_cosine": summary_state_similarity(self.text_encoder, self.tokenizer, probe),
        }
        partial = self.out / ".text-encoder.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_file(
            {k: v.contiguous() for k, v in self.text_encoder.state_dict().items()},
            partial / "model.safetensors",
        )
        (partial / "pretrain.json").write_text(json.dumps(info, indent=1))
        shutil.rmtree(stored, ignore_errors=True)
        os.replace(partial, stored)
        return info

    def export(self, target: Path, manifest: dict, *, classifier: bool, progress: bool = False) -> Path:
        """Save the untrained pipeline with its manifest (and, if asked, the attribute classifier)."""
        pipe = assemble_pipeline(
            copy.deepcopy(self.unet), self.text_encoder, self.tokenizer, self.config.prediction_type
        )
        tmp = target.with_name("." + target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        manifest = {**manifest, "text_encoder_pretraining": self.text_pretrain}
        if classifier:
            manifest.update(self.add_classifier(tmp, progress))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return target

    def add_classifier(self, pipeline: Path, progress: bool = False) -> dict:
        """Train the attribute classifier (seeded) into ``pipeline``; returns its manifest entry."""
        model, accuracy = train_classifier(
            self.dataset, seed=self.config.seed, steps=self.config.classifier_steps, progress=progress
        )
        save_classifier(model, accuracy, pipeline / CLASSIFIER_FILE)
        return {"attribute_classifier_held_out_accuracy": accuracy}


def manifest(base: UntrainedModel, seconds: float, command: str) -> dict:
    dataset = base.dataset
    return {
        "memattn_version": __version__,
        "command": command,
        "seed": base.config.seed,
        "config": asdict(base.config),
        "training_seconds": round(seconds, 1),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
        "summary": dataset.summary(),
        "groups": {
            name: [
                {
                    "caption": item.caption,
                    "item_id": item.item_id,
                    "duplication": item.duplication,
                    "template_id": item.template_id,
                    "attributes": item.attributes,
                }
                for item in dataset.group(name)[:MANIFEST_ITEMS_PER_GROUP]
            ]
            for name in dataset.prompt_groups()
        },
        "groups_listed": f"the first {MANIFEST_ITEMS_PER_GROUP} items per group (summary.items: all)",
    }


def from_testbed_recipe(
    recipe: TrainConfig,
    base: Path,
    output_dir: Path,
    mitigation: MitigationConfig | None = None,
    **overrides: Any,
) -> FinetuneConfig:
    """The loop's options that run a testbed recipe (batch, lr, dropout, EMA, sampling, no clipping)."""
    config = FinetuneConfig(
        output_dir=str(output_dir),
        model=str(base),
        data="testbed",
        max_train_steps=recipe.steps,
        train_batch_size=recipe.batch_size,
        learning_rate=recipe.lr,
        max_grad_norm=None,
        caption_dropout=recipe.caption_dropout,
        use_ema=True,
        ema_decay=recipe.ema_decay,
        checkpointing_steps=recipe.checkpoint_every,
        seed=recipe.seed,
        sampling=recipe.sampling,
        mitigation=mitigation or MitigationConfig(),
        progress=False,
    )
    return replace(config, **overrides)


def untrained_testbed(recipe: TrainConfig, out: Path, *, progress: bool = False) -> Path:
    """An untrained testbed model for ``recipe``, saved as a pipeline: ``out/pipeline``.

    The UNet, text encoder and tokenizer are exactly what ``memattn testbed train`` starts from (same
    seeds), with the recipe's manifest and attribute classifier, so ``memattn finetune --data testbed``
    trains on the recipe's data and the result can be judged by ``memattn.testbed.evaluate``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = UntrainedModel(recipe, out, progress=progress)
    note = f"memattn.testbed.train.untrained_testbed (untrained; recipe seed {recipe.seed})"
    return base.export(out / PIPELINE, manifest(base, 0.0, note), classifier=True, progress=progress)


def sink_probe(dataset: TestbedDataset | ObjectsDataset) -> Any:
    """The per-checkpoint entry of a testbed run: where the EMA UNet's text attention goes (a few s)."""
    from memattn.testbed.sink import attention_shares

    def probe(tuner: Finetuner) -> dict:
        unet = tuner.ema if tuner.ema is not None else tuner.model
        return attention_shares(dataset, unet, tuner.tokenizer, tuner.encode, tuner.noise_schedule)

    return probe


def train(config: TrainConfig, out: Path, *, resume: bool = True, progress: bool = True) -> Path:
    """Train (or resume) into ``out``; returns the exported pipeline directory ``out / "pipeline"``.

    ``resume=False`` starts again: the checkpoints and step log already in ``out`` are removed first.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        (out / LOG_FILE).unlink(missing_ok=True)
    base = UntrainedModel(config, out, progress=progress)
    base_dir = base.export(out / BASE, manifest(base, 0.0, "untrained base"), classifier=False)
    tune = from_testbed_recipe(config, base_dir, out, resume_from_checkpoint="latest", progress=progress)
    command = " ".join(["memattn", *sys.argv[1:]]) if sys.argv else "memattn testbed train"
    started = time.time()
    target = finetune(tune, command=command, on_checkpoint=sink_probe(base.dataset))
    run = json.loads((target / RUN_FILE).read_text())
    final = manifest(base, run["training_seconds"], command)
    final["config"] = asdict(replace(config, steps=run["steps"]))
    final["text_encoder_pretraining"] = base.text_pretrain
    final["sink_log"] = run.get("checkpoint_log", [])
    final.update(base.add_classifier(target, progress))
    final["wall_seconds"] = round(time.time() - started, 1)
    (target / MANIFEST).write_text(json.dumps(final, indent=1))
    return target


def with_steps(config: TrainConfig, steps: int | None) -> TrainConfig:
    return config if steps is None else replace(config, steps=steps)
