"""Cross-attention logit edits for inference-time mitigation (Ren et al., ECCV 2024), batch-correct.

The paper's edit, per cross-attention layer and step, on the conditional branch: mask the padding
after the first EOS (``-inf`` on those keys; optionally the EOS too) and multiply the BOS logit by
``C`` (``S₀ ← C·S₀``), then softmax. The official code handles one
prompt and one image; here every conditional row uses its own prompt's layout, so prompts of
different lengths, ``num_images_per_prompt > 1`` and runs without CFG are all correct. The official
code also masks the unconditional branch to the conditional prompt's length: ``mask_uncond=True``.

**The sink.** The paper strengthens BOS, SD's attention sink. ``sink="dynamic"`` strengthens the
model's *measured* sink instead, for models without a BOS (T5: PixArt) or whose sink is not BOS: at
every edited layer call, the ``sink_k`` non-word positions (BOS, EOS, visible padding) that receive the
most attention from the conditional rows' image queries in that call's *unedited* logits (mean over
queries and heads) get their logit multiplied by ``C``, and stay visible when the padding is masked.
Prompt words are never candidates: the word that takes the most attention is a trigger candidate,
which the paper's edit moves attention away from. The ranking costs one ``QKᵀ`` over the text keys per
edited layer call (as the recorder does), on the device, with no host synchronisation.

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
from typing import Any

import torch

from memattn.attention.session import AttentionSession, Listener
from memattn.attention.tokens import TokenLayout, adds_bos
from memattn.errors import LayoutError, MemattnError

PAPER_C = 1.25  # Ren et al.'s BOS logit factor: the one place it is written


MASK_EOS_INSTEAD = "memattn.mitigate(pipe, c=1.0, mask_padding=True, mask_eos=True)"
DYNAMIC_INSTEAD = "memattn.mitigate(pipe, sink='dynamic')"
SINKS = ("bos", "dynamic")


def no_bos_message(
    c: float,
    owner: str = "this model",
    alternative: str = MASK_EOS_INSTEAD,
    dynamic: str = DYNAMIC_INSTEAD,
) -> str:
    """The one line for a BOS edit asked of a model whose tokenizer adds no BOS (T5: PixArt)."""
    return (
        f"{owner} has no BOS token (its T5 tokenizer starts with the first prompt word), so there is no "
        f"BOS logit to multiply by c={c:g}; use {alternative} to mask the EOS instead (the pipeline "
        f"already masks the padding), or {dynamic} to multiply the logit of its measured sink"
    )


def check_sink(
    edit: AttentionEdit, pipeline: Any, alternative: str = MASK_EOS_INSTEAD, dynamic: str = DYNAMIC_INSTEAD
) -> None:
    """Refuse the literal BOS edit (``c != 1``, ``sink="bos"``) on a pipeline whose tokenizer adds no BOS."""
    tokenizer = getattr(pipeline, "tokenizer", None)
    if edit.c != 1.0 and edit.sink == "bos" and tokenizer is not None and not adds_bos(tokenizer):
        raise LayoutError(no_bos_message(edit.c, type(pipeline).__name__, alternative, dynamic))


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
    sink: str = "bos"  # "bos": the paper's; "dynamic": the measured top non-word recipients (see above)
    sink_k: int = 1  # how many recipients the dynamic sink scales

    def __post_init__(self) -> None:
        if self.sink not in SINKS:
            raise MemattnError(f"sink must be one of {', '.join(SINKS)}, got {self.sink!r}")
        if isinstance(self.sink_k, bool) or not isinstance(self.sink_k, int) or self.sink_k < 1:
            raise MemattnError(f"sink_k must be an integer >= 1, got {self.sink_k!r}")
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
        query: torch.Tensor | None = None,
        model_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(key, bias)`` to hand to the attention kernel instead of the layer's own key.

        ``key`` is ``(batch, heads, tokens, d)``; the returned key has the BOS key of every edited
        conditional row multiplied by ``C``. ``bias`` is an additive ``(batch, 1, 1, tokens)`` logit bias
        in the key's dtype (``-inf`` on masked tokens, ``-prompt_penalty`` on prompt words), or ``None``
        when nothing is masked. ``rows_mask`` (bool per conditional row) limits the edit to some images
        (the guard). ``query`` (the layer's image queries) and ``model_mask`` (its own additive mask) are
        what the dynamic sink ranks the recipients with.
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
        if self.c != 1.0 and self.sink == "bos" and not all(layout.has_bos for layout in layouts):
            raise LayoutError(no_bos_message(self.c))
        rows = None if rows_mask is None else rows_mask.to(key.device)
        segments = tuple(layout.segments for layout in layouts)
        sinks = None
        if self.sink == "dynamic":
            if query is None:
                raise MemattnError(
                    "the dynamic sink ranks recipients by the layer's queries; none were given"
                )
            attendable = _attendable(
                tuple(len(layout.attendable_span) for layout in layouts), n_tokens, key.device
            )
            _, words = _token_masks(segments, n_tokens, False, False, False, key.device)
            sinks = measured_sinks(
                query[cond_rows],
                key[cond_rows],
                None if model_mask is None else model_mask[cond_rows],
                attendable & ~words,
                self.sink_k,
            )
            if self.c != 1.0:
                factor = torch.where(sinks if rows is None else sinks & rows[:, None], self.c, 1.0)
                key = key.clone()
                key[cond_rows] *= factor.to(key.dtype)[:, None, :, None]
        elif self.c != 1.0:  # one copy of the key (the layer's own stays untouched), then C on BOS in place
            key = key.clone()
            bos = key[cond_rows, :, :1]
            if rows is None:
                bos *= self.c
            else:  # the guard: only the flagged rows
                bos *= torch.where(rows, self.c, 1.0).to(key.dtype)[:, None, None, None]
        if not (self.mask_padding or self.mask_prompt or self.prompt_penalty):
            return key, None
        if self.mask_eos or self.mask_prompt:
            _check_something_visible(layouts, self.mask_eos, self.mask_prompt)
        hidden, prompt_words = _token_masks(
            segments, n_tokens, self.mask_padding, self.mask_eos, self.mask_prompt, key.device
        )
        if sinks is not None:
            hidden = hidden & ~sinks  # a measured sink stays visible
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


@torch.no_grad()
def measured_sinks(
    query: torch.Tensor,
    key: torch.Tensor,
    model_mask: torch.Tensor | None,
    candidates: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """``[row, token]`` bool: each row's ``k`` candidate positions with the most attention (mean over heads
    and queries of the unedited softmax, the model's own mask applied). All on the device."""
    logits = (query.float() * query.shape[-1] ** -0.5) @ key.float().transpose(-1, -2)
    if model_mask is not None:
        logits = logits + model_mask.float()
    mass = logits.softmax(dim=-1).mean(dim=(1, 2))  # [row, token]
    mass = mass.masked_fill(~candidates, -1.0)
    top = mass.topk(min(k, mass.shape[-1]), dim=-1).indices
    chosen = torch.zeros_like(candidates)
    chosen.scatter_(1, top, True)
    return chosen & candidates


@functools.lru_cache(maxsize=256)
def _attendable(counts: tuple[int, ...], n_tokens: int, device: torch.device) -> torch.Tensor:
    """``[row, token]`` bool: the leading positions each row's own mask lets through (all without one)."""
    return (torch.arange(n_tokens)[None, :] < torch.tensor(counts)[:, None]).to(device)


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
        self,
        session: AttentionSession,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        edit = self.edit_settings
        if edit.is_noop or not edit.active(session.step, layer):
            return key, mask
        call = session.call
        layouts = None if call is None else call.layouts
        key, bias = edit.apply(key, session.cond_rows, layouts, self.rows, query=query, model_mask=mask)
        return key, mask if bias is None else merge_masks(bias, mask)


def merge_masks(bias: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Add a pipeline's own additive attention mask (if any) to the edit's bias."""
    return bias if attention_mask is None else bias + attention_mask.to(bias.dtype)


def as_indices(values: Sequence[int] | range | None) -> tuple[int, ...] | None:
    return None if values is None else tuple(int(v) for v in values)
