"""``memattn.mitigate``: the paper's inference-time mitigation for a ``with`` block (no extra passes).

It adds an :class:`~memattn.attention.edit.EditListener` to the denoiser's attention session for the
block and removes exactly that on exit (the session restores the original processors when its last
user leaves). Inside or around a ``memattn.trace`` block both share the session, so the trace records
exactly the attention the mitigated run used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from memattn.attention.edit import PAPER_C, AttentionEdit, EditListener, as_indices, check_sink
from memattn.attention.layers import cross_attention_layers, find_denoiser, resolve_layer
from memattn.attention.session import AttentionSession, BatchDescription
from memattn.errors import MemattnError


class Mitigation:
    """Context manager built by :func:`mitigate`."""

    def __init__(
        self,
        target: Any,
        edit: AttentionEdit,
        *,
        layers: Sequence[int | str] | None = None,
        lengths: Sequence[int] | None = None,
        cfg: bool = False,
    ) -> None:
        self.target = target
        pipeline, model = find_denoiser(target)
        check_sink(edit, pipeline)
        names = [name for name, _ in cross_attention_layers(model)]
        if layers is not None:  # names or indices: the one layer rule
            edit = replace(edit, layers=tuple(resolve_layer(names, layer) for layer in layers))
        self.edit = edit
        self._listener = EditListener(edit)
        self._batch = BatchDescription.of(lengths=lengths, cfg=cfg)
        self._session: AttentionSession | None = None

    def __enter__(self) -> Mitigation:
        existing = AttentionSession.active(self.target)
        if existing is not None and existing.has("mitigate"):
            raise MemattnError(
                "this model is already mitigated by an enclosing memattn.mitigate; nested mitigations "
                "are not supported: exit the outer block or combine the settings in one"
            )
        self._session = AttentionSession.acquire(self.target, self._batch)
        self._session.add(self._listener)
        return self

    def __exit__(self, *exc: object) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.remove(self._listener)
            session.release(self._batch)


def mitigate(
    target: Any,
    c: float = PAPER_C,
    *,
    mask_padding: bool = True,
    mask_eos: bool = False,
    mask_uncond: bool = False,
    mask_prompt: bool = False,
    prompt_penalty: float = 0.0,
    at_steps: Sequence[int] | range | None = None,
    layers: Sequence[int | str] | None = None,
    lengths: Sequence[int] | None = None,
    cfg: bool = False,
    sink: str = "bos",
    sink_k: int = 1,
) -> Mitigation:
    """Edit cross-attention as Ren et al. (ECCV 2024): ``with mitigate(pipe): pipe(...)``.

    ``c`` multiplies the BOS logit of the conditional branch (models without a BOS, PixArt's T5, refuse
    ``c != 1``: docs/models.md); ``mask_padding`` masks the tokens after the
    first EOS (``mask_eos`` the EOS too); ``mask_uncond`` also masks the unconditional branch to each
    conditional prompt's length, as the official code does. ``at_steps`` (0-based UNet calls of each pipeline
    call) and ``layers`` (indices in forward order or ``attn2`` names) restrict where the edit applies.
    ``mask_prompt`` (for analysis) hides the prompt words instead, leaving BOS and the summary tokens;
    ``prompt_penalty`` subtracts a constant from the prompt words' logits (a soft version of it).
    ``lengths`` gives token counts per prompt when the pipeline is called with ``prompt_embeds``; on a
    bare UNet it describes the conditional rows, and ``cfg=True`` says the batch is ``[uncond, cond]``
    (as for ``memattn.trace``; a pipeline sets both itself). ``sink="dynamic"`` multiplies by ``c`` the
    logits of the ``sink_k`` non-word positions that take the most attention in each layer call's
    unedited logits (the model's measured sink) instead of BOS: the edit for models without a BOS
    (docs/models.md). The default stays the paper's BOS, the one validated on Stable Diffusion.
    """
    edit = AttentionEdit(
        c=float(c) if isinstance(c, int | float) else c,
        mask_padding=mask_padding,
        mask_eos=mask_eos,
        mask_uncond=mask_uncond,
        mask_prompt=mask_prompt,
        prompt_penalty=float(prompt_penalty),
        at_steps=as_indices(at_steps),
        sink=sink,
        sink_k=sink_k,
    )
    return Mitigation(target, edit, layers=layers, lengths=lengths, cfg=cfg)
