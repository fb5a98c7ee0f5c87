"""Where BOS, prompt tokens, the first EOS and the padding sit in a tokenized prompt.

Positions are found from the first EOS, never from the pad id: SD2 and SDXL's second tokenizer pad
with "!" (id 0), which a literal "!" in the prompt also produces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from memattn.errors import LayoutError

CONTEXT_LENGTH = 77


@dataclass(frozen=True)
class TokenLayout:
    """Layout of one tokenized prompt over the text-encoder context (77 positions in SD).

    ``eos_index`` is the first EOS; the official code's prompt length ``len`` is ``eos_index + 1``.
    Summary tokens are the first EOS and everything after it; padding is everything after it.
    """

    eos_index: int
    context_length: int = CONTEXT_LENGTH
    bos_index: int = 0
    truncated: bool = False
    tokens: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not 0 < self.eos_index < self.context_length:
            raise LayoutError(
                f"EOS index {self.eos_index} is outside 1..{self.context_length - 1}; a prompt needs at "
                "least BOS and EOS inside the context window"
            )

    @property
    def n_tokens(self) -> int:
        """Tokens of the unpadded prompt including BOS and EOS (the official code's ``len``)."""
        return self.eos_index + 1

    @property
    def prompt_span(self) -> range:
        return range(self.bos_index + 1, self.eos_index)

    @property
    def summary_span(self) -> range:
        return range(self.eos_index, self.context_length)

    @property
    def padding_span(self) -> range:
        return range(self.eos_index + 1, self.context_length)

    def token(self, position: int) -> str:
        """Readable token at a position (BPE end-of-word marker removed)."""
        if self.tokens is None:
            return f"#{position}"
        return self.tokens[position].replace("</w>", "")

    @classmethod
    def from_ids(
        cls,
        ids: Sequence[int],
        eos_id: int,
        *,
        truncated: bool = False,
        tokens: Sequence[str] | None = None,
    ) -> TokenLayout:
        """Layout from padded ids: the first EOS after BOS (position ≥ 1) marks the summary tokens."""
        ids = [int(i) for i in ids]
        for position in range(1, len(ids)):
            if ids[position] == eos_id:
                return cls(
                    eos_index=position,
                    context_length=len(ids),
                    truncated=truncated,
                    tokens=tuple(tokens) if tokens is not None else None,
                )
        raise LayoutError(
            f"no EOS (id {eos_id}) after position 0 in {len(ids)} ids; tokenize with the pipeline's "
            "tokenizer (padding='max_length', truncation=True) so BOS and EOS are added"
        )

    @classmethod
    def from_length(cls, n_tokens: int, context_length: int = CONTEXT_LENGTH) -> TokenLayout:
        """Layout for prompts given only as embeddings: ``n_tokens`` counts BOS and EOS."""
        if not 2 <= n_tokens <= context_length:
            raise LayoutError(
                f"prompt length {n_tokens} must count BOS and EOS and lie in 2..{context_length}"
            )
        return cls(eos_index=n_tokens - 1, context_length=context_length)

    def merged(self, other: TokenLayout) -> TokenLayout:
        """One layout for encoders that share positions (SDXL): summary from the earliest EOS.

        The tokenizers of SDXL can disagree on prompts with "!"; from the earliest EOS on, at least one
        encoder's key summarises the prompt, so those positions count as summary tokens.
        """
        if other.context_length != self.context_length:
            raise LayoutError(
                f"encoders disagree on context length ({self.context_length} vs {other.context_length})"
            )
        first = self if self.eos_index <= other.eos_index else other
        return TokenLayout(
            eos_index=first.eos_index,
            context_length=self.context_length,
            truncated=self.truncated or other.truncated,
            tokens=self.tokens if self.tokens is not None else other.tokens,
        )


def tokenize_layouts(tokenizer: Any, prompts: Sequence[str]) -> list[TokenLayout]:
    """Layouts exactly as a diffusers pipeline tokenizes: pad to max length, truncate."""
    if not prompts:
        return []
    max_length = int(tokenizer.model_max_length)
    if max_length > 4096:
        raise LayoutError(
            f"tokenizer.model_max_length is {max_length}; set it to the text encoder's context (77 for CLIP)"
        )
    padded = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True)
    untruncated = tokenizer(list(prompts), padding=False, truncation=False)
    layouts = []
    for ids, raw in zip(padded["input_ids"], untruncated["input_ids"], strict=True):
        layouts.append(
            TokenLayout.from_ids(
                ids,
                tokenizer.eos_token_id,
                truncated=len(raw) > max_length,
                tokens=tokenizer.convert_ids_to_tokens(list(ids)),
            )
        )
    return layouts


def pipeline_layouts(
    tokenizers: Sequence[Any], prompts: Sequence[str], prompts_2: Sequence[str] | None = None
) -> list[TokenLayout]:
    """Layouts for a pipeline's tokenizer(s); SDXL's second tokenizer may get its own prompts."""
    if not tokenizers:
        raise LayoutError("the pipeline has no tokenizer; pass `lengths=` to trace() instead")
    if prompts_2 is not None and len(prompts_2) != len(prompts):
        raise LayoutError(
            f"{len(prompts_2)} prompt_2 entries for {len(prompts)} prompts; give one per prompt"
        )
    layouts = tokenize_layouts(tokenizers[0], prompts)
    for tokenizer in tokenizers[1:]:
        other = tokenize_layouts(tokenizer, prompts_2 if prompts_2 is not None else prompts)
        layouts = [a.merged(b) for a, b in zip(layouts, other, strict=True)]
    return layouts
