"""``memattn report``: a self-contained HTML page of a scan (``html.write_scan_report``).

The page is rendered by jinja2 with autoescape (``html``), from the scan's rows (``results``), with
figures (``figures``), tokenized prompts (``text``) and regenerated examples (``regenerate``).
"""

from memattn.report.constants import MANIFEST_FILE
from memattn.report.html import write_scan_report
from memattn.report.text import highlight_segments, tokenization

__all__ = ["MANIFEST_FILE", "highlight_segments", "tokenization", "write_scan_report"]
