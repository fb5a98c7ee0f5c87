"""What carries a memorized testbed image: mask token groups, steps or layers and watch the copy rate.

Each setting is a ``memattn.mitigate`` edit, a mask on one kind of prompt word (the testbed knows which
words name an attribute: colour, shape, size, position, background; the rest is phrasing and style), or
a paraphrase (the same attributes in another of the testbed's phrasings, never a training caption).
Memorized: the 128-copy matching items and the templates; clean: never-seen captions; 48 prompts x 2
seeds per group, guidance 2, 25 DDIM steps.

Usage: .venv/bin/python benchmarks/mitigation_carriers.py [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from memattn.loading import BUNDLED_TESTBED, load_pipeline
from memattn.mitigation.cross_attention import Mitigation
from memattn.testbed import data
from memattn.testbed.evaluate import evaluate, mitigation_measures
from memattn.testbed.manifest import dataset_for

ATTRIBUTE_WORDS = frozenset(
    word
    for names in (data.BACKGROUNDS, data.COLORS, data.SHAPES, data.SIZES, data.POSITIONS)
    for name in names
    for word in name.split()
)


@dataclass(frozen=True)
class WordMask:
    """An attention edit (``AttentionEdit``'s ``active``/``apply`` interface) on one kind of prompt word."""

    kind: str  # "attribute" or "filler"
    penalty: float = float("inf")  # inf: masked; else subtracted from the logits
    steps: tuple[int, ...] | None = None
    mask_summary: bool = False
    is_noop = False

    def active(self, step: int, layer: int) -> bool:
        return self.steps is None or step in self.steps

    def check_schedule(self, n_steps: int) -> None:
        pass

    def apply(self, key, cond_rows, layouts, rows_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        bias = torch.zeros(key.shape[0], 1, 1, key.shape[2], dtype=key.dtype, device=key.device)
        for row, layout in enumerate(layouts):
            target = bias[cond_rows.start + row, 0, 0]
            for position in layout.prompt_span:
                if (layout.token(position) in ATTRIBUTE_WORDS) == (self.kind == "attribute"):
                    target[position] = -self.penalty
            if self.mask_summary:
                target[layout.eos_index :] = float("-inf")
        return key, bias


def paraphraser():
    """Each caption -> the same attributes in another phrasing and style that no training item uses."""
    dataset = dataset_for(BUNDLED_TESTBED)
    by_caption = {item.caption: item for item in dataset.items}
    taken = {item.caption for item in dataset.items if item.duplication > 0}
    n_forms = len(data.PHRASINGS) * len(data.STYLE_SUFFIXES)

    def rewrite(captions: list[str]) -> list[str]:
        out = []
        for caption in captions:
            start = sum(map(ord, caption)) % n_forms
            for k in range(1, n_forms):
                phrasing, suffix = divmod((start + k) % n_forms, len(data.STYLE_SUFFIXES))
                candidate = data.caption_for(by_caption[caption].attributes, phrasing, suffix)
                if candidate != caption and candidate not in taken:
                    break
            out.append(candidate)
        return out

    return rewrite


STEPS = 25
SUMMARY = {"c": 1.0, "mask_eos": True}  # EOS and padding masked
PROMPT = {"c": 1.0, "mask_padding": False, "mask_prompt": True}  # prompt words masked
SETTINGS: list[tuple[str, dict | None]] = [
    ("plain", None),
    ("mask padding (EOS visible)", {"c": 1.0}),
    ("mask EOS + padding (all summary tokens)", SUMMARY),
    ("mask prompt words (BOS + summary visible)", PROMPT),
    ("mask summary, steps 0-4 only", {**SUMMARY, "at_steps": list(range(5))}),
    ("mask summary, steps 5-24 only", {**SUMMARY, "steps": list(range(5, STEPS))}),
    ("mask summary, down+mid layers (0-2)", {**SUMMARY, "layers": [0, 1, 2]}),
    ("mask summary, up layers (3-6)", {**SUMMARY, "layers": [3, 4, 5, 6]}),
    ("mask prompt words, steps 0-4 only", {**PROMPT, "steps": list(range(5))}),
] + [
    (f"prompt penalty {d}", {"c": 1.0, "mask_padding": False, "prompt_penalty": d})
    for d in (0.5, 1.0, 2.0, 4.0)
]
WORD_SETTINGS: list[tuple[str, WordMask]] = [
    ("mask attribute words", WordMask("attribute")),
    ("mask phrasing/style words", WordMask("filler")),
    ("mask phrasing/style words + summary", WordMask("filler", mask_summary=True)),
    ("phrasing/style logits - 2", WordMask("filler", penalty=2.0)),
    ("mask phrasing/style words, steps 0-4", WordMask("filler", steps=tuple(range(5)))),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only-words", action="store_true", help="only the word masks and the paraphrase")
    args = parser.parse_args()
    pipe = load_pipeline(str(BUNDLED_TESTBED))
    out = []
    runs = [] if args.only_words else [(name, m, contextlib.nullcontext(), None) for name, m in SETTINGS]
    runs += [(name, None, Mitigation(pipe, edit), None) for name, edit in WORD_SETTINGS]
    runs.append(
        ("paraphrase (same attributes, unseen phrasing)", None, contextlib.nullcontext(), paraphraser())
    )
    for name, mitigation, context, transform in runs:
        started = time.perf_counter()
        with context:
            evaluation = evaluate(
                BUNDLED_TESTBED,
                guidance_scale=2.0,
                steps=STEPS,
                per_group=48,
                seeds=2,
                groups=("memorized_matching", "memorized_template", "never_seen"),
                pipe=pipe,
                mitigation=mitigation,
                prompt_transform=transform,
                progress=False,
            )
        threshold = evaluation.settings["copy_threshold"]
        row = {"setting": name, **mitigation_measures(evaluation.rows, threshold, ("never_seen",))}
        out.append(row)
        print(
            f"{name:45} copy128 {row['copy_rate_128']:.2f} sim128 {row['similarity_128']:.3f} "
            f"align128 {row['alignment_128']:.3f} "
            f"| copyT {row['copy_rate_template']:.2f} simT {row['similarity_template']:.3f} "
            f"| clean align {row['alignment_clean']:.3f} all5 {row['all_attributes_clean']:.2f} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
