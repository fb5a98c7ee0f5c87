"""Detection scores: pure functions of an :class:`AttentionRecord` (and its token layouts).

Order of operations follows the official code of Ren et al. (2024) (docs/detection.md): average heads per
layer, then the chosen layers, then take the entropy over all tokens. Entropies are in nats, float32,
with ``0·log 0 = 0`` (``torch.special.xlogy``), so masked or underflowed tokens never give NaN.
Higher scores mean "more memorized" for every score here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from memattn.attention.record import AttentionRecord
from memattn.errors import LayoutError, MemattnError, RecordError

LayerSpec = Sequence[int | str] | None


def _layer_indices(record: AttentionRecord, layers: LayerSpec) -> list[int]:
    if layers is None:
        return list(range(record.n_layers))
    indices = [record.layer_index(layer) for layer in layers]
    if not indices:
        raise RecordError("an empty layer selection has no attention to average")
    return indices


def _check_finite_layers(record: AttentionRecord, mean: torch.Tensor, layers: list[int]) -> None:
    if torch.isnan(mean).any():
        raise RecordError(
            f"layers {layers} were not all called in every recorded step (NaN in the record); "
            "select layers the model ran"
        )


def mean_attention(record: AttentionRecord, layers: LayerSpec = None, uncond: bool = False) -> torch.Tensor:
    """``[step, image, token]``: head mean per layer, then mean over the chosen layers."""
    indices = _layer_indices(record, layers)
    mean = record.head_mean(uncond=uncond)[:, indices].mean(dim=1)
    _check_finite_layers(record, mean, indices)
    return mean


def entropy(distribution: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats, float32, with ``0·log 0 = 0``."""
    p = distribution.float().clamp_min(0.0)
    return -torch.special.xlogy(p, p).sum(dim=dim)


def entropy_curve(record: AttentionRecord, layers: LayerSpec = None) -> torch.Tensor:
    """``[step, image]`` entropy over all tokens (BOS included) of the layer-mean attention."""
    return entropy(mean_attention(record, layers))


def layer_entropy_curves(record: AttentionRecord) -> torch.Tensor:
    """``[step, layer, image]`` entropy of each layer on its own."""
    return entropy(record.head_mean())


def _summary_mask(record: AttentionRecord) -> torch.Tensor:
    """``[image, token]`` True on summary tokens (first EOS and everything after it)."""
    layouts = record.require_layouts()
    tokens = record.attention.shape[-1]
    mask = torch.zeros(len(layouts), tokens, dtype=torch.bool)
    for image, layout in enumerate(layouts):
        if layout.width != tokens:
            raise RecordError(f"layout has {layout.width} positions, the record {tokens} tokens")
        mask[image, list(layout.summary_positions)] = True
    return mask


def summary_entropy_curve(record: AttentionRecord, layers: LayerSpec = None) -> torch.Tensor:
    """``[step, image]`` partial entropy over the summary tokens (no renormalisation, as the paper)."""
    p = mean_attention(record, layers).clamp_min(0.0)
    terms = -torch.special.xlogy(p, p)
    return (terms * _summary_mask(record)).sum(dim=-1)


def bos_share(record: AttentionRecord, layers: LayerSpec = None, step: int = 0) -> torch.Tensor:
    """``[image]`` attention share of BOS at ``step`` (the first by default); defined only with a BOS."""
    layouts = record.require_layouts()
    missing = [i for i, layout in enumerate(layouts) if not layout.has_bos]
    if missing:
        raise LayoutError(
            f"the BOS share is not defined for images {missing}: their tokenizer (T5) adds no BOS token; "
            "use the summary (EOS) share, score E or score D instead"
        )
    return mean_attention(record, layers)[step, :, 0]


def summary_share(record: AttentionRecord, layers: LayerSpec = None, step: int = 0) -> torch.Tensor:
    """``[image]`` attention share of the summary tokens (first EOS on; padding is 0 where masked)."""
    mask = _summary_mask(record)  # checks that the layouts fit the record
    return (mean_attention(record, layers)[step] * mask).sum(dim=-1)


def token_mass(
    record: AttentionRecord, layers: LayerSpec = None, steps: Sequence[int] | None = None
) -> torch.Tensor:
    """``[image, token]`` attention share per token, averaged over the chosen steps and layers."""
    mean = mean_attention(record, layers)
    if steps is not None:
        mean = mean[list(steps)]
    return mean.mean(dim=0)


@dataclass(frozen=True)
class TriggerToken:
    """A prompt token and the share of the image's token attention it receives."""

    position: int
    token: str
    share: float


def trigger_tokens(
    record: AttentionRecord, k: int = 3, layers: LayerSpec = None, steps: Sequence[int] | None = None
) -> list[list[TriggerToken]]:
    """Per image, the ``k`` prompt tokens (BOS and summary tokens excluded) with most attention."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise MemattnError(f"trigger_tokens: k must be a non-negative integer, got {k!r}")
    layouts = record.require_layouts()
    mass = token_mass(record, layers, steps)
    result = []
    for image, layout in enumerate(layouts):
        span = list(layout.prompt_positions)
        if not span:
            result.append([])
            continue
        shares = mass[image, span]
        top = torch.topk(shares, min(k, len(span)))
        result.append(
            [
                TriggerToken(span[i], layout.token(span[i]), float(s))
                for s, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            ]
        )
    return result


def last_steps(n_steps: int, fraction: float = 0.2) -> range:
    """The last ``fraction`` of the steps (steps 40–49 of 50), at least one step."""
    count = max(1, int(n_steps * fraction + 0.5))
    return range(n_steps - count, n_steps)


def score_d(record: AttentionRecord, fraction: float = 0.2, layers: LayerSpec = None) -> torch.Tensor:
    """Score D per image: mean entropy over the last steps + (summary entropy there − at step 0).

    All layers by default, as the official code. Needs at least two steps.
    """
    if record.n_steps < 2:
        raise RecordError(
            f"score D compares the last steps with the first and needs ≥ 2 steps; the record has "
            f"{record.n_steps} (run the full generation, or use score E which needs one step)"
        )
    if not 0.0 < fraction < 1.0:
        raise RecordError(f"fraction {fraction} must lie strictly between 0 and 1")
    late = list(last_steps(record.n_steps, fraction))
    curve = entropy_curve(record, layers)
    summary = summary_entropy_curve(record, layers)
    return curve[late].mean(dim=0) + (summary[late].mean(dim=0) - summary[0])


def score_e(record: AttentionRecord, layer: int | str | None = None) -> torch.Tensor:
    """Score E per image: entropy at the first step in one layer (default: the paper's layer)."""
    index = record.default_e_layer() if layer is None else record.layer_index(layer)
    return entropy_curve(record, [index])[0]
