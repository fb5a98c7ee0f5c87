"""What a scan row holds: the Parquet schema, file names and the settings that define a scan."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from memattn.errors import MemattnError

SCHEMA_VERSION = 2  # 2: the input's label and id columns are kept
MANIFEST_FILE = "_memattn_scan.json"
LOCK_FILE = ".memattn_scan.lock"
PART_PREFIX = "part-"
TEMP_PREFIX = ".tmp-"
RANGES_KEY = b"memattn.scan.ranges"
COUNTS_KEY = b"memattn.scan.counts"
VERSION_KEY = b"memattn.scan.schema_version"
SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
FIELDS = ("prompt", "caption")
MAX_PROMPT_BYTES = 65_536  # longer lines/values are skipped unread (they are far beyond 77 tokens anyway)
TOO_LONG = ("truncate", "skip")
# Where batches are scored; not a setting: every engine writes the same rows (not in the manifest).
ENGINES = ("local", "ray")

TRIGGER = pa.struct([("token", pa.string()), ("position", pa.int32()), ("share", pa.float64())])
SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("prompt_sha256", pa.string()),
        pa.field("id", pa.string()),  # the input's id field, if it has one
        pa.field("label", pa.int8()),  # the input's 0/1 label (1 = memorized), if it has one
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("score_e", pa.float64()),
        pa.field("wen_step1", pa.float64()),
        pa.field("bos_share", pa.float64()),
        pa.field("summary_share", pa.float64()),
        pa.field("e_layers", pa.list_(pa.float64())),
        pa.field("score_d", pa.float64()),
        pa.field("score_combined", pa.float64()),
        pa.field("flagged", pa.bool_()),
        pa.field("threshold", pa.float64()),
        pa.field("trigger_tokens", pa.list_(TRIGGER)),
        pa.field("n_tokens", pa.int32()),
        pa.field("truncated", pa.bool_()),
        pa.field("model", pa.string(), nullable=False),
        pa.field("memattn_version", pa.string(), nullable=False),
    ],
    metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()},
)
SCORE_COLUMNS = (
    "score_e",
    "wen_step1",
    "bos_share",
    "summary_share",
    "e_layers",
    "score_d",
    "score_combined",
)


@dataclass(frozen=True)
class ScanSettings:
    """Everything that changes a row's values; a resumed scan must match the manifest on all of it.

    ``steps`` and ``guidance_scale`` default to the model's (:func:`memattn.defaults.model_defaults`:
    the testbed's 25 and 2, else the paper's 50 and 7.5), as on the command line.
    """

    model: str
    seed: int = 0
    batch_size: int = 8
    full: bool = False
    steps: int = None  # type: ignore[assignment]  # None: the model's; always an int after __init__
    guidance_scale: float = None  # type: ignore[assignment]
    layer: int | str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    too_long: str = "truncate"
    top_k: int = 3

    def __post_init__(self) -> None:
        if self.steps is None or self.guidance_scale is None:
            from memattn.defaults import model_defaults

            defaults, _ = model_defaults(self.model)
            if self.steps is None:
                object.__setattr__(self, "steps", int(defaults["steps"]))
            if self.guidance_scale is None:
                object.__setattr__(self, "guidance_scale", float(defaults["guidance"]))

    def check(self) -> None:
        if self.batch_size < 1:
            raise MemattnError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.steps < (2 if self.full else 1):
            raise MemattnError(
                f"--steps {self.steps}: "
                + ("--full (score D) needs at least 2" if self.full else "must be ≥ 1")
            )
        if self.too_long not in TOO_LONG:
            raise MemattnError(f"--too-long must be one of {', '.join(TOO_LONG)}, got {self.too_long!r}")
        if self.top_k < 0:
            raise MemattnError(f"--top-k must be ≥ 0, got {self.top_k}")
        from memattn.loading import check_device

        check_device(self.device)
