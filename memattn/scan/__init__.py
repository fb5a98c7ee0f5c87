"""``memattn scan``: score a prompt file for memorization, one row per prompt, resumable after a crash.

The scan itself is :func:`memattn.scan.run.scan` (its docstring says why it streams, writes crash-safe
Parquet parts and refuses to mix settings); input reading is ``inputs``, output parts and the manifest
``output``, batch scoring ``scoring``, the row schema ``schema``, the Ray Data engine ``ray_engine``.
"""

from memattn.scan.inputs import count_rows, iter_prompts
from memattn.scan.run import ScanSummary, read_results, scan, score_batch
from memattn.scan.schema import (
    ENGINES,
    MANIFEST_FILE,
    MAX_PROMPT_BYTES,
    SCHEMA,
    SCHEMA_VERSION,
    TEMP_PREFIX,
    ScanSettings,
)
from memattn.scan.scoring import load_calibration

__all__ = [
    "ENGINES",
    "MANIFEST_FILE",
    "MAX_PROMPT_BYTES",
    "SCHEMA",
    "SCHEMA_VERSION",
    "TEMP_PREFIX",
    "ScanSettings",
    "ScanSummary",
    "count_rows",
    "iter_prompts",
    "load_calibration",
    "read_results",
    "scan",
    "score_batch",
]
