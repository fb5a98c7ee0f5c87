"""memattn: find and stop training-data memorization in text-to-image diffusion models by reading
and steering their cross-attention (after Ren et al., ECCV 2024)."""

from memattn._version import __version__
from memattn.attention.record import AttentionRecord
from memattn.attention.tokens import TokenLayout
from memattn.attention.trace import Trace, trace
from memattn.detection.detect import detect
from memattn.detection.scores import (
    entropy_curve,
    layer_entropy_curves,
    score_d,
    score_e,
    summary_entropy_curve,
    token_mass,
    trigger_tokens,
)
from memattn.errors import (
    LayoutError,
    MemattnError,
    ModelNotFoundError,
    RecordError,
    UnsupportedModelError,
)
from memattn.mitigation.cross_attention import Mitigation, mitigate
from memattn.mitigation.guard import Calibration, Guard

__all__ = [
    "AttentionRecord",
    "Calibration",
    "Guard",
    "LayoutError",
    "MemattnError",
    "Mitigation",
    "ModelNotFoundError",
    "RecordError",
    "TokenLayout",
    "Trace",
    "UnsupportedModelError",
    "__version__",
    "detect",
    "entropy_curve",
    "layer_entropy_curves",
    "mitigate",
    "score_d",
    "score_e",
    "summary_entropy_curve",
    "token_mass",
    "trace",
    "trigger_tokens",
]
