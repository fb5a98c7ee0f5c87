"""The sink hunt's probe: where a testbed UNet's text attention goes, per layer, during training.

Stable Diffusion parks most of its text attention on BOS (an attention "sink"); the paper's E, D and
BOS x C rest on that. This measures, on a fixed seeded probe, how much of the conditional attention
the BOS token, the prompt words and the summary tokens (first EOS and after) receive in each layer,
for seen-once and for memorized training pairs, so every checkpoint says how far a recipe has come.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import memattn
from memattn.attention.tokens import TokenLayout

PROBE_TIMESTEPS = (999, 500, 100)
PROBE_PER_GROUP = 32


def _probe_items(dataset: Any, group: str, duplication: int | None = None) -> list[Any]:
    items = [
        item
        for item in dataset.items
        if item.group == group and (duplication is None or item.duplication == duplication)
    ]
    return items[:PROBE_PER_GROUP]


@torch.no_grad()
def shares(
    unet: Any, embeddings: torch.Tensor, lengths: list[int], images: torch.Tensor, schedule: Any
) -> dict:
    """Mean BOS / prompt / summary share per layer over ``PROBE_TIMESTEPS`` (one UNet call each)."""
    generator = torch.Generator().manual_seed(1234)
    noise = torch.randn(images.shape, generator=generator)
    layouts = [TokenLayout.from_length(n) for n in lengths]
    per_step = []
    with memattn.trace(unet, lengths=lengths, cfg=False) as tr:
        for t in PROBE_TIMESTEPS:
            timesteps = torch.full((len(images),), t, dtype=torch.long)
            unet(schedule.add_noise(images, noise, timesteps), timesteps, encoder_hidden_states=embeddings)
        record = tr.record
    attention = record.head_mean()  # [step, layer, image, token]
    for step in range(attention.shape[0]):
        bos = attention[step, :, :, 0]
        summary = torch.stack(
            [attention[step, :, i, layout.eos_index :].sum(-1) for i, layout in enumerate(layouts)], -1
        )
        per_step.append((bos, summary))
    bos = torch.stack([b for b, _ in per_step]).mean(0).mean(-1)  # [layer]
    summary = torch.stack([s for _, s in per_step]).mean(0).mean(-1)
    return {
        "bos_share": [round(float(v), 4) for v in bos],
        "summary_share": [round(float(v), 4) for v in summary],
        "prompt_share": [round(float(1 - b - s), 4) for b, s in zip(bos, summary, strict=True)],
        "layers": list(record.layer_names),
    }


def attention_shares(
    dataset: Any, unet: Any, tokenizer: Any, encode: Callable[[list[str]], torch.Tensor], schedule: Any
) -> dict:
    """Per-layer shares for seen-once and for the most duplicated items of ``dataset``, as ``unet`` (the
    EMA UNet of a training run) attends now; ``encode`` gives the frozen encoder's states of captions."""
    top = max((item.duplication for item in dataset.items), default=1)
    out: dict[str, Any] = {}
    for name, items in (
        ("seen_once", _probe_items(dataset, "seen_once")),
        ("memorized", _probe_items(dataset, "memorized_matching", top)),
    ):
        if not items:
            continue
        captions = [item.caption for item in items]
        states = encode(captions)
        images = torch.from_numpy(dataset.images(items)).to(states.device)
        lengths = [len(ids) for ids in tokenizer(captions, truncation=True, max_length=77).input_ids]
        result = shares(unet, states, lengths, images, schedule)
        out["layers"] = result.pop("layers")
        out[name] = result
    return out
