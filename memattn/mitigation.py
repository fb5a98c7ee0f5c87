"""``memattn.mitigate``: the paper's inference-time mitigation for a ``with`` block (no extra passes).

It installs memattn's cross-attention probes with recording switched off and a logit edit
(:class:`memattn.edits.AttentionEdit`) switched on, and restores the original processors on exit. Inside
or around a ``memattn.trace`` block it shares the trace's probes, so the trace records exactly the
attention the mitigated run used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from memattn.edits import PAPER_C, AttentionEdit, as_indices
from memattn.errors import MemattnError
from memattn.probe import Recorder, Trace


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
        self._trace = Trace(target, lengths=lengths, cfg=cfg)
        if layers is not None:  # names or indices, resolved as the trace resolves map_layers
            edit = replace(edit, layers=tuple(self._trace._resolve_layer(layer) for layer in layers))
        self.edit = edit
        self._trace.recorder.store = False
        self._attached: Recorder | None = None

    def __enter__(self) -> Mitigation:
        existing = self._trace._installed_recorder()
        if existing is not None:
            if existing.editor is not None:
                raise MemattnError(
                    "this model is already mitigated by an enclosing memattn.mitigate; nested mitigations "
                    "are not supported: exit the outer block or combine the settings in one"
                )
            existing.editor = self.edit
            self._attached = existing
            return self
        self._trace.recorder.editor = self.edit
        try:
            self._trace.__enter__()
        except BaseException:
            self._trace.recorder.editor = None
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._attached is not None:
            self._attached.editor = None
            self._attached = None
            return
        self._trace.recorder.editor = None
        self._trace.__exit__(*exc)


def mitigate(
    target: Any,
    c: float = PAPER_C,
    *,
    mask_padding: bool = True,
    mask_eos: bool = False,
    mask_uncond: bool = False,
    mask_prompt: bool = False,
    prompt_penalty: float = 0.0,
    steps: Sequence[int] | range | None = None,
    layers: Sequence[int | str] | None = None,
    lengths: Sequence[int] | None = None,
    cfg: bool = False,
) -> Mitigation:
    """Edit cross-attention as Ren et al. (ECCV 2024): ``with mitigate(pipe): pipe(...)``.

    ``c`` multiplies the BOS logit of the conditional branch; ``mask_padding`` masks the tokens after the
    first EOS (``mask_eos`` the EOS too); ``mask_uncond`` also masks the unconditional branch to each
    conditional prompt's length, as the official code does. ``steps`` (0-based UNet calls of each pipeline
    call) and ``layers`` (indices in forward order or ``attn2`` names) restrict where the edit applies.
    ``mask_prompt`` (for analysis) hides the prompt words instead, leaving BOS and the summary tokens;
    ``prompt_penalty`` subtracts a constant from the prompt words' logits (a soft version of it).
    ``lengths`` gives token counts per prompt when the pipeline is called with ``prompt_embeds``; on a
    bare UNet it describes the conditional rows, and ``cfg=True`` says the batch is ``[uncond, cond]``
    (as for ``memattn.trace``; a pipeline sets both itself).
    """
    edit = AttentionEdit(
        c=float(c) if isinstance(c, int | float) else c,
        mask_padding=mask_padding,
        mask_eos=mask_eos,
        mask_uncond=mask_uncond,
        mask_prompt=mask_prompt,
        prompt_penalty=float(prompt_penalty),
        steps=as_indices(steps),
    )
    return Mitigation(target, edit, layers=layers, lengths=lengths, cfg=cfg)
