"""``memattn.trace``: record where each image's cross-attention goes, at (almost) no cost.

``with memattn.trace(pipe) as tr: pipe(prompts)`` adds a :class:`~memattn.attention.recorder.Recorder`
to the denoiser's :class:`~memattn.attention.session.AttentionSession` for the block: every ``attn2``
layer's probe hands it the query-mean of ``softmax(QKᵀ/√d)`` over the text tokens for the conditional
rows (a ``(rows, heads, tokens)`` tensor on the model's device), with images bit-identical to an
untraced run; the session learns each call's prompts, images per prompt and whether classifier-free
guidance doubled the batch from ``pipe.encode_prompt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from memattn.attention.layers import cross_attention_layers, find_denoiser, resolve_layer
from memattn.attention.record import AttentionRecord
from memattn.attention.recorder import Recorder
from memattn.attention.session import AttentionSession, BatchDescription
from memattn.attention.tokens import TokenLayout
from memattn.errors import RecordError


class Trace:
    """Context manager that records through the model's attention session for a ``with`` block.

    Use :func:`trace` to build one. ``tr.record`` is the last pipeline call's :class:`AttentionRecord`,
    ``tr.records`` one per call made inside the block (they stay readable after the block).
    """

    def __init__(
        self,
        target: Any,
        *,
        record_uncond: bool = False,
        map_steps: Sequence[int] | None = None,
        map_layers: Sequence[int | str] | None = None,
        lengths: Sequence[int] | None = None,
        layouts: Sequence[TokenLayout] | None = None,
        cfg: bool = False,
        text_share: bool = False,
    ) -> None:
        self.target = target
        self.pipeline, self.model = find_denoiser(target)
        layers = cross_attention_layers(self.model)
        self.layer_names = [name for name, _ in layers]
        layer_indices = None
        if map_layers is not None:
            layer_indices = [resolve_layer(self.layer_names, layer) for layer in map_layers]
        self.recorder = Recorder(
            self.layer_names,
            [module.heads for _, module in layers],
            record_uncond=record_uncond,
            map_steps=map_steps,
            map_layers=layer_indices,
            text_share=text_share,
        )
        self._batch = BatchDescription.of(lengths=lengths, layouts=layouts, cfg=cfg)
        self._session: AttentionSession | None = None

    def __enter__(self) -> Trace:
        existing = AttentionSession.active(self.target)
        if existing is not None and existing.has("trace"):
            raise RecordError(
                "this model is already traced by an enclosing memattn.trace; nested traces are not "
                "supported: read everything from the outer trace's records"
            )
        self._session = AttentionSession.acquire(self.target, self._batch)
        self._session.add(self.recorder)
        return self

    def __exit__(self, *exc: object) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.remove(self.recorder)
            session.release(self._batch)

    # ---- results ------------------------------------------------------------------------------
    @property
    def records(self) -> list[AttentionRecord]:
        return self.recorder.records()

    @property
    def record(self) -> AttentionRecord:
        records = self.records
        if not records:
            raise RecordError("nothing was recorded: call the pipeline (or UNet) inside the `with` block")
        return records[-1]

    def reset(self) -> None:
        """Drop everything recorded so far (e.g. between training steps on a bare UNet)."""
        self.recorder.clear()
        if self._session is not None:
            self._session.restart_bare_call()


def trace(
    target: Any,
    *,
    record_uncond: bool = False,
    map_steps: Sequence[int] | None = None,
    map_layers: Sequence[int | str] | None = None,
    lengths: Sequence[int] | None = None,
    layouts: Sequence[TokenLayout] | None = None,
    cfg: bool = False,
    text_share: bool = False,
) -> Trace:
    """Record cross-attention of a diffusers pipeline or bare UNet inside a ``with`` block.

    ``with memattn.trace(pipe) as tr: pipe(prompts)`` then read ``tr.record``.
    ``record_uncond`` also keeps the unconditional half; ``map_steps``/``map_layers`` keep full
    ``(image, head, query, token)`` maps for those steps/layers (off by default: they are large).
    ``lengths`` gives token counts (BOS and EOS included) per prompt when prompts come as
    ``prompt_embeds``; ``layouts``/``lengths`` and ``cfg`` describe the batch of a bare UNet, whose
    rows are all conditional unless ``cfg=True``. On a joint-attention model (SD3) ``text_share=True``
    also records how much of the image's joint softmax falls on the text (``record.text_share``); it
    costs one more fused kernel call per layer (the image queries against all keys), so it is opt-in.
    """
    return Trace(
        target,
        record_uncond=record_uncond,
        map_steps=map_steps,
        map_layers=map_layers,
        lengths=lengths,
        layouts=layouts,
        cfg=cfg,
        text_share=text_share,
    )


__all__ = ["Trace", "trace"]
