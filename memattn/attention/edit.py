"""Cross-attention logit edits for inference-time mitigation (Ren et al., ECCV 2024), batch-correct.

The paper's edit, per cross-attention layer and step, on the conditional branch: mask the padding
after the first EOS (``-inf`` on those keys; optionally the EOS too) and multiply the BOS logit by
``C`` (``S₀ ← C·S₀``), then softmax. The official code handles one
prompt and one image; here every conditional row uses its own prompt's layout, so prompts of
different lengths, ``num_images_per_prompt > 1`` and runs without CFG are all correct. The official
code also masks the unconditional branch to the conditional prompt's length: ``mask_uncond=True``.

``S₀ = q·k₀/√d`` is linear in the BOS key, so ``C·S₀`` is obtained by scaling the BOS key ``k₀`` of the
edited rows by ``C``; the masks are an additive bias of shape ``(batch, 1, 1, tokens)`` that broadcasts
over heads and queries. Both go to the same fused attention kernel as the unedited layer: no extra
forward passes, no extra matmul and no ``(batch, heads, queries, tokens)`` tensor per layer call.
:class:`EditListener` applies one edit through a model's attention session (``memattn.mitigate``
adds one for a ``with`` block, the guard one for its flagged rows); a ``memattn.trace`` in either order
around it records the edited attention.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from memattn.attention.session import AttentionSession, Listener
from memattn.attention.tokens import TokenLayout
from memattn.errors import LayoutError, MemattnError

PAPER_C = 1.25  # Ren et al.'s BOS logit factor: the one place it is written


MASK_EOS_INSTEAD = "memattn.mitigate(pipe, c=1.0, mask_padding=True, mask_eos=True)"


def no_bos_message(c: float, owner: str = "this model", alternative: str = MASK_EOS_INSTEAD) -> str:
    """The one line for a BOS edit asked of a model whose tokenizer adds no BOS (T5: PixArt)."""
    return (
        f"{owner} has no BOS token (its T5 tokenizer starts with the first prompt word), so there is no "
        f"BOS logit to multiply by c={c:g}; use {alternative} to mask the EOS instead (the pipeline "
        "already masks the padding)"
    )


@dataclass(frozen=True)
class AttentionEdit:
    """What to change in the logits, and where (``at_steps``: 0-based UNet calls of one pipeline call)."""

    c: float = PAPER_C
    mask_padding: bool = True
    mask_eos: bool = False
    mask_uncond: bool = False
    mask_prompt: bool = False  # analysis: hide the prompt words (BOS and summary tokens stay visible)
    prompt_penalty: float = 0.0  # subtract this from the prompt words' logits (a soft mask_prompt)
    at_steps: tuple[int, ...] | None = None  # None: every step
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
        if self.at_steps is not None and any(s < 0 for s in self.at_steps):
            raise MemattnError(f"at_steps must be non-negative step indices, got {self.at_steps}")

    @property
    def is_noop(self) -> bool:
        """C = 1 without masking changes nothing: the probe then keeps the unedited kernel call."""
        return self.c == 1.0 and not self.mask_padding and not self.mask_prompt and not self.prompt_penalty

    def active(self, step: int, layer: int) -> bool:
        return (self.at_steps is None or step in self.at_steps) and (
            self.layers is None or layer in self.layers
        )

    def check_schedule(self, n_steps: int) -> None:
        """A window that never fires is a mistake, not a no-op: name the valid range."""
        window = self.at_steps
        if window is not None and window and max(window) >= n_steps:
            raise MemattnError(
                f"mitigation step window {min(window)}..{max(window)} is outside this schedule: "
                f"the pipeline makes {n_steps} UNet calls, valid steps are 0..{n_steps - 1}"
            )

    def apply(
        self,
        key: torch.Tensor,
        cond_rows: slice,
        layouts: Sequence[TokenLayout] | None,
        rows_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(key, bias)`` to hand to the attention kernel instead of the layer's own key.

        ``key`` is ``(batch, heads, tokens, d)``; the returned key has the BOS key of every edited
        conditional row multiplied by ``C``. ``bias`` is an additive ``(batch, 1, 1, tokens)`` logit bias
        in the key's dtype (``-inf`` on masked tokens, ``-prompt_penalty`` on prompt words), or ``None``
        when nothing is masked. ``rows_mask`` (bool per conditional row) limits the edit to some images
        (the guard).
        """
        batch, _, n_tokens, _ = key.shape
        n_cond = cond_rows.stop - cond_rows.start
        if layouts is None or len(layouts) != n_cond:
            raise LayoutError(
                "mitigation needs each prompt's token layout: pass prompts to the pipeline, or give "
                "memattn.mitigate(..., lengths=[...]) when calling it with prompt_embeds"
            )
        if any(layout.width != n_tokens for layout in layouts):
            raise LayoutError(
                f"the layer attends to {n_tokens} text tokens but the token layouts have "
                f"{layouts[0].width} positions; describe the prompts with layouts of the length "
                "the pipeline encodes"
            )
        if self.c != 1.0 and not all(layout.has_bos for layout in layouts):
            raise LayoutError(no_bos_message(self.c))
        rows = None if rows_mask is None else rows_mask.to(key.device)
        if self.c != 1.0:  # one copy of the key (the layer's own stays untouched), then C on BOS in place
            key = key.clone()
            bos = key[cond_rows, :, :1]
            if rows is None:
                bos *= self.c
            else:  # the guard: only the flagged rows
                bos *= torch.where(rows, self.c, 1.0).to(key.dtype)[:, None, None, None]
        if not (self.mask_padding or self.mask_prompt or self.prompt_penalty):
            return key, None
        segments = tuple(layout.segments for layout in layouts)
        if self.mask_eos or self.mask_prompt:
            _check_something_visible(layouts, self.mask_eos, self.mask_prompt)
        hidden, prompt_words = _token_masks(
            segments, n_tokens, self.mask_padding, self.mask_eos, self.mask_prompt, key.device
        )
        if rows is not None:
            hidden, prompt_words = hidden & rows[:, None], prompt_words & rows[:, None]
        bias = torch.zeros(batch, 1, 1, n_tokens, dtype=key.dtype, device=key.device)
        cond = bias[cond_rows, 0, 0]
        cond.masked_fill_(hidden, float("-inf"))
        if self.prompt_penalty:
            cond -= self.prompt_penalty * prompt_words.to(bias.dtype)
        if self.mask_uncond and (self.mask_padding or self.mask_prompt) and cond_rows.start > 0:
            uncond = bias[: cond_rows.start, 0, 0]
            if uncond.shape[0] != n_cond:
                raise LayoutError(f"{uncond.shape[0]} unconditional rows for {n_cond} conditional rows")
            uncond.masked_fill_(hidden, float("-inf"))
        return key, bias


