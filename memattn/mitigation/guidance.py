"""Jain et al. (CVPR 2025) guidance schedules: no or opposite guidance while inside the attraction basin.

For the first ``first_steps`` denoising steps the pipeline's guided prediction ``ε_u + w·(ε_c − ε_u)`` becomes
``ε_u + s·(ε_c − ε_u)``: ``s = 0`` is their static transition point (unconditional early steps),
``s < 0`` their opposite guidance; then normal CFG. Zero extra UNet calls: a forward hook rescales the
conditional half of the UNet output so that the pipeline's own CFG line produces the wanted mix.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from memattn.attention.patch import wrapping_encode_prompt
from memattn.errors import MemattnError


@contextlib.contextmanager
def guidance_schedule(pipe: Any, *, scale: float = -2.0, first_steps: int = 5) -> Iterator[None]:
    """``with guidance_schedule(pipe, scale=0.0, first_steps=10): pipe(...)``: scale ``s`` first.

    ``first_steps`` is a count of leading steps (a step count elsewhere is ``steps``; a set of step
    indices is ``at_steps``)."""
    if not math.isfinite(scale) or not isinstance(first_steps, int) or first_steps < 0:
        raise MemattnError(
            f"need a finite guidance scale and first_steps >= 0, got scale={scale}, first_steps={first_steps}"
        )
    state = {"calls": 0}

    def new_call(bound: dict[str, Any], result: tuple) -> tuple:
        state["calls"] = 0
        return result

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state["calls"] += 1
        if state["calls"] > first_steps:
            return None
        if not getattr(pipe, "do_classifier_free_guidance", False):
            raise MemattnError(
                "a guidance schedule needs classifier-free guidance (guidance_scale > 1) to rescale"
            )
        w = float(pipe.guidance_scale)
        sample = output[0] if isinstance(output, tuple) else output.sample
        uncond, cond = sample.chunk(2)
        mixed = torch.cat([uncond, uncond + (scale / w) * (cond - uncond)])
        if isinstance(output, tuple):
            return (mixed, *output[1:])
        output.sample = mixed
        return output

    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        with wrapping_encode_prompt(pipe, new_call):
            yield
    finally:
        handle.remove()
