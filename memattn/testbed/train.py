"""Train the testbed model on the testbed data: seeded, resumable, CPU-sized.

Every step draws its batch, noise, timesteps and caption dropout from a generator seeded by
``(seed, step)``, so a run resumed from a checkpoint takes exactly the steps an uninterrupted run takes.
Checkpoints are written to a temporary directory and renamed into place: a crash never leaves a
half-written checkpoint that looks complete. Everything is stored as safetensors + JSON.
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

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from memattn._version import __version__
from memattn.errors import MemattnError
from memattn.testbed.alignment import CLASSIFIER_FILE, save_classifier, train_classifier
from memattn.testbed.data import TestbedConfig, TestbedDataset, build_dataset
from memattn.testbed.model import (
    TEXT_ENCODERS,
    ModelConfig,
    assemble_pipeline,
    build_text_encoder,
    build_tokenizer_files,
    build_unet,
    load_tokenizer,
    tokenize,
)
from memattn.testbed.objects import SCENE as OBJECT_SCENE
from memattn.testbed.objects import ObjectsConfig, ObjectsDataset, build_objects_dataset

CHECKPOINTS = "checkpoints"
_PASS_STREAM = 21  # random stream of the pass orders (sampling="epochs")
SAMPLING = ("uniform", "epochs")  # batches drawn with replacement / passes without replacement
EMBEDDING_BUDGET_BYTES = 2 << 30  # text states kept in memory up to this size (v2 bundled: 0.7 GiB)
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
OBJECTS_FAST = TrainConfig(
    steps=500,
    checkpoint_every=100,
    classifier_steps=500,
    data=ObjectsConfig(matching_items_per_count=4, seen_once=1500, rare_word_seen_once=40, never_seen=40),
    text_encoder="contrastive-eoscopy",
    text_pretrain_steps=100,
    text_pretrain_batch=128,
)
FAST = OBJECTS_FAST  # what `memattn testbed train --fast` trains


def data_config_from_json(raw: dict) -> TestbedConfig | ObjectsConfig:
    """A data config from its JSON form; ``scene`` says which testbed (absent: v1, older manifests)."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return ObjectsConfig(**values) if values.get("scene") == OBJECT_SCENE else TestbedConfig(**values)


def build_any_dataset(seed: int, config: TestbedConfig | ObjectsConfig) -> TestbedDataset | ObjectsDataset:
    if isinstance(config, ObjectsConfig):
        return build_objects_dataset(seed, config)
    return build_dataset(seed, config)


def _config_from_json(raw: dict) -> TrainConfig:
    data = data_config_from_json(raw.pop("data"))
    model = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.pop("model").items()})
    return TrainConfig(**raw, data=data, model=model)


