"""Wen et al. (ICLR 2024) inference-time mitigation: optimise the prompt embedding before sampling.

At the first denoising step, the conditional text embedding ``e`` (all 77 positions but BOS) is
optimised with AdamW to shrink the text-conditional noise norm ``‖ε(x_T, e) − ε(x_T, e_∅)‖₂`` of each
image, stopping per image once the norm is ≤ ``target_loss`` (at most ``iterations`` steps); the whole
generation then uses the optimised embedding. Defaults follow their ``inference_mem.py``: lr 0.05,
10 iterations, target 3 (a value for SD1's 4×64×64 latents: other models need their own, e.g. a
percentile of their clean prompts' step-1 norms).

It runs as a UNet forward pre-hook on the pipeline's own first call (same ``x_T``, same timestep,
same embeddings), with memattn's probes temporarily swapped for diffusers' default processor, so that the
optimisation's extra UNet calls are invisible to traces and attention edits.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from memattn.attention.patch import wrapping_encode_prompt
from memattn.attention.processor import CrossAttentionProbe
from memattn.errors import MemattnError


@dataclass
class OptimizationLog:
    """Per pipeline call: the norm before and after, and the iterations each image needed."""

    initial: list[list[float]] = field(default_factory=list)
    final: list[list[float]] = field(default_factory=list)
    iterations: list[list[int]] = field(default_factory=list)


@contextlib.contextmanager
def embedding_optimization(
    pipe: Any, *, target_loss: float = 3.0, lr: float = 0.05, iterations: int = 10
) -> Iterator[OptimizationLog]:
    """``with embedding_optimization(pipe) as log: pipe(prompts, guidance_scale=7.5)``."""
    if math.isnan(target_loss) or target_loss < 0:
        raise MemattnError(f"target loss must be a number >= 0 (inf: never optimise), got {target_loss}")
    if not math.isfinite(lr) or lr <= 0 or not isinstance(iterations, int) or iterations < 1:
        raise MemattnError(f"need lr > 0 and iterations >= 1, got lr={lr}, iterations={iterations}")
    unet = pipe.unet
    log = OptimizationLog()
    state: dict[str, Any] = {"embeds": None, "calls": 0}

    def new_call(bound: dict[str, Any], result: tuple) -> tuple:
        state["embeds"], state["calls"] = None, 0
        return result

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        context = kwargs.get("encoder_hidden_states")
        if context is None and len(args) > 2:
            raise MemattnError("pass encoder_hidden_states to the UNet as a keyword, as pipelines do")
        state["calls"] += 1
        if state["embeds"] is None:
            if state["calls"] > 1 or not getattr(pipe, "do_classifier_free_guidance", False):
                raise MemattnError(
                    "Wen et al.'s embedding optimisation needs classifier-free guidance "
                    "(guidance_scale > 1): "
                    "its loss compares the conditional and unconditional noise predictions"
                )
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            state["embeds"] = _optimize(module, args[0], timestep, context, target_loss, lr, iterations, log)
        rows = state["embeds"].shape[0]
        kwargs = dict(kwargs)
        kwargs["encoder_hidden_states"] = torch.cat([context[:-rows], state["embeds"].to(context.dtype)])
        return args, kwargs

    handle = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with wrapping_encode_prompt(pipe, new_call):
            yield log
    finally:
        handle.remove()


def _optimize(
    unet: torch.nn.Module,
    sample: torch.Tensor,
    timestep: Any,
    context: torch.Tensor,
    target_loss: float,
    lr: float,
    iterations: int,
    log: OptimizationLog,
) -> torch.Tensor:
    """The optimised conditional embeddings (rows = the conditional half of the CFG batch)."""
    uncond_context, cond_context = context.chunk(2)
    x = sample.chunk(2)[1].detach()
    processors = unet.attn_processors
    unet.set_attn_processor(
        {
            name: AttnProcessor2_0() if isinstance(processor, CrossAttentionProbe) else processor
            for name, processor in processors.items()
        }
    )
    try:
        with torch.no_grad():
            eps_uncond = unet.forward(x, timestep, encoder_hidden_states=uncond_context).sample.float()
        embeds = cond_context.detach().float().clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([embeds], lr=lr)
        done = torch.zeros(len(embeds), dtype=torch.bool, device=embeds.device)
        used = torch.zeros(len(embeds), dtype=torch.long)
        initial: torch.Tensor | None = None
        with torch.enable_grad():
            for _ in range(iterations + 1):
                eps = unet.forward(x, timestep, encoder_hidden_states=embeds.to(context.dtype)).sample.float()
                loss = (eps - eps_uncond).flatten(1).norm(dim=1)
                initial = loss.detach() if initial is None else initial
                done |= loss.detach() <= target_loss
                if done.all() or int(used.max()) >= iterations:
                    break
                frozen = embeds.detach().clone()
                optimizer.zero_grad()
                loss[~done].sum().backward()
                embeds.grad[:, 0] = 0.0  # BOS is never changed, as in the official code
                optimizer.step()
                with torch.no_grad():  # AdamW's decay moves every entry: put back what must not move
                    embeds[done] = frozen[done]
                    embeds[:, 0] = frozen[:, 0]
                used[~done.cpu()] += 1
    finally:
        unet.set_attn_processor(processors)
    log.initial.append(initial.tolist())
    log.final.append(loss.detach().tolist())
    log.iterations.append(used.tolist())
    return embeds.detach()
