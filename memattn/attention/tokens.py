"""Where BOS, prompt tokens, the first EOS and the padding sit in a tokenized prompt.

Positions are found from the first EOS, never from the pad id: SD2 and SDXL's second tokenizer pad
with "!" (id 0), which a literal "!" in the prompt also produces.

Two text conventions are described by one :class:`TokenLayout` (docs/models.md):

- **CLIP** (SD1/SD2/SDXL): BOS at 0, prompt words, EOS, padding to 77; the denoiser attends to every
  position (no attention mask), so the padding is attendable and counts as summary tokens.
- **T5** (PixArt-α/Σ): no BOS (position 0 is the first word), prompt words, ``</s>``, ``<pad>`` up to
  the length the *pipeline* encodes (``max_sequence_length``: 120 for α, 300 for Σ; never
  ``tokenizer.model_max_length``), and the pipeline hands the tokenizer's attention mask to the
  denoiser, so only the words and EOS are attendable (``attended = eos_index + 1``).
- **CLIP + T5** (SD3/SD3.5): the 77 CLIP positions (CLIP-L and CLIP-G share them, as in SDXL), then
  the T5 sequence of ``max_sequence_length`` positions, unmasked: a CLIP layout with the T5 layout as
  its ``tail``. Summary tokens are the CLIP EOS and its padding *and* the T5 ``</s>`` and its padding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from memattn.errors import LayoutError

CONTEXT_LENGTH = 77


@dataclass(frozen=True)
class TokenLayout:
    """Layout of one tokenized prompt over the text-encoder context (77 positions in SD).

    ``eos_index`` is the first EOS; the official code's prompt length ``len`` is ``eos_index + 1``.
    Summary tokens are the first EOS and everything after it; padding is everything after it.
    ``bos_index`` is ``None`` for tokenizers that add no BOS (T5): the prompt then starts at 0.
    ``attended`` is how many leading positions the denoiser's own attention mask lets through
    (``None``: all of them, as in CLIP pipelines, which pass no mask).
    """

    eos_index: int
    context_length: int = CONTEXT_LENGTH
    bos_index: int | None = 0
    truncated: bool = False
    tokens: tuple[str, ...] | None = None
    attended: int | None = None
    tail: TokenLayout | None = None  # a second text sequence after these positions (SD3: T5 after CLIP)

    def __post_init__(self) -> None:
        if self.tail is not None and (self.attended is not None or self.tail.attended is not None):
            raise LayoutError("a layout with a tail (SD3: CLIP then T5) describes unmasked text only")
        if self.bos_index is not None and self.bos_index != 0:
            raise LayoutError(f"BOS sits at position 0 or nowhere (None), not at {self.bos_index}")
        first = self.first_word
        if not first <= self.eos_index < self.context_length:
            needs = "BOS and EOS" if self.has_bos else "EOS"
            raise LayoutError(
                f"EOS index {self.eos_index} is outside {first}..{self.context_length - 1}; a prompt needs "
                f"at least {needs} inside the context window"
            )
        if self.attended is not None and not self.eos_index < self.attended <= self.context_length:
            raise LayoutError(
                f"{self.attended} attended positions must cover the EOS ({self.eos_index}) and lie within "
                f"the context ({self.context_length})"
            )

    @property
    def has_bos(self) -> bool:
        return self.bos_index is not None

    @property
    def first_word(self) -> int:
        """Position of the first prompt word: 1 after a BOS, 0 without one."""
        return 0 if self.bos_index is None else self.bos_index + 1

    @property
    def n_tokens(self) -> int:
        """Tokens of the unpadded prompt including BOS (if any) and EOS (the official code's ``len``)."""
        return self.eos_index + 1

    @property
    def prompt_span(self) -> range:
        """The prompt words of the first sequence (see :attr:`prompt_positions` for all of them)."""
        return range(self.first_word, self.eos_index)

    @property
    def width(self) -> int:
        """Text positions the denoiser's layer attends over: this sequence and its tail, if any."""
        return self.context_length + (0 if self.tail is None else self.tail.width)

    @property
    def segments(self) -> tuple[tuple[int, int, int, int], ...]:
        """``(offset, first_word, eos_index, end)`` per sequence, in absolute positions (small, hashable)."""
        own = ((0, self.first_word, self.eos_index, self.context_length),)
        if self.tail is None:
            return own
        shift = self.context_length
        return own + tuple((o + shift, f + shift, e + shift, n + shift) for o, f, e, n in self.tail.segments)

    @property
    def prompt_positions(self) -> tuple[int, ...]:
        """Every prompt word's position, over all sequences (SD3: the CLIP words, then the T5 words)."""
        return tuple(p for _, first, eos, _ in self.segments for p in range(first, eos))

    @property
    def summary_positions(self) -> tuple[int, ...]:
        """Every sequence's first EOS and what follows it (the summary tokens of score D)."""
        return tuple(p for _, _, eos, end in self.segments for p in range(eos, end))

    @property
    def eos_positions(self) -> tuple[int, ...]:
        return tuple(eos for _, _, eos, _ in self.segments)

    def with_tail(self, tail: TokenLayout) -> TokenLayout:
        """This layout followed by ``tail`` (SD3: the T5 sequence after the 77 CLIP positions)."""
        return replace(self, tail=tail, truncated=self.truncated or tail.truncated)

    @property
    def summary_span(self) -> range:
        return range(self.eos_index, self.context_length)

    @property
    def padding_span(self) -> range:
        return range(self.eos_index + 1, self.context_length)

    @property
    def attendable_span(self) -> range:
        """Positions the denoiser can attend to (its own mask hides the rest)."""
        return range(self.width if self.attended is None else self.attended)

    @property
    def padding_masked(self) -> bool:
        """The denoiser's own attention mask hides the padding (T5 pipelines)."""
        return self.attended is not None and self.attended <= self.eos_index + 1

    def token(self, position: int) -> str:
        """Readable token at a position (BPE end-of-word marker removed)."""
        if self.tail is not None and position >= self.context_length:
            return self.tail.token(position - self.context_length)
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
        bos: bool = True,
        attention_mask: Sequence[int] | None = None,
    ) -> TokenLayout:
        """Layout from padded ids: the first EOS after BOS (position ≥ 1) marks the summary tokens.

        ``bos=False`` (T5): the first EOS at any position. ``attention_mask``: the tokenizer's mask
        that the pipeline hands to the denoiser (right-padded: ones, then zeros), setting ``attended``.
        """
        ids = [int(i) for i in ids]
        start = 1 if bos else 0
        for position in range(start, len(ids)):
            if ids[position] == eos_id:
                return cls(
                    eos_index=position,
                    context_length=len(ids),
                    bos_index=0 if bos else None,
                    truncated=truncated,
                    tokens=tuple(tokens) if tokens is not None else None,
                    attended=None if attention_mask is None else _attended(attention_mask, len(ids)),
                )
        if not bos:
            raise LayoutError(
                f"no EOS (id {eos_id}) in {len(ids)} ids; tokenize with add_special_tokens=True and "
                "truncation=True as the pipeline does, so EOS is added"
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

    @classmethod
    def from_mask(cls, attention_mask: Sequence[int], *, bos: bool) -> TokenLayout:
        """Layout of a prompt given as embeddings with its attention mask (PixArt's
        ``prompt_attention_mask``): the last attended position is the EOS."""
        attended = _attended(attention_mask, len(attention_mask))
        if attended == 0:
            raise LayoutError("a prompt_attention_mask row attends to no position; it needs at least the EOS")
        return cls(
            eos_index=attended - 1,
            context_length=len(attention_mask),
            bos_index=0 if bos else None,
            attended=attended,
        )

    def merged(self, other: TokenLayout) -> TokenLayout:
        """One layout for encoders that share positions (SDXL): summary from the earliest EOS.

        The tokenizers of SDXL can disagree on prompts with "!"; from the earliest EOS on, at least one
        encoder's key summarises the prompt, so those positions count as summary tokens.
        """
        if other.context_length != self.context_length:
            raise LayoutError(
                f"encoders disagree on context length ({self.context_length} vs {other.context_length})"
            )
        if other.bos_index != self.bos_index or other.attended is not None or self.attended is not None:
            raise LayoutError(
                "only CLIP layouts (BOS at 0, no attention mask) share positions across encoders"
            )
        first = self if self.eos_index <= other.eos_index else other
        return TokenLayout(
            eos_index=first.eos_index,
            context_length=self.context_length,
            truncated=self.truncated or other.truncated,
            tokens=self.tokens if self.tokens is not None else other.tokens,
        )


def _attended(mask: Sequence[int], length: int) -> int:
    """Leading ones of a right-padded attention mask; any other shape is refused."""
    values = [int(v) for v in mask]
    count = sum(values)
    if len(values) != length or values != [1] * count + [0] * (length - count):
        raise LayoutError(
            "the tokenizer's attention mask is not ones followed by zeros; memattn reads right-padded "
            "prompts only (set tokenizer.padding_side='right')"
        )
    return count


def encode_length(pipeline: Any) -> int:
    """Positions the pipeline encodes by default: its ``encode_prompt``'s ``max_sequence_length`` default
    (PixArt: 120 / 300), else the tokenizer's ``model_max_length`` (CLIP: 77)."""
    import inspect

    encode = getattr(pipeline, "encode_prompt", None)
    if callable(encode):
        parameter = inspect.signature(encode).parameters.get("max_sequence_length")
        if parameter is not None and isinstance(parameter.default, int):
            return parameter.default
    return int(pipeline.tokenizer.model_max_length)


def adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts a BOS token first (CLIP does, T5 does not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


@dataclass(frozen=True)
class EncodeSpec:
    """How a pipeline's ``encode_prompt`` call tokenizes, read from the call's own arguments.

    ``max_length``: the ``max_sequence_length`` argument (or the signature's default) where the
    pipeline has one (PixArt, …), else ``None``: the tokenizer's ``model_max_length`` (CLIP, 77).
    ``masked``: the pipeline hands the tokenizer's attention mask to the denoiser (its
    ``encode_prompt`` takes a ``prompt_attention_mask``). ``preprocess``: the pipeline's own text
    preprocessing (PixArt lowercases, or cleans captions), applied before tokenizing.
    """

    max_length: int | None = None
    masked: bool = False
    preprocess: Callable[[list[str]], list[str]] | None = None

    def prepare(self, prompts: Sequence[str]) -> list[str]:
        return list(prompts) if self.preprocess is None else list(self.preprocess(list(prompts)))


def encode_spec(pipeline: Any, arguments: dict[str, Any]) -> EncodeSpec:
    """The :class:`EncodeSpec` of one ``encode_prompt`` call (arguments bound with defaults)."""
    length = arguments.get("max_sequence_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
        raise LayoutError(f"max_sequence_length must be a positive integer, got {length!r}")
    preprocess = None
    if callable(getattr(pipeline, "_text_preprocessing", None)):
        clean = bool(arguments.get("clean_caption", False))

        def preprocess(prompts: list[str]) -> list[str]:
            # the pipeline warns itself when clean_caption lacks bs4/ftfy; do not repeat it
            logger = logging.getLogger(type(pipeline).__module__)
            level = logger.level
            logger.setLevel(logging.ERROR)
            try:
                return pipeline._text_preprocessing(prompts, clean_caption=clean)
            finally:
                logger.setLevel(level)

    return EncodeSpec(max_length=length, masked="prompt_attention_mask" in arguments, preprocess=preprocess)


def tokenize_layouts(
    tokenizer: Any, prompts: Sequence[str], *, max_length: int | None = None, masked: bool = False
) -> list[TokenLayout]:
    """Layouts exactly as a diffusers pipeline tokenizes: pad to max length, truncate.

    ``max_length`` is the length the pipeline encodes (``None``: ``tokenizer.model_max_length``, as
    CLIP pipelines do); ``masked`` records the tokenizer's attention mask as ``attended``. BOS is
    where the tokenizer puts it: a layout has one only if every prompt starts with ``bos_token_id``.
    """
    if not prompts:
        return []
    if max_length is None:
        max_length = int(tokenizer.model_max_length)
        if max_length > 4096:
            raise LayoutError(
                f"tokenizer.model_max_length is {max_length}; set it to the text encoder's context "
                "(77 for CLIP)"
            )
    padded = tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True
    )
    untruncated = tokenizer(list(prompts), padding=False, truncation=False)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    bos = bos_id is not None and all(ids[:1] == [bos_id] for ids in padded["input_ids"])
    masks = padded["attention_mask"] if masked else [None] * len(padded["input_ids"])
    layouts = []
    for ids, raw, mask in zip(padded["input_ids"], untruncated["input_ids"], masks, strict=True):
        layouts.append(
            TokenLayout.from_ids(
                ids,
                tokenizer.eos_token_id,
                truncated=len(raw) > max_length,
                tokens=tokenizer.convert_ids_to_tokens(list(ids)),
                bos=bos,
                attention_mask=mask,
            )
        )
    return layouts


def pipeline_layouts(
    tokenizers: Sequence[Any],
    prompts: Sequence[str],
    prompts_2: Sequence[str] | None = None,
    *,
    spec: EncodeSpec | None = None,
    tail_tokenizer: Any = None,
    prompts_3: Sequence[str] | None = None,
) -> list[TokenLayout]:
    """Layouts for a pipeline's tokenizer(s); SDXL's second tokenizer may get its own prompts.

    ``tail_tokenizer`` (SD3's T5, ``tokenizer_3``) adds a second sequence after the CLIP positions: the
    CLIP tokenizers then encode ``model_max_length`` (77) positions and the tail the call's
    ``max_sequence_length``, with ``prompts_3`` (default: the prompts) as SD3 does.
    """
    if not tokenizers:
        raise LayoutError("the pipeline has no tokenizer; pass `lengths=` to trace() instead")
    for name, others in (("prompt_2", prompts_2), ("prompt_3", prompts_3)):
        if others is not None and len(others) != len(prompts):
            raise LayoutError(f"{len(others)} {name} entries for {len(prompts)} prompts; give one per prompt")
    spec = spec or EncodeSpec()
    options = dict(max_length=spec.max_length, masked=spec.masked)
    if tail_tokenizer is not None:
        options = dict(max_length=None, masked=False)  # SD3 encodes CLIP at 77, T5 at the call's length
    layouts = tokenize_layouts(tokenizers[0], spec.prepare(prompts), **options)
    for tokenizer in tokenizers[1:]:
        other = tokenize_layouts(
            tokenizer, spec.prepare(prompts_2 if prompts_2 is not None else prompts), **options
        )
        layouts = [a.merged(b) for a, b in zip(layouts, other, strict=True)]
    if tail_tokenizer is not None:
        tails = tokenize_layouts(
            tail_tokenizer,
            spec.prepare(prompts_3 if prompts_3 is not None else prompts),
            max_length=spec.max_length,
        )
        layouts = [a.with_tail(b) for a, b in zip(layouts, tails, strict=True)]
    return layouts
