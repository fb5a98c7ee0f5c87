"""What the README's Python snippets import from the package is there."""

from __future__ import annotations

import re
from pathlib import Path

import memattn

ROOT = Path(__file__).resolve().parents[1]


def test_every_name_the_docs_call_on_the_package_is_exported():
    """``memattn.Guard(pipe, ...)`` in the README raised AttributeError: the package did not export it."""
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    used = {name for path in texts for name in re.findall(r"\bmemattn\.([A-Za-z_]\w*)\(", path.read_text())}
    assert {"Guard", "trace", "mitigate"} <= used  # the check below reads real snippets
    missing = sorted(name for name in used if not hasattr(memattn, name))
    assert not missing, f"the docs call memattn.{missing} but the package does not export them"
    assert set(memattn.__all__) >= {"Guard", "Calibration", "detect", "trace", "mitigate", "score_d"}


def test_loading_the_testbed_raises_no_false_alarm():
    """diffusers warns that the testbed's pixel-space VAE is not an AutoencoderKL: memattn's own
    component, on purpose; the API must not print that to its users (other notices still pass)."""
    import logging

    from diffusers.utils import logging as diffusers_logging

    from memattn.loading import load_pipeline

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    saved = diffusers_logging.get_verbosity()  # an earlier CLI test may have set it to errors only
    diffusers_logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        load_pipeline("testbed")
        logger.warning("Expected types for unet: other")
    finally:
        logger.removeHandler(handler)
        diffusers_logging.set_verbosity(saved)
    messages = [r.getMessage() for r in records]
    assert not any("memattn." in m and m.startswith("Expected types") for m in messages), messages
    assert "Expected types for unet: other" in messages


def test_importing_the_figure_modules_leaves_the_callers_matplotlib_backend_alone():
    """A notebook's backend must survive `import memattn.report` (it used to be forced to Agg)."""
    import subprocess
    import sys

    code = (
        "import matplotlib; matplotlib.use('svg')\n"
        "import memattn.report, memattn.testbed.report, memattn.cli.bench_detect, memattn.bench.pareto\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
        "import matplotlib.pyplot as plt; assert plt.get_fignums() == []\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
