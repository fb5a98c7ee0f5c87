"""Token layouts (memattn.attention.tokens) on the real CLIP BPE tokenizer, against an independent BPE.

The tokenizers are the real CLIP vocabulary (``memattn.testing.clip_tokenizer``): SD1 / CLIP-L pads with EOS
(49407); SD2 and SDXL's second tokenizer pad with "!" (id 0). ``ReferenceClipBpe`` below is written from
the description of OpenAI CLIP's ``SimpleTokenizer`` and shares no code with memattn or transformers.
"""

from __future__ import annotations

import gzip
import html
import json
import unicodedata
from pathlib import Path

import pytest
import regex

from memattn.attention.tokens import CONTEXT_LENGTH, TokenLayout, pipeline_layouts, tokenize_layouts
from memattn.errors import LayoutError
from memattn.testing import clip_tokenizer, clip_vocab_path

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "data" / "prompts"
BOS, EOS, BANG = 49406, 49407, 0
ASTRONAUT = "a photo of an astronaut riding a horse on mars"
ASTRONAUT_IDS = [BOS, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, EOS]
# The one data prompt where HF's CLIPTokenizer (what diffusers pipelines use) and OpenAI's SimpleTokenizer
# differ: OpenAI html-unescapes the text ("&quot" -> '"'), HF does not and encodes "&", "quot".
HTML_ENTITY_PROMPT = '"""World Map Silhouette - Citrus Fruits&quot  by Alleycatshirts"'


# ---- independent reference: OpenAI CLIP SimpleTokenizer ----------------------------------------------


