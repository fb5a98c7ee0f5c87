"""`make demo`: the bundled testbed model through `memattn testbed report` (about a minute here).

Generates every ground-truth group's prompts with two seeds, scores D, E and E per layer while
generating, measures copies and alignment, prints AUC and TPR at 1 % FPR per score and writes an HTML
report with figures to artifacts/demo/.
"""

from __future__ import annotations

import sys


def main() -> None:
    sys.argv = [
        "memattn",
        "testbed",
        "report",
        "--model",
        "testbed",
        "--out",
        "artifacts/demo",
        *sys.argv[1:],
    ]
    print("$ " + " ".join(sys.argv))
    from memattn.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
