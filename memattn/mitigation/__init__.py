"""Mitigation at inference: the paper's cross-attention edit (``mitigate``), the prompt and embedding
methods, guidance schedules, the guard (detect at step 1, mitigate the flagged rows) and the registry
that puts every method behind one name and one strength."""

from memattn.mitigation.cross_attention import Mitigation, mitigate
from memattn.mitigation.guard import Calibration, Guard
from memattn.mitigation.registry import METHODS, REGISTRY, Method

__all__ = ["METHODS", "REGISTRY", "Calibration", "Guard", "Method", "Mitigation", "mitigate"]
