"""What a trace recorded: token-attention mass per step, layer, image, head and token."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memattn.attention.layers import resolve_layer
from memattn.attention.tokens import TokenLayout
from memattn.errors import LayoutError, RecordError

# The layer the paper's score E reads in SD1.x (forward index 3, 32×32 at 512 px).
PAPER_E_LAYER = "down_blocks.1.attentions.1.transformer_blocks.0.attn2"


@dataclass
class AttentionRecord:
    """Conditional-branch cross-attention of one pipeline call, in float32 on the CPU.

    ``attention[step, layer, image, head, token]`` is the mean over query pixels of the attention
    probabilities. Layers with fewer heads than the widest layer (SD2: 5/10/20) are padded with NaN
    in the head axis; use :meth:`head_mean` rather than averaging that axis yourself.
    Images are the conditional rows in diffusers order: prompt-major, ``images_per_prompt`` each.
    """

    attention: torch.Tensor
    layer_names: tuple[str, ...]
    heads: tuple[int, ...]
    timesteps: torch.Tensor
    layouts: tuple[TokenLayout, ...] | None = None
    prompts: tuple[str, ...] | None = None
    images_per_prompt: int = 1
    uncond_attention: torch.Tensor | None = None
    uncond_layouts: tuple[TokenLayout, ...] | None = None
    maps: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    map_sizes: dict[int, tuple[int, int]] = field(default_factory=dict)
    # Joint attention (SD3): ``[step, layer, image, head]`` mean share of the image queries' joint softmax
    # that falls on text keys (``attention`` is that block renormalised over the text); None elsewhere.
    text_share: torch.Tensor | None = None

    @property
    def n_steps(self) -> int:
        return self.attention.shape[0]

    @property
    def n_layers(self) -> int:
        return self.attention.shape[1]

    @property
    def n_images(self) -> int:
        return self.attention.shape[2]

    def head_mean(self, uncond: bool = False) -> torch.Tensor:
        """``[step, layer, image, token]``: each layer averaged over its own heads."""
        source = self.uncond_attention if uncond else self.attention
        if source is None:
            raise RecordError("no unconditional attention recorded; trace with record_uncond=True")
        if all(h == source.shape[3] for h in self.heads):
            return source.mean(dim=3)
        return torch.stack([source[:, i, :, :h].mean(dim=2) for i, h in enumerate(self.heads)], dim=1)

    def text_share_mean(self) -> torch.Tensor:
        """``[step, layer, image]`` text share, each layer averaged over its own heads (joint models)."""
        if self.text_share is None:
            raise RecordError(
                "no text share recorded: it exists for joint-attention models (SD3) traced with "
                "text_share=True; in cross-attention the text is all a layer reads (share 1)"
            )
        return torch.stack(
            [self.text_share[:, i, :, :h].mean(dim=-1) for i, h in enumerate(self.heads)], dim=1
        )

    def layer_index(self, layer: int | str) -> int:
        """Forward-order index of a layer (the one rule: :func:`~memattn.attention.layers.resolve_layer`)."""
        return resolve_layer(self.layer_names, layer)

    def default_e_layer(self) -> int:
        """The layer score E reads by default.

        SD1.x/SD2.x/SDXL: ``down_blocks.1.attentions.1…attn2`` (the paper's layer, index 3 in SD1).
        Other UNets: the last cross-attention layer of ``down_blocks.1``, else of the down path, else 0.
        """
        if PAPER_E_LAYER in self.layer_names:
            return self.layer_names.index(PAPER_E_LAYER)
        for prefix in ("down_blocks.1.", "down_blocks."):
            found = [i for i, n in enumerate(self.layer_names) if n.startswith(prefix)]
            if found:
                return found[-1]
        return 0

    def require_layouts(self) -> tuple[TokenLayout, ...]:
        """Layouts per image, or a clear error when the prompts were given only as embeddings."""
        if self.layouts is None:
            raise LayoutError(
                "this score needs token layouts, but the prompts were given as prompt_embeds; "
                "pass lengths=[n_tokens incl. BOS and EOS per prompt] to memattn.trace()"
            )
        if len(self.layouts) != self.n_images:
            raise LayoutError(f"{len(self.layouts)} layouts for {self.n_images} recorded images")
        return self.layouts