def _byte_symbols() -> tuple[list[int], dict[int, str]]:
    """GPT-2/CLIP byte table: printable bytes stand for themselves, the other 68 get chr(256 + k).

    Returns the byte order of the first 256 vocabulary ids and the byte -> symbol map.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    symbol = {b: chr(b) for b in printable}
    symbol.update({b: chr(256 + k) for k, b in enumerate(others)})
    return printable + others, symbol


class ReferenceClipBpe:
    """OpenAI CLIP's BPE without ftfy (not installed; HF's CLIPTokenizer does not use it either).

    ``nfc`` stands in for the one part of ``ftfy.fix_text`` that HF's normalizer also does.
    """

    PATTERN = regex.compile(
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        regex.IGNORECASE,
    )

    def __init__(self, path: Path, *, html_unescape: bool = True, nfc: bool = True) -> None:
        lines = gzip.open(path).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        order, self.byte_symbol = _byte_symbols()
        base = [self.byte_symbol[b] for b in order]
        vocab = base + [s + "</w>" for s in base] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {word: i for i, word in enumerate(vocab)}
        self.rank = {pair: i for i, pair in enumerate(merges)}
        self.cache = {s: [s] for s in ("<|startoftext|>", "<|endoftext|>")}
        self.html_unescape = html_unescape
        self.nfc = nfc

    def bpe(self, piece: str) -> list[str]:
        if piece not in self.cache:
            word = [*piece[:-1], piece[-1] + "</w>"]
            while len(word) > 1:
                pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
                best = min(pairs, key=lambda p: self.rank.get(p, len(self.rank)))
                if best not in self.rank:
                    break
                merged, i = [], 0
                while i < len(word):
                    if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                        merged.append(word[i] + word[i + 1])
                        i += 2
                    else:
                        merged.append(word[i])
                        i += 1
                word = merged
            self.cache[piece] = word
        return self.cache[piece]

    def clean(self, text: str) -> str:
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        if self.html_unescape:
            text = html.unescape(html.unescape(text))
        return regex.sub(r"\s+", " ", text.strip()).strip().lower()

    def encode(self, text: str) -> list[int]:
        """Unpadded, untruncated ids with BOS and EOS (HF's ``tokenizer(text).input_ids``)."""
        ids = [BOS]
        for piece in self.PATTERN.findall(self.clean(text)):
            symbols = "".join(self.byte_symbol[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[token] for token in self.bpe(symbols)]
        return ids + [EOS]


# ---- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_tok():
    return clip_tokenizer("eos")


@pytest.fixture(scope="module")
def sd2_tok():
    return clip_tokenizer("!")


@pytest.fixture(scope="module")
def reference():
    return ReferenceClipBpe(clip_vocab_path())


@pytest.fixture(scope="module")
def data_prompts() -> list[str]:
    prompts = []
    for name in ("nonmemorized_500.txt", "sd1_memorized_345.txt"):
        lines = (PROMPTS_DIR / name).read_text(encoding="utf-8").splitlines()
        prompts += [line for line in lines if line.strip()]
    with open(PROMPTS_DIR / "sdv1_500_memorized.jsonl", encoding="utf-8") as f:
        prompts += [json.loads(line)["caption"] for line in f if line.strip()]
    return prompts


@pytest.fixture(scope="module")
def long_prompts(data_prompts) -> list[str]:
    """No data prompt exceeds 77 tokens (the longest has 44 ids), so join groups of 4: 67 of 337 do."""
    return [" ".join(data_prompts[i : i + 4]) for i in range(0, len(data_prompts), 4)]


def _padded_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids


# ---- 1. SD1 tokenizer: known ids and layout ----------------------------------------------------------


def test_sd1_ids_and_layout_of_known_prompts(sd1_tok):
    assert sd1_tok(ASTRONAUT).input_ids == ASTRONAUT_IDS
    assert _padded_ids(sd1_tok, ASTRONAUT) == ASTRONAUT_IDS + [EOS] * (77 - len(ASTRONAUT_IDS))
    assert _padded_ids(sd1_tok, "a dog") == [BOS, 320, 1929] + [EOS] * 74

    astronaut, dog = tokenize_layouts(sd1_tok, [ASTRONAUT, "a dog"])
    assert (astronaut.eos_index, astronaut.n_tokens, astronaut.context_length) == (11, 12, 77)
    assert astronaut.n_tokens == len(ASTRONAUT_IDS)  # the official code's `len`
    assert astronaut.prompt_span == range(1, 11)
    assert astronaut.summary_span == range(11, 77)
    assert astronaut.padding_span == range(12, 77)
    assert not astronaut.truncated
    assert (dog.eos_index, dog.n_tokens) == (3, 4)
    assert dog.prompt_span == range(1, 3)
    assert dog.summary_span == range(3, 77)
    assert dog.padding_span == range(4, 77)


# ---- 2. HF tokenizer == independent reference on every data prompt; layouts of every prompt ---------


def test_reference_bpe_matches_hf_tokenizer_on_all_data_prompts(sd1_tok, reference, data_prompts):
    assert len(data_prompts) == 1345  # 500 + 345 + 500 prompts (the 345 repeat 345 of the 500): 1000 distinct
    assert reference.encode(ASTRONAUT) == ASTRONAUT_IDS
    hf_ids = sd1_tok(data_prompts).input_ids
    mismatched = {p for p, ids in zip(data_prompts, hf_ids, strict=True) if reference.encode(p) != ids}
    # OpenAI html-unescapes, HF (used by diffusers) does not: exactly one data prompt shows it.
    assert mismatched == {HTML_ENTITY_PROMPT}
    no_unescape = ReferenceClipBpe(clip_vocab_path(), html_unescape=False)
    assert no_unescape.encode(HTML_ENTITY_PROMPT) == sd1_tok(HTML_ENTITY_PROMPT).input_ids
    assert all(no_unescape.encode(p) == ids for p, ids in zip(data_prompts, hf_ids, strict=True))


def test_hf_tokenizer_normalizes_to_nfc_like_openai(sd1_tok, reference):
    # No data prompt is affected (all are NFC already); decomposed "é" must encode like the composed one.
    composed, decomposed = "café sacré-cœur", "cafe\u0301 sacre\u0301-cœur"
    assert sd1_tok(decomposed).input_ids == sd1_tok(composed).input_ids == reference.encode(composed)
    assert reference.encode(decomposed) == reference.encode(composed)
    without_nfc = ReferenceClipBpe(clip_vocab_path(), nfc=False)
    assert without_nfc.encode(decomposed) != sd1_tok(decomposed).input_ids


@pytest.mark.parametrize("pad", ["eos", "!"])
def test_layouts_of_every_data_prompt_and_joined_prompts(pad, sd1_tok, sd2_tok, data_prompts, long_prompts):
    tokenizer = sd1_tok if pad == "eos" else sd2_tok
    pad_id = EOS if pad == "eos" else BANG
    unpadded = tokenizer(data_prompts).input_ids
    assert max(len(ids) for ids in unpadded) == 44  # none needs truncation (README says some do)

    prompts = data_prompts + long_prompts
    unpadded += tokenizer(long_prompts).input_ids
    layouts = tokenize_layouts(tokenizer, prompts)
    assert len(layouts) == len(prompts)
    truncated = 0
    for prompt, ids, layout in zip(prompts, unpadded, layouts, strict=True):
        assert layout.eos_index == min(len(ids), 77) - 1, prompt
        assert layout.truncated == (len(ids) > 77), prompt
        assert layout.context_length == 77
        assert len(layout.tokens) == 77
        assert layout.token(layout.eos_index) == "<|endoftext|>"
        assert layout.token(0) == "<|startoftext|>"
        if len(ids) <= 77:
            assert _padded_ids(tokenizer, prompt) == ids + [pad_id] * (77 - len(ids)), prompt
        truncated += layout.truncated
    assert truncated == sum(len(ids) > 77 for ids in unpadded) > 0
    assert (len(prompts), truncated) == (1345 + 337, 67)


@pytest.mark.parametrize(("repeats", "truncated"), [(75, False), (76, True)])
def test_truncation_boundary(sd1_tok, repeats, truncated):
    # BOS + 75 words + EOS = 77 ids fit exactly; one more word needs truncation.
    (layout,) = tokenize_layouts(sd1_tok, ["a " * repeats])
    assert layout.eos_index == 76
    assert layout.truncated is truncated
    assert layout.padding_span == range(0)


# ---- 3. SD2 tokenizer: pad "!" = id 0 ----------------------------------------------------------------


def test_sd2_layout_is_found_by_first_eos_not_by_pad_id(sd2_tok):
    prompt = "wow! amazing!!"
    ids = _padded_ids(sd2_tok, prompt)
    assert ids == [BOS, 2781, BANG, 1370, BANG, BANG, EOS] + [BANG] * 70
    (layout,) = tokenize_layouts(sd2_tok, [prompt])
    assert layout.eos_index == 6
    assert layout.n_tokens == 7
    assert [ids[i] for i in layout.prompt_span].count(BANG) == 3  # literal "!" inside the prompt
    assert all(ids[i] == BANG for i in layout.padding_span)
    assert layout.tokens[2] == "!" and layout.token(1) == "wow"
    # Counting pad ids gives the wrong length: 73 zeros -> "4 tokens", but the prompt has 7.
    naive_n_tokens = 77 - ids.count(sd2_tok.pad_token_id)
    assert naive_n_tokens == 4 != layout.n_tokens


def test_sd2_padding_is_zeros_after_eos(sd2_tok):
    (layout,) = tokenize_layouts(sd2_tok, ["a dog"])
    ids = _padded_ids(sd2_tok, "a dog")
    assert ids == [BOS, 320, 1929, EOS] + [BANG] * 73
    assert (layout.eos_index, layout.padding_span) == (3, range(4, 77))


# ---- 4. SDXL: two tokenizers on shared positions -----------------------------------------------------


def test_sdxl_agrees_with_single_tokenizer_on_plain_prompts(sd1_tok, sd2_tok, data_prompts):
    prompts = [ASTRONAUT, "a dog", "", *data_prompts[:200]]
    assert not any("!" in p for p in prompts)
    merged = pipeline_layouts([sd1_tok, sd2_tok], prompts)
    single = tokenize_layouts(sd1_tok, prompts)
    second = tokenize_layouts(sd2_tok, prompts)
    assert [m.eos_index for m in merged] == [s.eos_index for s in single] == [s.eos_index for s in second]
    assert [m.truncated for m in merged] == [s.truncated for s in single]
    assert [m.tokens for m in merged] == [s.tokens for s in single]


def test_sdxl_takes_earliest_eos_when_tokenizers_disagree(sd1_tok, sd2_tok):
    prompt = "! !! !!!"
    assert sd1_tok(prompt).input_ids == [BOS, 256, 748, 995, EOS]  # "!</w>", "!!</w>", "!!!</w>"
    assert sd2_tok(prompt).input_ids == [BOS] + [BANG] * 6 + [EOS]  # "!" is an added token: split
    (first,) = tokenize_layouts(sd1_tok, [prompt])
    (second,) = tokenize_layouts(sd2_tok, [prompt])
    assert (first.eos_index, second.eos_index) == (4, 7)
    for tokenizers in ([sd1_tok, sd2_tok], [sd2_tok, sd1_tok]):
        (merged,) = pipeline_layouts(tokenizers, [prompt])
        assert merged.eos_index == 4
        assert merged.summary_span == range(4, 77)
    (merged,) = pipeline_layouts([sd1_tok, sd2_tok], [prompt])
    assert merged.token(2) == "!!"  # tokens are the first tokenizer's


def test_sdxl_prompts_2_go_to_the_second_tokenizer(sd1_tok, sd2_tok):
    tokenizers = [sd1_tok, sd2_tok]
    (same,) = pipeline_layouts(tokenizers, [ASTRONAUT])
    assert same.eos_index == 11
    (short_second,) = pipeline_layouts(tokenizers, [ASTRONAUT], prompts_2=["a dog"])
    assert short_second.eos_index == 3
    (short_first,) = pipeline_layouts(tokenizers, ["a dog"], prompts_2=[ASTRONAUT])
    assert short_first.eos_index == 3
    (long_second,) = pipeline_layouts(tokenizers, ["a dog"], prompts_2=["word " * 100])
    assert long_second.eos_index == 3 and long_second.truncated
    assert pipeline_layouts([sd1_tok], ["a dog"], prompts_2=[ASTRONAUT])[0].eos_index == 3
    with pytest.raises(LayoutError, match="no tokenizer"):
        pipeline_layouts([], ["a dog"])


# ---- 5./6. empty and over-long prompts ---------------------------------------------------------------


@pytest.mark.parametrize("pad", ["eos", "!"])
def test_empty_prompt(pad, sd1_tok, sd2_tok):
    tokenizer = sd1_tok if pad == "eos" else sd2_tok
    assert _padded_ids(tokenizer, "") == [BOS, EOS] + [tokenizer.pad_token_id] * 75
    (layout,) = tokenize_layouts(tokenizer, [""])
    assert layout.eos_index == 1 and layout.n_tokens == 2
    assert layout.padding_span == range(2, 77)
    assert layout.summary_span == range(1, 77)
    assert len(layout.prompt_span) == 0
    assert not layout.truncated


@pytest.mark.parametrize("pad", ["eos", "!"])
def test_over_long_prompt(pad, sd1_tok, sd2_tok):
    tokenizer = sd1_tok if pad == "eos" else sd2_tok
    prompt = "word " * 100
    assert len(tokenizer(prompt).input_ids) == 102
    (layout,) = tokenize_layouts(tokenizer, [prompt])
    assert layout.truncated
    assert layout.eos_index == 76 and layout.n_tokens == 77
    assert len(layout.padding_span) == 0
    assert layout.summary_span == range(76, 77)
    assert layout.prompt_span == range(1, 76)
    assert layout.token(75) == "word" and layout.token(76) == "<|endoftext|>"


# ---- 7. from_length / from_ids ----------------------------------------------------------------------


def test_from_length_counts_bos_and_eos():
    assert TokenLayout.from_length(12) == TokenLayout(eos_index=11, context_length=CONTEXT_LENGTH)
    shortest = TokenLayout.from_length(2)
    assert (shortest.eos_index, shortest.prompt_span, shortest.padding_span) == (1, range(1, 1), range(2, 77))
    longest = TokenLayout.from_length(77)
    assert (longest.eos_index, longest.summary_span) == (76, range(76, 77))
    assert len(longest.padding_span) == 0
    assert TokenLayout.from_length(5, context_length=10).padding_span == range(5, 10)
    assert TokenLayout.from_length(12).n_tokens == 12


@pytest.mark.parametrize("n", [-1, 0, 1, 78, 1000])
def test_from_length_rejects_impossible_lengths(n):
    with pytest.raises(LayoutError, match=rf"prompt length {n} must count BOS and EOS and lie in 2\.\.77"):
        TokenLayout.from_length(n)


def test_from_length_matches_tokenized_layout(sd1_tok):
    (layout,) = tokenize_layouts(sd1_tok, [ASTRONAUT])
    from_length = TokenLayout.from_length(len(ASTRONAUT_IDS))
    assert (from_length.eos_index, from_length.summary_span) == (layout.eos_index, layout.summary_span)
    assert from_length.tokens is None


def test_from_ids():
    layout = TokenLayout.from_ids([BOS, 320, EOS] + [BANG] * 7, EOS, truncated=True)
    assert (layout.eos_index, layout.context_length, layout.truncated) == (2, 10, True)
    # An EOS at position 0 is not the prompt's EOS: the first one after BOS counts.
    assert TokenLayout.from_ids([EOS, 320, 1929, EOS, EOS], EOS).eos_index == 3


@pytest.mark.parametrize(
    "ids",
    [
        [EOS] + [BANG] * 76,  # EOS only at position 0
        [BOS] + [320] * 76,  # no EOS at all (tokenized without special tokens, or cut)
        [BOS],
        [],
    ],
)
def test_from_ids_without_eos_after_bos(ids):
    with pytest.raises(LayoutError, match=r"no EOS \(id 49407\) after position 0"):
        TokenLayout.from_ids(ids, EOS)


@pytest.mark.parametrize(("eos_index", "context_length"), [(0, 77), (77, 77), (-3, 77), (10, 10)])
def test_layout_rejects_eos_outside_context(eos_index, context_length):
    with pytest.raises(LayoutError, match=rf"EOS index {eos_index} is outside 1\.\.{context_length - 1}"):
        TokenLayout(eos_index=eos_index, context_length=context_length)


# ---- 8. token() and merged() -------------------------------------------------------------------------


def test_token_strips_end_of_word_marker(sd1_tok):
    (layout,) = tokenize_layouts(sd1_tok, [ASTRONAUT])
    assert layout.tokens[5] == "astronaut</w>"
    assert [layout.token(i) for i in layout.prompt_span] == ASTRONAUT.split()
    assert layout.token(0) == "<|startoftext|>"
    assert layout.token(40) == "<|endoftext|>"
    assert TokenLayout.from_length(5).token(3) == "#3"
    (split,) = tokenize_layouts(sd1_tok, ["crossattention"])
    assert split.tokens[1:3] == ("cross", "attention</w>")
    assert [split.token(i) for i in split.prompt_span] == ["cross", "attention"]


def test_merged_rejects_different_context_lengths():
    with pytest.raises(LayoutError, match=r"context length \(77 vs 10\)"):
        TokenLayout(eos_index=3).merged(TokenLayout(eos_index=3, context_length=10))


def test_merged_keeps_earliest_eos_and_any_truncation():
    late = TokenLayout(eos_index=9, truncated=True, tokens=("x",) * 77)
    early = TokenLayout(eos_index=4)
    for merged in (late.merged(early), early.merged(late)):
        assert merged.eos_index == 4
        assert merged.truncated
        assert merged.tokens == ("x",) * 77


# ---- 9. tokenizer without a usable context length ----------------------------------------------------


def test_absurd_model_max_length_is_rejected(sd1_tok, monkeypatch):
    monkeypatch.setattr(sd1_tok, "model_max_length", 10**30)
    with pytest.raises(LayoutError, match="model_max_length is 1000000000000000000000000000000"):
        tokenize_layouts(sd1_tok, ["a dog"])
    with pytest.raises(LayoutError, match="model_max_length"):
        pipeline_layouts([sd1_tok], ["a dog"])


def test_layouts_follow_the_tokenizer_context_length(sd1_tok, monkeypatch):
    monkeypatch.setattr(sd1_tok, "model_max_length", 8)
    short, long = tokenize_layouts(sd1_tok, ["a dog", ASTRONAUT])
    assert (short.context_length, short.eos_index, short.truncated) == (8, 3, False)
    assert (long.context_length, long.eos_index, long.truncated) == (8, 7, True)