def _check_something_visible(layouts: Sequence[TokenLayout], mask_eos: bool, mask_prompt: bool) -> None:
    """Without a BOS, an empty prompt is only its EOS: hiding it would leave a row with no key at all
    (softmax over nothing is NaN). ``mask_eos`` implies ``mask_padding``, so padding never saves it."""
    for row, layout in enumerate(layouts):
        words = 0 if mask_prompt else len(layout.prompt_positions)
        if not layout.has_bos and mask_eos and words == 0:
            raise LayoutError(
                f"conditional row {row} would attend to no text token: it has no BOS, no visible prompt "
                "word and its EOS is masked; leave mask_eos (or mask_prompt) off for it"
            )


@functools.lru_cache(maxsize=256)
def _token_masks(
    segments: tuple[tuple[tuple[int, int, int, int], ...], ...],
    n_tokens: int,
    mask_padding: bool,
    mask_eos: bool,
    mask_prompt: bool,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden, prompt_words)``, bool ``[row, token]`` on ``device``: built once per batch layout and
    device, not per layer call (no host-to-device copy inside the UNet on a GPU).

    ``segments`` are each row's :attr:`TokenLayout.segments`: one per text sequence (SD3: CLIP, then T5),
    each with its own words, EOS and padding."""
    prompt_words = torch.zeros(len(segments), n_tokens, dtype=torch.bool)
    hidden = torch.zeros(len(segments), n_tokens, dtype=torch.bool)
    for row, parts in enumerate(segments):
        for _, first, eos, end in parts:
            prompt_words[row, first:eos] = True
            if mask_padding:
                hidden[row, eos + (0 if mask_eos else 1) : end] = True
    if mask_prompt:
        hidden |= prompt_words
    return hidden.to(device), prompt_words.to(device)


class EditListener(Listener):
    """Applies an :class:`AttentionEdit` at every probe, to every conditional row or to ``rows`` only."""

    edits = True

    def __init__(
        self, edit: AttentionEdit, rows: torch.Tensor | None = None, *, role: str = "mitigate"
    ) -> None:
        self.edit_settings = edit
        self.rows = rows  # bool per conditional row (the guard's flagged images); None: every row
        self.role = role

    @property
    def edits_every_row(self) -> bool:
        return self.rows is None and not self.edit_settings.is_noop

    def on_step(self, session: AttentionSession) -> None:
        if session.step == 0:
            length = session.schedule_length()
            if length:
                self.edit_settings.check_schedule(length)

    def edit(
        self, session: AttentionSession, layer: int, key: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        edit = self.edit_settings
        if edit.is_noop or not edit.active(session.step, layer):
            return key, mask
        call = session.call
        key, bias = edit.apply(key, session.cond_rows, None if call is None else call.layouts, self.rows)
        return key, mask if bias is None else merge_masks(bias, mask)


def merge_masks(bias: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Add a pipeline's own additive attention mask (if any) to the edit's bias."""
    return bias if attention_mask is None else bias + attention_mask.to(bias.dtype)


def as_indices(values: Sequence[int] | range | None) -> tuple[int, ...] | None:
    return None if values is None else tuple(int(v) for v in values)
