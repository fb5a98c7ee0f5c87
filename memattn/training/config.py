"""What a fine-tuning run is: its options, the mitigation's options, and what must match to resume."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from memattn.attention.layers import parse_layers
from memattn.errors import MemattnError

MITIGATIONS = ("none", "entropy", "noise-norm", "caption-aug", "random-drop")
CHECKPOINTS = "checkpoints"
PIPELINE = "pipeline"
LOG_FILE = "log.jsonl"
RUN_FILE = "memattn_finetune.json"
CAPTION_FILES = ("captions.jsonl", "metadata.jsonl")
CHECKPOINT_FORMAT = 1
POSITION_KEYS = ("dropped_at", "no_caption", "augmented")  # log fields that index the step's ids
TEXT_CACHE_BYTES = 1 << 30  # pre-encode every caption when the embeddings fit in this much memory
IMAGE_CACHE_BYTES = 1 << 30
RANDOM_DROP_STREAM = 0x5EED  # offsets random-drop's coin stream from the batch sampler's seeds
SAMPLING = ("uniform", "epochs")  # rows drawn with replacement / seeded passes without replacement
PASS_STREAM = 21  # random stream of the pass orders (sampling="epochs")
STEP_FREE_SCHEDULES = ("constant", "constant_with_warmup")  # LR schedules that ignore max_train_steps
# Fields that may change between a run and its resumption (they say where to stop or write, not how).
RESUMABLE_FIELDS = (
    "output_dir",
    "max_train_steps",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "resume_from_checkpoint",
    "progress",
)


@dataclass(frozen=True)
class MitigationConfig:
    """Which mitigation runs and its rule (docs/training.md). ``rule=None`` becomes entropy → zscore,
    noise-norm → fixed (Wen's); ``threshold=None`` for noise-norm's fixed rule becomes Wen's τ = 2.
    ``monitor``: also compute and log both signals (entropy via the probe, noise norm via an extra
    pass) for every sample, whatever the mitigation; costs time, changes no weights.
    ``random-drop``: the control for a filter — drop each captioned sample with probability
    ``drop_prob``, blind to any signal; a filter is only worth its cost if it beats this at its own
    drop rate."""

    kind: str = "none"
    rule: str | None = None
    threshold: float | None = None
    z: float = 2.0
    drop: str = "high"
    window: int = 0
    timestep_bins: int = 1
    min_samples: int = 8
    layers: tuple[int | str, ...] | None = None
    caption_aug_prob: float = 0.1
    caption_aug_tokens: int = 2
    drop_prob: float = 0.0
    monitor: bool = False

    def __post_init__(self) -> None:
        if self.kind not in MITIGATIONS:
            raise MemattnError(f"unknown mitigation {self.kind!r}; choose one of {', '.join(MITIGATIONS)}")
        if self.layers is not None:
            object.__setattr__(self, "layers", parse_layers(self.layers))
        if not 0.0 <= self.drop_prob < 1.0:
            raise MemattnError(f"drop-prob must be a probability in [0, 1), got {self.drop_prob}")
        if self.kind == "random-drop" and self.drop_prob == 0.0:
            raise MemattnError("--mitigation random-drop needs --drop-prob above 0 (e.g. 0.2)")
        # Store the per-kind defaults, so a config and its command line compare equal.
        if self.rule is None and self.kind in ("entropy", "noise-norm"):
            object.__setattr__(self, "rule", "fixed" if self.kind == "noise-norm" else "zscore")
        if self.kind == "noise-norm" and self.rule == "fixed" and self.threshold is None:
            object.__setattr__(self, "threshold", 2.0)

    def describe(self) -> str:
        if self.kind == "caption-aug":
            return f"caption-aug: p={self.caption_aug_prob:g}, {self.caption_aug_tokens} random tokens"
        if self.kind == "random-drop":
            return f"random-drop: p={self.drop_prob:g} (control)"
        if self.kind == "none":
            return "none" + (" (monitoring entropy and noise norm)" if self.monitor else "")
        return f"{self.kind}: {self.rule}" + ("" if self.threshold is None else f" {self.threshold:g}")


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. Defaults follow diffusers' train_text_to_image.py where it has one.

    ``sampling``: ``uniform`` draws every batch's rows with replacement (seeded per step); ``epochs``
    walks seeded passes, so each pair is seen exactly once per pass (the testbed's one-pass recipe).
    """

    output_dir: str
    model: str = "testbed"
    data: str = "testbed"
    max_train_steps: int = 1000
    train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    caption_dropout: float = 0.0
    resolution: int | None = None
    random_flip: bool = False
    mixed_precision: str = "no"
    use_ema: bool = False
    ema_decay: float = 0.9999
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    seed: int = 0
    sampling: str = "uniform"
    mitigation: MitigationConfig = field(default_factory=MitigationConfig)
    progress: bool = True

    def __post_init__(self) -> None:
        for name in (
            "max_train_steps",
            "train_batch_size",
            "gradient_accumulation_steps",
            "checkpointing_steps",
        ):
            if getattr(self, name) < 1:
                raise MemattnError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.sampling not in SAMPLING:
            raise MemattnError(f"sampling must be one of {', '.join(SAMPLING)}, got {self.sampling!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise MemattnError(f"mixed precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise MemattnError(f"caption dropout must lie in [0, 1], got {self.caption_dropout}")
        if self.seed < 0:
            raise MemattnError(f"the seed must be a non-negative integer, got {self.seed}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise MemattnError("checkpoints-total-limit must be at least 1")
        if isinstance(self.mitigation, dict):
            object.__setattr__(self, "mitigation", MitigationConfig(**self.mitigation))

    def recipe(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed by this config.

        A constant LR schedule lets a finished run be extended (more steps); any other schedule is
        shaped by ``max_train_steps``, which then must match.
        """
        raw = json.loads(json.dumps(asdict(self)))
        free = set(RESUMABLE_FIELDS)
        if self.lr_scheduler not in STEP_FREE_SCHEDULES:
            free.discard("max_train_steps")
        return {k: v for k, v in raw.items() if k not in free}


def saved_recipe(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's recorded recipe with mitigation options added since it was written set to their
    defaults (they cannot have been used then), so an older run still resumes."""
    saved = {"sampling": "uniform", **saved}  # added after the first checkpoints were written
    mitigation = saved.get("mitigation")
    if not isinstance(mitigation, dict):
        return saved
    defaults = json.loads(json.dumps(asdict(MitigationConfig())))
    return {**saved, "mitigation": {**defaults, **mitigation}}
