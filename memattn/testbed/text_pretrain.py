"""Contrastive pre-training of the testbed's text encoder (CLIP's loss at CPU scale), before it is frozen.

A random frozen ``CLIPTextModel`` gives near-identical EOS and padding states for every prompt (cosine
0.74-0.96 across prompts), unlike CLIP. Training it with CLIP's symmetric InfoNCE loss on the pooled
(first-EOS) state against a small CNN image encoder, on fresh renders of random objects with random
phrasings, makes the summary states prompt-specific as in CLIP. The image encoder is thrown away; the
text encoder is then frozen for the diffusion training. Seeded: same seed and steps, same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from memattn.testbed.alignment import conv_layers
from memattn.testbed.model import tokenize


class ImageEncoder(nn.Module):
    """Three conv layers and a projection: ``(N, 3, S, S)`` in [-1, 1] -> ``(N, dim)``."""

    def __init__(self, dim: int, width: int = 48) -> None:
        super().__init__()
        self.net = nn.Sequential(
            *conv_layers(width), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, dim)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


@dataclass(frozen=True)
class PretrainLog:
    """What pre-training reached: final loss and in-batch text->image retrieval accuracy."""

    steps: int
    final_loss: float
    retrieval_accuracy: float

    def as_dict(self) -> dict[str, float]:
        return {
            "steps": self.steps,
            "final_loss": self.final_loss,
            "retrieval_accuracy": self.retrieval_accuracy,
        }


def pretrain_text_encoder(
    text_encoder: nn.Module,
    tokenizer,
    dataset,
    *,
    steps: int,
    seed: int = 0,
    batch_size: int = 256,
    lr: float = 1e-3,
    pool: str = "eos",
    progress: bool = True,
) -> PretrainLog:
    """Train ``text_encoder`` in place with CLIP's loss; returns the last steps' loss and accuracy.

    ``dataset`` renders the images and phrases the captions (``random_scenes``, ``random_captions``).
    ``pool``: ``"eos"`` (CLIP: the first-EOS state) or ``"summary"`` (a random position from the first
    EOS to the end, per caption: the far padding must then describe the prompt as well).
    """
    rng = np.random.default_rng((seed, 31))
    torch.manual_seed(seed + 31)
    dim = text_encoder.config.hidden_size
    images_net = ImageEncoder(dim)
    text_projection = nn.Linear(dim, dim, bias=False)
    log_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
    parameters = [
        *text_encoder.parameters(),
        *images_net.parameters(),
        *text_projection.parameters(),
        log_scale,
    ]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    text_encoder.train().requires_grad_(True)
    losses, accuracies = [], []
    for _ in tqdm(range(steps), desc="text encoder (contrastive)", disable=not progress):
        images, attributes = dataset.random_scenes(batch_size, rng)
        captions = dataset.random_captions(attributes, rng)
        # Identical objects in a batch are true pairs too: their off-diagonal logits are excluded.
        keys = torch.tensor(np.unique([str(sorted(a.items())) for a in attributes], return_inverse=True)[1])
        same = keys[:, None] == keys[None, :]
        ids = tokenize(tokenizer, captions)
        output = text_encoder(ids)
        if pool == "summary":
            eos = (ids == tokenizer.eos_token_id).int().argmax(-1)
            offset = torch.from_numpy(rng.random(batch_size)) * (ids.shape[1] - eos)
            position = (eos + offset.long()).clamp(max=ids.shape[1] - 1)
            pooled = output.last_hidden_state[torch.arange(batch_size), position]
        else:
            pooled = output.pooler_output
        text = F.normalize(text_projection(pooled), dim=-1)
        image = F.normalize(images_net(torch.from_numpy(images)), dim=-1)
        logits = log_scale.exp().clamp(max=100) * text @ image.T
        logits = logits.masked_fill(same & ~torch.eye(batch_size, dtype=torch.bool), float("-inf"))
        target = torch.arange(batch_size)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        accuracies.append(float((logits.argmax(-1) == target).float().mean()))
    text_encoder.eval().requires_grad_(False)
    tail = max(1, steps // 10)
    return PretrainLog(
        steps=steps,
        final_loss=float(np.mean(losses[-tail:])) if losses else float("nan"),
        retrieval_accuracy=float(np.mean(accuracies[-tail:])) if accuracies else float("nan"),
    )


def summary_state_similarity(text_encoder: nn.Module, tokenizer, captions: list[str]) -> dict[str, float]:
    """Mean cosine across prompts of the first-EOS state and of the state 10 positions after it.

    Near 1: a prompt-independent key (a candidate sink); near 0: prompt-specific, as in CLIP.
    """
    ids = tokenize(tokenizer, captions)
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
    eos = (ids == tokenizer.eos_token_id).int().argmax(-1)
    rows = torch.arange(len(captions))
    out = {}
    for name, offset in (("eos", 0), ("padding_10", 10)):
        states = F.normalize(hidden[rows, (eos + offset).clamp(max=ids.shape[1] - 1)], dim=-1)
        cosine = states @ states.T
        off_diagonal = cosine[~torch.eye(len(captions), dtype=torch.bool)]
        out[name] = float(off_diagonal.mean())
    return out
