"""`make demo`: build a tiny SD1-architecture pipeline, save it, and score prompts through the CLI.

Random weights: the scores show the plumbing (CLI, loading, probe, D and E), not memorization. The
testbed issue replaces this with a model that memorizes for real.
"""

from __future__ import annotations

import sys

from memattn.tiny import cache_dir, tiny_pipeline

PROMPTS = [
    "The No Limits Business Woman Podcast",
    "A serene beach at sunrise",
    "Mothers influence on her young hippo",
    "Snow-covered rooftops in a small town",
]


def main() -> None:
    target = cache_dir() / "demo-sd1-tiny"
    if not (target / "model_index.json").is_file():
        print(f"building a tiny SD1-architecture pipeline (random weights) in {target}")
        tiny_pipeline("sd1", seed=0).save_pretrained(target, safe_serialization=True)
    print("random weights: the scores below show the plumbing (loading, probe, D, E), not memorization")
    sys.argv = ["memattn", "detect", *PROMPTS, "--model", str(target), "--steps", "50"]
    print("$ " + " ".join(f"'{a}'" if " " in a else a for a in sys.argv))
    from memattn.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
