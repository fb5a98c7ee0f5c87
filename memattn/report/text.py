"""Prompt text for the page: plain segments with trigger tokens marked, never HTML."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from memattn.report.constants import MAX_PROMPT_CHARS

# ---- prompt text: plain segments, never HTML ---------------------------------------------------------


def token_text(token: str) -> str:
    return token.replace("</w>", "").strip().lower()


def tokenization(tokenizer: Any, prompt: str | None) -> Tokenization | None:
    """Character offsets and token strings of a prompt as the pipeline tokenizes it (BOS at 0), or None
    when the tokenizer cannot give offsets."""
    if tokenizer is None or prompt is None:
        return None
    try:
        encoded = tokenizer(
            prompt, truncation=True, max_length=int(tokenizer.model_max_length), return_offsets_mapping=True
        )
        tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
        offsets = [tuple(int(x) for x in pair) for pair in encoded["offset_mapping"]]
    except Exception:  # a slow tokenizer (no offsets), or anything unexpected: match by text instead
        return None
    return Tokenization(offsets, [str(t) for t in tokens]) if len(offsets) == len(tokens) else None


@dataclass(frozen=True)
class Tokenization:
    offsets: list[tuple[int, ...]]
    tokens: list[str]


def _trigger_spans(trigger: dict[str, Any], lower: str, tokens: Tokenization | None) -> list[tuple[int, int]]:
    """Where a trigger token lies in the (lowercased) prompt: exactly, from its position and the
    tokenizer's offsets when they agree on the token; else by matching its text."""
    raw = str(trigger.get("token") or "")
    token = token_text(raw)
    position = trigger.get("position")
    if tokens is not None and isinstance(position, int) and 0 < position < len(tokens.tokens):
        start, stop = tokens.offsets[position]
        if stop > start and token_text(tokens.tokens[position]) == token:
            return [(start, stop)]
    if not token:
        return []
    starts = [m.start() for m in re.finditer(re.escape(token), lower)]
    word_starts = [s for s in starts if s == 0 or not lower[s - 1].isalnum()]
    end = len(token)
    words = [s for s in word_starts if s + end == len(lower) or not lower[s + end].isalnum()]
    return [(s, s + end) for s in (words if raw.endswith("</w>") else []) or word_starts or starts]


def highlight_segments(
    prompt: str | None,
    triggers: Sequence[dict[str, Any]] | None,
    limit: int = MAX_PROMPT_CHARS,
    tokens: Tokenization | None = None,
) -> list[dict[str, Any]]:
    """Cut a prompt into ``{"text", "trigger", "token", "share"}`` segments; trigger tokens get their own.

    With ``tokens`` (:func:`tokenization` by the pipeline's tokenizer) a trigger's stored ``position``
    marks exactly its characters. Otherwise, or when the token there differs, its text is matched
    case-insensitively (CLIP lowercases) where it is a whole word (a BPE token ending in ``</w>`` ends a
    word), else where it starts a word, else anywhere. Segments are plain text: the template escapes each.
    """
    if prompt is None:
        return []
    cut = len(prompt) > limit
    text = prompt[:limit]
    lower = text.lower()
    if tokens is not None and len(lower) != len(prompt[:limit]):
        tokens = None  # lowercasing changed the length (rare scripts): offsets would not line up
    best: list[tuple[float, str] | None] = [None] * len(text)
    for trigger in triggers or ():
        share = trigger.get("share")
        share = float(share) if isinstance(share, int | float) and math.isfinite(share) else 0.0
        label = token_label(str(trigger.get("token") or ""))
        for start, stop in _trigger_spans(trigger, lower, tokens):
            for i in range(start, min(stop, len(text))):
                if best[i] is None or share > best[i][0]:
                    best[i] = (share, label)
    segments: list[dict[str, Any]] = []
    for char, mark in zip(text, best, strict=True):
        if segments and segments[-1]["_mark"] == mark:
            segments[-1]["text"] += char
        else:
            segments.append({"text": char, "_mark": mark})
    for segment in segments:
        mark = segment.pop("_mark")
        segment.update(
            trigger=mark is not None,
            share=None if mark is None else mark[0],
            token=None if mark is None else mark[1],
        )
    if cut:
        segments.append(
            {
                "text": f" … ({len(prompt) - limit} more characters)",
                "trigger": False,
                "share": None,
                "token": None,
                "cut": True,
            }
        )
    return segments


def mpl_text(text: str) -> str:
    """Data shown in a matplotlib label: ``$`` would start mathtext (and can fail to parse)."""
    return text.replace("\\", "\\\\").replace("$", r"\$")


def token_label(token: str) -> str:
    if token == "<|startoftext|>":
        return "BOS"
    if token == "<|endoftext|>":
        return "EOS"
    return token.replace("</w>", "")
