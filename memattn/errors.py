"""Errors memattn raises on bad input: each message names the problem and the fix."""

from __future__ import annotations


class MemattnError(Exception):
    """Base class: the CLI prints these as one line instead of a traceback."""


class ModelNotFoundError(MemattnError):
    """A model path or hub id that cannot be loaded from here."""


class UnsupportedModelError(MemattnError):
    """A model without separate text cross-attention (nothing for the probe to read)."""


class LayoutError(MemattnError):
    """Token layouts are missing, malformed or do not match the recorded batch."""


class RecordError(MemattnError):
    """A record that cannot answer the question asked (too few steps, unknown layer, ...)."""
