"""The mitigation benchmark's rows: which methods at which strengths, parsed and checked before any run."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from memattn.errors import MemattnError
from memattn.mitigation import registry as methods

NO_STRENGTH = tuple(name for name, value in methods.DEFAULT_STRENGTH.items() if value is None)


@dataclass(frozen=True)
class Setting:
    """One row of the benchmark: a registered method (``memattn.mitigation.registry``) at one strength
    (None: its default)."""

    method: str
    strength: float | None = None

    @property
    def label(self) -> str:
        value = self.strength if self.strength is not None else methods.DEFAULT_STRENGTH[self.method]
        return self.method if value is None else f"{self.method} {value:g}"


def parse_methods(text: str | Sequence[str] | None) -> list[str]:
    """Comma-separated (or listed) method names; ``None`` or ``all``: every method of the registry."""
    if text is None:
        return list(methods.METHODS)
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if names == ["all"]:
        return list(methods.METHODS)
    if not names:
        raise MemattnError(f"--methods is empty; choose from {', '.join(methods.METHODS)}")
    unknown = [n for n in names if n not in methods.METHODS]
    if unknown:
        raise MemattnError(
            f"unknown mitigation method {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(methods.METHODS)}"
        )
    return list(dict.fromkeys(names))


def _number(method: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MemattnError(f"strength {value!r} for {method} is not a number") from None
    if not math.isfinite(number) or isinstance(value, bool):
        raise MemattnError(f"strength {value!r} for {method} is not a finite number")
    return number


def parse_strengths(values: Sequence[str] | None) -> dict[str, list[float]]:
    """``METHOD=V[,V...]`` items, or JSON objects ``{"rta": [1, 4], "gni": 0.5}``, merged in order."""
    out: dict[str, list[float]] = {}
    for text in values or ():
        text = text.strip()
        if text.startswith("{"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as error:
                raise MemattnError(f"--strengths {text!r} is not valid JSON ({error.msg})") from None
            if not isinstance(parsed, dict):
                raise MemattnError("--strengths JSON must be an object: method -> number or list of numbers")
            items = [(k, v if isinstance(v, list) else [v]) for k, v in parsed.items()]
        else:
            method, sep, rest = text.partition("=")
            if not sep or not rest.strip():
                raise MemattnError(f"--strengths {text!r}: write METHOD=VALUE[,VALUE...], e.g. rta=1,4,10")
            items = [(method.strip(), [v for v in rest.split(",") if v.strip()])]
        for method, raw in items:
            if method not in methods.METHODS:
                raise MemattnError(
                    f"--strengths names unknown method {method!r}; choose from {', '.join(methods.METHODS)}"
                )
            if method in NO_STRENGTH:
                raise MemattnError(f"{method} has no strength to sweep (remove it from --strengths)")
            if not raw:
                raise MemattnError(f"--strengths gives no value for {method}")
            out.setdefault(method, []).extend(_number(method, v) for v in raw)
    return {k: list(dict.fromkeys(v)) for k, v in out.items()}


def settings_for(
    method_names: Sequence[str] | None = None, strengths: dict[str, list[float]] | None = None
) -> list[Setting]:
    """``none`` first, then each method at its default or at each requested strength."""
    names = parse_methods(method_names) if method_names is not None else list(methods.METHODS)
    strengths = strengths or {}
    extra = [m for m in strengths if m not in names]
    if extra:
        raise MemattnError(f"--strengths names {', '.join(extra)}, which --methods does not include")
    out = [Setting("none")]
    for name in names:
        if name == "none":
            continue
        out += [Setting(name, v) for v in strengths[name]] if name in strengths else [Setting(name)]
    return out


def check_settings(pipe: Any, settings: Sequence[Setting], *, steps: int, guidance: float) -> None:
    """Fail before the first (slow) generation: build and enter each method's context once, run nothing."""
    for setting in settings:
        if setting.method in ("stp", "opposite-guidance", "wen") and guidance <= 1:
            raise MemattnError(
                f"{setting.method} acts on classifier-free guidance: use --guidance > 1 or drop it"
            )
        prepared = methods.prepare(pipe, setting.method, ["a photo"], setting.strength, steps=steps)
        with prepared.context:
            pass
