"""The sink hunt's probe: where a testbed UNet's text attention goes, per layer, during training.

Stable Diffusion parks most of its text attention on BOS (an attention "sink"); the paper's E, D and
BOS x C rest on that. This measures, on a fixed seeded probe, how much of the conditional attention
the BOS token, the prompt words and the summary tokens (first EOS and after) receive in each layer,
for seen-once and for memorized training pairs, so every checkpoint says how far a recipe has come.
"""

from __future__ import annotations

from typing import Any

import torch

import memattn
from memattn.attention.tokens import TokenLayout

PROBE_TIMESTEPS = (999, 500, 100)
PROBE_PER_GROUP = 32


def _probe_rows(trainer: Any, group: str, duplication: int | None = None) -> list[int]:
    items = [
        i
        for i, item in enumerate(trainer.dataset.items)
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


def attention_shares(trainer: Any) -> dict:
    """Per-layer shares for seen-once and for the most duplicated items (``Trainer`` state as it is)."""
    top = max((item.duplication for item in trainer.dataset.items), default=1)
    out: dict[str, Any] = {}
    for name, rows in (
        ("seen_once", _probe_rows(trainer, "seen_once")),
        ("memorized", _probe_rows(trainer, "memorized_matching", top)),
    ):
        if not rows:
            continue
        captions = [trainer.dataset.items[i].caption for i in rows]
        ids = trainer.tokenizer(captions, truncation=True, max_length=77).input_ids
        result = shares(
            trainer.ema,
            trainer.encode(rows),
            [len(i) for i in ids],
            trainer.images[rows],
            trainer.noise_schedule,
        )
        out["layers"] = result.pop("layers")
        out[name] = result
    return out
