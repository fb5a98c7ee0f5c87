"""The listener that records: per call, the query-mean attention of every layer and step.

For the observed rows only, it keeps the query-mean of ``softmax(QKᵀ/√d + mask)`` over the text
tokens — a ``(rows, heads, tokens)`` tensor per layer call, kept on the model's device until a record
is asked for (one device→host copy then) — and, when asked, full maps for chosen steps and layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from memattn.attention.record import AttentionRecord
from memattn.attention.session import AttentionSession, Listener
from memattn.attention.tokens import TokenLayout
from memattn.errors import LayoutError, RecordError


@dataclass
class _Segment:
    """Buffers of one call (see :class:`memattn.attention.session.Call`)."""

    call: int
    prompts: tuple[str, ...] | None = None
    layouts: tuple[TokenLayout, ...] | None = None
    uncond_layouts: tuple[TokenLayout, ...] | None = None
    images_per_prompt: int = 1
    n_images: int = 0
    steps: list[list[torch.Tensor | None]] = field(default_factory=list)
    share_steps: list[list[torch.Tensor | None]] = field(default_factory=list)  # joint layers only
    uncond_steps: list[list[torch.Tensor | None]] = field(default_factory=list)
    timesteps: list[Any] = field(default_factory=list)
    maps: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    map_sizes: dict[int, tuple[int, int]] = field(default_factory=dict)
    text_mask: torch.Tensor | None = None  # the denoiser's own mask on the recorded rows (first step)
    record: AttentionRecord | None = None


class Recorder(Listener):
    """Records what every probe of a session sees, one :class:`AttentionRecord` per call."""

    reads = True

    def __init__(
        self,
        layer_names: Sequence[str],
        heads: Sequence[int],
        *,
        record_uncond: bool = False,
        map_steps: Sequence[int] | None = None,
        map_layers: Sequence[int] | None = None,
        role: str = "trace",
        text_share: bool = False,
    ) -> None:
        self.layer_names = tuple(layer_names)
        self.reads_share = text_share  # the session computes it on joint layers (SD3) only
        self.heads = tuple(heads)
        self.record_uncond = record_uncond
        self.want_maps = map_steps is not None or map_layers is not None
        self.map_steps = None if map_steps is None else set(map_steps)
        self._map_steps_now = self.map_steps  # negative steps resolved against the call's schedule
        self.map_layers = None if map_layers is None else set(map_layers)
        self.role = role
        self.segments: list[_Segment] = []
        self._observed = slice(0, 0)
        self._n_cond = 0

    # ---- listener -----------------------------------------------------------------------------
    def on_step(self, session: AttentionSession) -> None:
        call = session.call
        assert call is not None
        if not self.segments or self.segments[-1].call != call.index:
            uncond = self.record_uncond and call.cfg
            self.segments.append(
                _Segment(
                    call=call.index,
                    prompts=call.prompts,
                    layouts=call.layouts,
                    uncond_layouts=call.uncond_layouts if uncond else None,
                    images_per_prompt=call.images_per_prompt,
                    n_images=call.n_images or 0,
                    text_mask=_rows(session.text_mask, session.cond_rows),
                )
            )
        segment = self.segments[-1]
        if session.step == 0 and self.map_steps is not None:
            self._map_steps_now = _resolve_steps(self.map_steps, session.schedule_length())
        uncond = self.record_uncond and call.cfg
        self._n_cond = session.cond_rows.stop - session.cond_rows.start
        self._observed = slice(0, session.batch) if uncond else session.cond_rows
        segment.steps.append([None] * len(self.layer_names))
        if self.reads_share:
            segment.share_steps.append([None] * len(self.layer_names))
        if uncond:
            segment.uncond_steps.append([None] * len(self.layer_names))
        segment.timesteps.append(session.timestep)
        segment.record = None

    @torch.no_grad()
    def observe(
        self,
        session: AttentionSession,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> None:
        """Store the query-mean attention probabilities of the observed rows (no host sync).

        Runs without autograd: in a training forward the record must not keep the graph alive.
        """
        if not self.segments or not self.segments[-1].steps:
            return
        segment = self.segments[-1]
        if segment.layouts and segment.layouts[0].width != key.shape[-2]:
            raise LayoutError(
                f"the layer attends to {key.shape[-2]} text tokens but the token layouts have "
                f"{segment.layouts[0].width} positions; describe the prompts with layouts of the "
                "length the pipeline encodes (e.g. max_sequence_length)"
            )
        rows = self._observed
        query = query[rows].float() * query.shape[-1] ** -0.5  # scale the (L, d) side, not (L, 77)
        logits = query @ key[rows].float().transpose(-1, -2)
        if mask is not None:
            logits = logits + mask[rows].float()
        probs = logits.softmax(dim=-1)
        mean = probs.mean(dim=2)
        step = len(segment.steps) - 1
        n_cond = self._n_cond
        segment.steps[step][layer] = mean[-n_cond:]
        if segment.uncond_steps:
            segment.uncond_steps[step][layer] = mean[:-n_cond]
        if (
            self.want_maps
            and (self._map_steps_now is None or step in self._map_steps_now)
            and (self.map_layers is None or layer in self.map_layers)
        ):
            segment.maps[(step, layer)] = probs[-n_cond:].detach()
            segment.map_sizes.setdefault(layer, _spatial_size(session.latent_size, probs.shape[2]))

    def observe_share(self, session: AttentionSession, layer: int, share: torch.Tensor) -> None:
        """Keep the conditional rows' ``(rows, heads)`` text share of a joint layer."""
        if self.segments and self.segments[-1].share_steps:
            self.segments[-1].share_steps[-1][layer] = share[-self._n_cond :]

    # ---- results ------------------------------------------------------------------------------
    def records(self) -> list[AttentionRecord]:
        return [self._finalize(s) for s in self.segments if s.steps]

    def clear(self) -> None:
        self.segments.clear()

    def _finalize(self, segment: _Segment) -> AttentionRecord:
        if segment.record is None:
            n_images = segment.n_images
            layouts = segment.layouts
            if layouts is not None and len(layouts) != n_images:
                raise LayoutError(
                    f"{len(layouts)} token layouts for {n_images} conditional rows; pass one length or "
                    "layout per image"
                )
            if layouts is not None:
                check_mask(layouts, segment.text_mask)
            segment.record = AttentionRecord(
                attention=self._stack(segment.steps, n_images),
                layer_names=self.layer_names,
                heads=self.heads,
                timesteps=torch.tensor([_as_float(t) for t in segment.timesteps], dtype=torch.float32),
                layouts=layouts,
                prompts=segment.prompts,
                images_per_prompt=segment.images_per_prompt,
                uncond_attention=self._stack(segment.uncond_steps, n_images)
                if segment.uncond_steps
                else None,
                uncond_layouts=segment.uncond_layouts,
                maps={k: v.float().cpu() for k, v in segment.maps.items()},
                text_share=_stack_shares(segment.share_steps, n_images, max(self.heads)),
                map_sizes=dict(segment.map_sizes),
            )
        return segment.record

    def _stack(self, steps: list[list[torch.Tensor | None]], n_images: int) -> torch.Tensor:
        """``[step, layer, image, head, token]`` float32 on the CPU; one device→host copy at the end."""
        width = max(self.heads)
        tokens = next((t.shape[-1] for step in steps for t in step if t is not None), 0)
        device = next((t.device for step in steps for t in step if t is not None), torch.device("cpu"))
        blank = torch.full((n_images, width, tokens), float("nan"), device=device)
        stacked = []
        for step in steps:
            layers = []
            for layer in step:
                if layer is None:
                    layers.append(blank)
                elif layer.shape[1] < width:
                    layers.append(torch.cat([layer, blank[:, : width - layer.shape[1]]], dim=1))
                else:
                    layers.append(layer)
            stacked.append(torch.stack(layers))
        return torch.stack(stacked).float().cpu()