class Trainer:
    """Holds the networks, the optimizer, the EMA copy and the pre-encoded data of one run."""

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
        self.unet = build_unet(config.model).train()
        self.ema = copy.deepcopy(self.unet).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=config.lr)
        self.noise_schedule = DDPMScheduler(
            num_train_timesteps=1000,
            beta_schedule="squaredcos_cap_v2",
            prediction_type=config.prediction_type,
        )
        pairs = self.dataset.training_pairs()
        index = {item.item_id: i for i, item in enumerate(self.dataset.items)}
        self.pair_items = torch.tensor([index[item_id] for item_id, _ in pairs])
        train_items = sorted({index[item_id] for item_id, _ in pairs})
        size = config.data.canvas_size
        self.images = torch.zeros(len(self.dataset.items), 3, size, size)
        self.images[train_items] = torch.from_numpy(
            self.dataset.images([self.dataset.items[i] for i in train_items])
        )
        self.tokens = torch.cat(
            [tokenize(self.tokenizer, captions[i : i + 4096]) for i in range(0, len(captions), 4096)]
        )
        state_bytes = len(captions) * self.tokens.shape[1] * config.model.text_hidden * 4
        self.embeddings: torch.Tensor | None = None  # None: too large to keep, encoded per batch
        with torch.no_grad():
            if state_bytes <= EMBEDDING_BUDGET_BYTES:
                self.embeddings = torch.cat(
                    [self.text_encoder(self.tokens[i : i + 256])[0] for i in range(0, len(captions), 256)]
                )
            self.empty = self.text_encoder(tokenize(self.tokenizer, [""]))[0]
        self.step = 0
        self.sink_log: list[dict] = []
        self._pass_orders: dict[int, np.ndarray] = {}  # sampling="epochs": the current passes' orders

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

    # ---- one step -----------------------------------------------------------------------------
    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's states for the captions of items ``rows``: pre-encoded once when they
        fit in ``EMBEDDING_BUDGET_BYTES`` (every recipe but the one-pass one), else encoded per batch."""
        if self.embeddings is not None:
            return self.embeddings[rows].clone()
        with torch.no_grad():
            return self.text_encoder(self.tokens[rows])[0]

    def _pass_order(self, index: int) -> np.ndarray:
        """The seeded permutation of pass ``index`` (sampling="epochs"); the last two are kept."""
        if index not in self._pass_orders:
            rng = np.random.default_rng((self.config.seed, _PASS_STREAM, index))
            order = rng.permutation(len(self.pair_items))
            self._pass_orders = {k: v for k, v in self._pass_orders.items() if k == index - 1}
            self._pass_orders[index] = order
        return self._pass_orders[index]

    def batch_rows(self, generator: torch.Generator) -> torch.Tensor:
        """The items of this step's batch: uniform draws, or the next slice of a seeded pass."""
        cfg, n = self.config, len(self.pair_items)
        if cfg.sampling == "uniform":
            return self.pair_items[torch.randint(n, (cfg.batch_size,), generator=generator)]
        positions = range(self.step * cfg.batch_size, (self.step + 1) * cfg.batch_size)
        return self.pair_items[[int(self._pass_order(p // n)[p % n]) for p in positions]]

    def train_step(self) -> float:
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        rows = self.batch_rows(generator)
        clean = self.images[rows]
        context = self.encode(rows)
        drop = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
        context[drop] = self.empty
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (cfg.batch_size,), generator=generator)
        noisy = self.noise_schedule.add_noise(clean, noise, timesteps)
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=context).sample
        target = (
            noise
            if cfg.prediction_type == "epsilon"
            else self.noise_schedule.get_velocity(clean, noise, timesteps)
        )
        loss = F.mse_loss(prediction, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.unet.parameters()), 1 - decay)
        return float(loss.detach())

    # ---- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        root = self.out / CHECKPOINTS
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:07d}"
        partial = root / f".partial-{self.step:07d}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        save_file(self.unet.state_dict(), partial / "unet.safetensors")
        save_file(self.ema.state_dict(), partial / "ema.safetensors")
        tensors, groups = _flatten_optimizer(self.optimizer.state_dict())
        save_file(tensors, partial / "optimizer.safetensors")
        self.sink_log.append(self.attention_shares())
        (partial / "state.json").write_text(
            json.dumps(
                {
                    "step": self.step,
                    "param_groups": groups,
                    "config": asdict(self.config),
                    "sink_log": self.sink_log,
                }
            )
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        return final

    def load_checkpoint(self, path: Path) -> None:
        try:
            state = json.loads((path / "state.json").read_text())
            self.unet.load_state_dict(load_file(path / "unet.safetensors"))
            self.ema.load_state_dict(load_file(path / "ema.safetensors"))
            self.optimizer.load_state_dict(
                _unflatten_optimizer(load_file(path / "optimizer.safetensors"), state)
            )
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
            raise MemattnError(
                f"checkpoint {path} is missing or corrupt ({type(error).__name__}: {str(error)[:120]}); "
                "delete it to resume from the one before, or start again without --resume"
            ) from None
        # The number of steps only says where to stop (no schedule depends on it): a run may be extended.
        if replace(_config_from_json(state["config"]), steps=0) != replace(self.config, steps=0):
            raise MemattnError(
                f"checkpoint {path} was written by a different recipe; use a new --out directory"
            )
        self.step = int(state["step"])
        self.sink_log = list(state.get("sink_log", []))

    def attention_shares(self) -> dict:
        """Where the EMA UNet's text attention goes now: BOS / prompt / summary share per layer.

        On a fixed probe (up to 32 seen-once and all 128-copy training pairs, their own images noised at
        t = 999, 500, 100, seeded): the sink hunt's per-checkpoint log. A few seconds per checkpoint.
        """
        from memattn.testbed.sink import attention_shares

        return {"step": self.step, **attention_shares(self)}

    # ---- export -------------------------------------------------------------------------------
    def export(self, target: Path, manifest: dict, progress: bool = False) -> Path:
        pipe = assemble_pipeline(
            copy.deepcopy(self.ema).eval(), self.text_encoder, self.tokenizer, self.config.prediction_type
        )
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        classifier, accuracy = train_classifier(
            self.dataset, seed=self.config.seed, steps=self.config.classifier_steps, progress=progress
        )
        save_classifier(classifier, accuracy, tmp / CLASSIFIER_FILE)
        manifest = {
            **manifest,
            "attribute_classifier_held_out_accuracy": accuracy,
            "text_encoder_pretraining": self.text_pretrain,
            "sink_log": self.sink_log,
        }
        (tmp / "memattn_testbed.json").write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return target


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {
        f"{index}.{key}": value.detach().clone().contiguous()
        for index, entry in state["state"].items()
        for key, value in entry.items()
    }
    return tensors, state["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], state: dict) -> dict:
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        entries.setdefault(int(index), {})[key] = value
    return {"state": entries, "param_groups": state["param_groups"]}


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (partial ones start with a dot and are never picked)."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return None
    complete = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return complete[-1] if complete else None


def manifest(trainer: Trainer, seconds: float, command: str) -> dict:
    dataset = trainer.dataset
    return {
        "memattn_version": __version__,
        "command": command,
        "seed": trainer.config.seed,
        "config": asdict(trainer.config),
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


def train(config: TrainConfig, out: Path, *, resume: bool = True, progress: bool = True) -> Path:
    """Train (or resume) into ``out``; returns the exported pipeline directory ``out / "pipeline"``."""
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, out, progress=progress)
    latest = latest_checkpoint(out) if resume else None
    if latest is not None:
        trainer.load_checkpoint(latest)
    started = time.time()
    bar = tqdm(total=config.steps, initial=trainer.step, desc="train testbed", disable=not progress)
    while trainer.step < config.steps:
        loss = trainer.train_step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if trainer.step % config.checkpoint_every == 0 or trainer.step == config.steps:
            trainer.save_checkpoint()
    bar.close()
    command = " ".join(["memattn", *sys.argv[1:]]) if sys.argv else "memattn testbed train"
    return trainer.export(
        out / "pipeline", manifest(trainer, time.time() - started, command), progress=progress
    )


def with_steps(config: TrainConfig, steps: int | None) -> TrainConfig:
    return config if steps is None else replace(config, steps=steps)


def export_checkpoint(run: Path, checkpoint: Path, target: Path) -> Path:
    """Export the EMA weights of one checkpoint of ``run`` as a pipeline (to study training dynamics)."""
    state = json.loads((checkpoint / "state.json").read_text())
    trainer = Trainer(_config_from_json(state["config"]), run)
    trainer.load_checkpoint(checkpoint)
    return trainer.export(target, manifest(trainer, float("nan"), f"export of {checkpoint}"))
