"""Cross-attention logit edits for inference-time mitigation (Ren et al., ECCV 2024), batch-correct.

The paper's edit, per cross-attention layer and step, on the conditional branch: mask the padding
after the first EOS (``-inf`` on those keys; optionally the EOS too) and multiply the BOS logit by
``C`` (``S₀ ← C·S₀``, an additive bias ``(C − 1)·S₀``), then softmax. The official code handles one
prompt and one image; here every conditional row uses its own prompt's layout, so prompts of
different lengths, ``num_images_per_prompt > 1`` and runs without CFG are all correct. The official
code also masks the unconditional branch to the conditional prompt's length: ``mask_uncond=True``.

The edit is an additive bias passed to the same fused attention kernel as the unedited layer: no
extra forward passes. ``memattn.mitigate(pipe, c=1.25)`` installs it for a ``with`` block and can be
combined with ``memattn.trace`` in either order (the trace then records the edited attention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memattn.errors import LayoutError, MemattnError
from memattn.tokens import TokenLayout


@dataclass(frozen=True)
class AttentionEdit:
    """What to change in the logits, and where (steps are 0-based UNet calls of one pipeline call)."""

    c: float = 1.25
    mask_padding: bool = True
    mask_eos: bool = False
    mask_uncond: bool = False
    mask_prompt: bool = False  # analysis: hide the prompt words (BOS and summary tokens stay visible)
    prompt_penalty: float = 0.0  # subtract this from the prompt words' logits (a soft mask_prompt)
    steps: tuple[int, ...] | None = None  # None: every step
    layers: tuple[int, ...] | None = None  # indices in forward order; None: every cross-attention layer

    def __post_init__(self) -> None:
        if not isinstance(self.c, int | float) or not math.isfinite(self.c) or self.c <= 0:
            raise MemattnError(
                f"C must be a finite number > 0 (the BOS logit is multiplied by it), got {self.c}"
            )
        if self.mask_eos and not self.mask_padding:
            raise MemattnError(
                "mask_eos=True masks the EOS together with the padding: also set mask_padding=True"
            )
        if not math.isfinite(self.prompt_penalty) or self.prompt_penalty < 0:
            raise MemattnError(f"prompt_penalty must be a finite number >= 0, got {self.prompt_penalty}")
        if self.steps is not None and any(s < 0 for s in self.steps):
            raise MemattnError(f"steps must be non-negative step indices, got {self.steps}")

    @property
    def is_noop(self) -> bool:
        """C = 1 without masking changes nothing: the probe then keeps the unedited kernel call."""
        return self.c == 1.0 and not self.mask_padding and not self.mask_prompt and not self.prompt_penalty

    def active(self, step: int, layer: int) -> bool:
        return (self.steps is None or step in self.steps) and (self.layers is None or layer in self.layers)

    def check_schedule(self, n_steps: int) -> None:
        """A window that never fires is a mistake, not a no-op: name the valid range."""
        if self.steps is not None and self.steps and max(self.steps) >= n_steps:
            raise MemattnError(
                f"mitigation step window {min(self.steps)}..{max(self.steps)} is outside this schedule: "
                f"the pipeline makes {n_steps} UNet calls, valid steps are 0..{n_steps - 1}"
            )

    def bias(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        cond_rows: slice,
        layouts: Sequence[TokenLayout] | None,
        rows_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Additive logit bias ``(batch, heads, queries, tokens)`` in the query's dtype.

        ``query``/``key`` are ``(batch, heads, L, d)`` / ``(batch, heads, T, d)`` before scaling.
        ``rows_mask`` (bool per conditional row) limits the edit to some images (the guard).
        """
        batch, heads, n_query, head_dim = query.shape
        n_tokens = key.shape[2]
        n_cond = cond_rows.stop - cond_rows.start
        if layouts is None or len(layouts) != n_cond:
            raise LayoutError(
                "mitigation needs each prompt's token layout: pass prompts to the pipeline, or give "
                "memattn.mitigate(..., lengths=[...]) when calling it with prompt_embeds"
            )
        bias = torch.zeros(batch, heads, n_query, n_tokens, dtype=query.dtype, device=query.device)
        keep = torch.ones(n_cond, n_tokens, dtype=torch.bool, device=query.device)
        if self.mask_padding:
            for row, layout in enumerate(layouts):
                keep[row, layout.eos_index + (0 if self.mask_eos else 1) :] = False
        if self.mask_prompt:
            for row, layout in enumerate(layouts):
                keep[row, 1 : layout.eos_index] = False
        if rows_mask is not None:
            keep[~rows_mask.to(keep.device)] = True
        cond = bias[cond_rows]
        cond.masked_fill_(~keep[:, None, None, :], float("-inf"))
        if self.prompt_penalty:
            for row, layout in enumerate(layouts):
                if rows_mask is None or bool(rows_mask[row]):
                    cond[row, ..., 1 : layout.eos_index] -= self.prompt_penalty
        if self.c != 1.0:
            scale = head_dim**-0.5
            bos_logit = (query[cond_rows].float() * scale) @ key[cond_rows, :, :1].float().transpose(-1, -2)
            extra = (self.c - 1.0) * bos_logit[..., 0]  # (rows, heads, L)
            if rows_mask is not None:
                extra = extra * rows_mask.to(extra.device, extra.dtype)[:, None, None]
            cond[..., 0] += extra.to(bias.dtype)
        if self.mask_uncond and (self.mask_padding or self.mask_prompt) and cond_rows.start > 0:
            uncond = bias[: cond_rows.start]
            if uncond.shape[0] != n_cond:
                raise LayoutError(f"{uncond.shape[0]} unconditional rows for {n_cond} conditional rows")
            uncond.masked_fill_(~keep[:, None, None, :], float("-inf"))
        return bias


def merge_masks(bias: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Add a pipeline's own additive attention mask (if any) to the edit's bias."""
    return bias if attention_mask is None else bias + attention_mask.to(bias.dtype)


def as_indices(values: Sequence[int] | range | None) -> tuple[int, ...] | None:
    return None if values is None else tuple(int(v) for v in values)


def resolve_layers(layers: Sequence[int | str] | None, names: Sequence[str]) -> tuple[int, ...] | None:
    """Layer indices (forward order) from indices or ``attn2`` module names."""
    if layers is None:
        return None
    out = []
    for layer in layers:
        if isinstance(layer, int):
            if not 0 <= layer < len(names):
                raise MemattnError(f"layer index {layer} out of range 0..{len(names) - 1}")
            out.append(layer)
        else:
            name = str(layer).removesuffix(".processor")
            if name not in names:
                raise MemattnError(f"unknown cross-attention layer {layer!r}; known: {', '.join(names)}")
            out.append(list(names).index(name))
    return tuple(out)


def describe(edit: AttentionEdit) -> dict[str, Any]:
    return {
        "method": "ren2024",
        "c": edit.c,
        "mask_padding": edit.mask_padding,
        "mask_eos": edit.mask_eos,
        "mask_uncond": edit.mask_uncond,
        "mask_prompt": edit.mask_prompt,
        "prompt_penalty": edit.prompt_penalty,
        "steps": None if edit.steps is None else list(edit.steps),
        "layers": None if edit.layers is None else list(edit.layers),
    }