def _resolve_steps(steps: set[int], n_steps: int | None) -> set[int]:
    """``map_steps`` with negative indices counted from the end of the call's schedule (-1: the last)."""
    if all(step >= 0 for step in steps):
        return steps
    if n_steps is None:
        raise RecordError(
            f"map_steps {sorted(steps)} count from the end, but this call has no scheduler to say how many "
            "denoiser calls it makes (a bare UNet); give non-negative step indices"
        )
    return {step % n_steps if step < 0 else step for step in steps}


def _stack_shares(steps: list[list[torch.Tensor | None]], n_images: int, width: int) -> torch.Tensor | None:
    """``[step, layer, image, head]`` text share (NaN where a layer has no joint attention or fewer heads);
    ``None`` when no layer reported one (cross-attention models: the text is all a layer reads)."""
    if not any(t is not None for step in steps for t in step):
        return None
    out = torch.full((len(steps), len(steps[0]), n_images, width), float("nan"))
    for s, step in enumerate(steps):
        for layer, share in enumerate(step):
            if share is not None:
                out[s, layer, :, : share.shape[1]] = share.float().cpu()
    return out


def _rows(mask: Any, rows: slice) -> torch.Tensor | None:
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        return None
    return mask[rows].detach()


def check_mask(layouts: Sequence[TokenLayout], mask: torch.Tensor | None) -> None:
    """The layouts' ``attended`` positions are exactly the ones the denoiser's own mask let through.

    ``mask`` is the ``encoder_attention_mask`` of the first denoiser call, on the recorded rows:
    ``(rows, tokens)`` with 1 = keep, or an additive ``(rows, 1, tokens)`` bias (0 = keep).
    """
    if mask is None:
        masked = [i for i, layout in enumerate(layouts) if layout.attended is not None]
        if masked:
            raise LayoutError(
                f"the layouts of images {masked} say the padding is masked, but the denoiser got no "
                "encoder_attention_mask; pass the pipeline's prompt_attention_mask, or layouts without it"
            )
        return
    visible = (mask > 0.5) if mask.ndim == 2 else (mask[:, 0] > -1.0)
    visible = visible.cpu()
    if visible.shape[0] != len(layouts) or visible.shape[-1] != layouts[0].width:
        raise LayoutError(
            f"the denoiser's attention mask is {tuple(visible.shape)} but there are {len(layouts)} "
            f"layouts of {layouts[0].width} positions"
        )
    for image, layout in enumerate(layouts):
        expected = torch.zeros(layout.width, dtype=torch.bool)
        expected[: len(layout.attendable_span)] = True
        if not torch.equal(visible[image], expected):
            raise LayoutError(
                f"image {image}: the denoiser attends to {int(visible[image].sum())} text positions, its "
                f"token layout to {len(layout.attendable_span)}; the layouts do not describe this call "
                "(tokenize as the pipeline does: its max_sequence_length and attention mask)"
            )


def _spatial_size(latent_size: tuple[int, int], n_queries: int) -> tuple[int, int]:
    """Height and width of a layer's query grid from the latent size and its query count."""
    height, width = latent_size
    if height * width == 0:
        return (n_queries, 1)
    factor = max(1, round(math.sqrt(height * width / n_queries)))
    size = (-(-height // factor), -(-width // factor))
    return size if size[0] * size[1] == n_queries else (n_queries, 1)


def _as_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.reshape(-1)[0]) if value.numel() else float("nan")
    return float(value) if value is not None else float("nan")
