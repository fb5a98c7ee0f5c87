"""`make demo`: the bundled testbed model end to end (about three minutes here).

1. `memattn testbed report` on the bundled testbed (v2): every ground-truth group's prompts with two
   seeds; every detection score (D, E, E per layer, Wen's noise norm, BOS and summary shares) while
   generating, ranked best first; copies, leakage and alignment; the paper's mitigation on the memorized
   and never-seen prompts, and the guard (step-1 E, calibrated at 1 % FPR; flagged images get the
   EOS-masking edit) on the same prompts; an HTML report in artifacts/demo/ that leads with a headline
   figure.
2. `memattn scan` of memorized and clean testbed prompts (step-1 scores into Parquet parts) and
   `memattn report` on the result: artifacts/demo/scan/ and artifacts/demo/scan_report.html.
"""

from __future__ import annotations

import sys
from pathlib import Path

OUT = Path("artifacts/demo")
SCAN_GROUPS = ("memorized_matching", "memorized_template", "never_seen", "novel_composition")  # where present
PER_GROUP = 32


def testbed_report(extra: list[str]) -> None:
    from memattn.cli import main as cli_main

    argv = ["memattn", "testbed", "report", "--model", "testbed", "--out", str(OUT), *extra]
    print("$ " + " ".join(argv))
    sys.argv = argv
    try:
        cli_main()
    except SystemExit as done:  # typer exits when a command finishes
        if done.code:
            raise


def scan_and_report() -> None:
    from memattn.loading import BUNDLED_TESTBED
    from memattn.report import write_scan_report
    from memattn.scan import ScanSettings, scan
    from memattn.testbed.manifest import dataset_for

    dataset = dataset_for(BUNDLED_TESTBED)
    present = [group for group in SCAN_GROUPS if group in dataset.prompt_groups()]
    prompts = [item.caption for group in present for item in list(dataset.group(group))[:PER_GROUP]]
    prompt_file = OUT / "scan_prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    print(f"$ memattn scan {prompt_file} --model testbed --out {OUT / 'scan'} --guidance 2 --steps 25")
    summary = scan(
        prompt_file, OUT / "scan", ScanSettings(model="testbed", guidance_scale=2.0, steps=25), progress=True
    )
    print(f"{summary.rows} rows ({summary.ok} scored, {summary.skipped} skipped) in {summary.seconds:.0f} s")
    print(f"$ memattn report {OUT / 'scan'} --out {OUT / 'scan_report.html'}")
    page = write_scan_report(OUT / "scan", OUT / "scan_report.html", model="testbed", steps=25)
    print(f"report: {page}")


def main() -> None:
    testbed_report(sys.argv[1:])
    scan_and_report()


if __name__ == "__main__":
    main()
