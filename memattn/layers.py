"""One rule for naming a cross-attention layer, wherever a layer is named.

Scores, mitigations, traces, the guard, the training filters and every CLI option accept the same
forms: an index in forward order (negative counts from the end, as in Python), the full diffusers
name of the ``attn2`` module (``.processor`` optional), or the name of a block that holds exactly one
cross-attention layer (``down_blocks.1.attentions.1``).
"""

from __future__ import annotations

from collections.abc import Sequence

from memattn.errors import RecordError

LayerName = int | str


def parse_layer(text: str) -> LayerName:
    """A layer as typed on a command line or in a config: digits (or ``-digits``) are an index."""
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text


def parse_layers(values: Sequence[LayerName] | None) -> tuple[LayerName, ...] | None:
    """:func:`parse_layer` over a list; ``None`` (all layers) stays ``None``."""
    if values is None:
        return None
    return tuple(parse_layer(v) if isinstance(v, str) else v for v in values)


def resolve_layer(layer_names: Sequence[str], layer: LayerName) -> int:
    """Forward-order index of ``layer`` among ``layer_names``; one line naming the choices otherwise."""
    n = len(layer_names)
    if isinstance(layer, bool) or not isinstance(layer, int | str):
        raise RecordError(f"a layer is an index or a name, not {layer!r}")
    if isinstance(layer, int):
        if not -n <= layer < n:
            raise RecordError(f"layer index {layer} out of range: the model has {n} cross-attention layers")
        return layer % n
    name = layer.removesuffix(".processor")
    matches = [i for i, known in enumerate(layer_names) if known == name]
    if not matches:
        matches = [i for i, known in enumerate(layer_names) if known.startswith(name + ".")]
    if len(matches) != 1:
        listing = ", ".join(f"{i}: {known}" for i, known in enumerate(layer_names))
        why = "is ambiguous" if matches else "is not a cross-attention layer of this model"
        raise RecordError(f"layer {layer!r} {why}; the layers are {listing}")
    return matches[0]
