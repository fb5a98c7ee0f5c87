"""Which layers of a denoiser memattn reads, in which order, and one rule for naming them.

:func:`cross_attention_layers` finds the text cross-attention layers in forward order; wherever a
layer is named afterwards, one rule applies.

Scores, mitigations, traces, the guard, the training filters and every CLI option accept the same
forms: an index in forward order (negative counts from the end, as in Python), the full diffusers
name of the ``attn2`` module (``.processor`` optional), or the name of a block that holds exactly one
cross-attention layer (``down_blocks.1.attentions.1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers.models.attention_processor import Attention

from memattn.attention.joint import JointAttentionProbe
from memattn.errors import RecordError, UnsupportedModelError

LayerName = int | str
# Transformer denoisers whose attn2 layers and text conventions memattn reads (docs/models.md)
SUPPORTED_TRANSFORMERS = frozenset({"PixArtTransformer2DModel"})
# MMDiT denoisers whose joint attention memattn reads: image queries over [image keys, text keys]
SUPPORTED_JOINT = frozenset({"SD3Transformer2DModel"})
JOINT_PROCESSORS = frozenset({"JointAttnProcessor2_0"})
SUPPORTED_FAMILIES = "UNet2DConditionModel pipelines (SD1.x, SD2.x, SDXL), PixArt-α/Σ and SD3/SD3.5"


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


_SECTION_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def forward_order_key(name: str) -> tuple:
    """Sort key that puts UNet layer names in forward order: down blocks, mid block, up blocks.

    ``attn_processors`` lists modules in registration order (down, up, mid), which is not the order the
    forward pass visits them; numeric parts compare as numbers (``transformer_blocks.10`` after ``.2``).
    """
    parts = name.split(".")
    section = _SECTION_ORDER.get(parts[0], 3)
    return (section, *[(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts])


def find_denoiser(target: Any) -> tuple[Any | None, torch.nn.Module]:
    """Split a pipeline or bare model into (pipeline or None, denoiser module)."""
    if isinstance(target, torch.nn.Module):
        return None, target
    for attribute in ("unet", "transformer"):
        module = getattr(target, attribute, None)
        if isinstance(module, torch.nn.Module):
            return target, module
    raise UnsupportedModelError(
        f"{type(target).__name__} is neither a diffusers pipeline with a `unet` or `transformer` nor a "
        "denoiser module; memattn.trace needs one of those"
    )


def is_joint(module: Attention) -> bool:
    """A joint-attention layer (MMDiT): the text enters through the added projections (``add_k_proj``)."""
    return getattr(module, "add_k_proj", None) is not None and not module.is_cross_attention


def joint_attention_layers(model: torch.nn.Module) -> list[tuple[str, Attention]]:
    """SD3's joint blocks (``transformer_blocks.N.attn``) in forward order; SD3.5's image-only ``attn2``
    (dual attention) has no text and is not one of them."""
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, Attention)
        and is_joint(module)
        and (
            type(module.processor).__name__ in JOINT_PROCESSORS
            or isinstance(module.processor, JointAttentionProbe)
        )
    ]
    return sorted(layers, key=lambda item: forward_order_key(item[0]))


def cross_attention_layers(model: torch.nn.Module) -> list[tuple[str, Attention]]:
    """The layers where the image reads the text, in forward order: ``attn2`` cross-attention (UNets,
    PixArt), or the joint attention of a supported MMDiT (SD3: see :func:`joint_attention_layers`)."""
    kind = type(model).__name__
    if kind in SUPPORTED_JOINT:
        layers = joint_attention_layers(model)
        if not layers:
            processors = sorted({type(p).__name__ for p in model.attn_processors.values()})
            raise UnsupportedModelError(
                f"{kind} has no joint-attention layer with a processor memattn mirrors "
                f"({', '.join(sorted(JOINT_PROCESSORS))}); it has {', '.join(processors)}: call "
                "pipe.transformer.set_default_attn_processor() or remove the custom processors first"
            )
        return layers
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if name.split(".")[-1] == "attn2"
        and isinstance(module, Attention)
        and module.is_cross_attention
        and module.added_kv_proj_dim is None
    ]
    if layers and "Transformer" in kind and kind not in SUPPORTED_TRANSFORMERS:
        # Sana (Gemma text) and other DiTs with attn2: their text conventions (BOS, mask, length) are not
        # described yet, and a wrong layout would misalign records and edits silently.
        raise UnsupportedModelError(
            f"{kind} has text cross-attention (attn2), but to text whose conventions memattn does not "
            "describe yet (no BOS token, padding hidden by an attention mask, a length set by the "
            f"pipeline); its records, D/E and the BOS edit would be silently wrong. memattn supports "
            f"{SUPPORTED_FAMILIES}; this model is not supported yet"
        )
    if layers:
        return sorted(layers, key=lambda item: forward_order_key(item[0]))
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    if "Transformer" in kind or any("Joint" in type(m.processor).__name__ for m in attentions):
        why = (
            "it attends jointly over image and text tokens (an MMDiT such as Flux), and memattn reads "
            "joint attention only in SD3/SD3.5 so far"
        )
    elif any(m.added_kv_proj_dim is not None for m in attentions):
        why = (
            "its text keys/values are prepended to image self-attention (added-KV attention, as in "
            "DeepFloyd IF), which memattn does not read yet"
        )
    else:
        why = "it has no text conditioning at all (e.g. an unconditional UNet2DModel)"
    raise UnsupportedModelError(
        f"{kind} has no text cross-attention layers (attn2): {why}; memattn supports {SUPPORTED_FAMILIES}"
    )
