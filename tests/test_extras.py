"""Tracing, scoring, mitigating and the guard need only the core dependencies; the rest are extras.

Two checks: no module the core imports (the public API, the tiny pipelines, the testbed's model classes,
loading) imports an optional package at module level; and a traced, scored, mitigated and guarded run of
a tiny pipeline executes no import of an optional package from memattn code at all (imports made by
diffusers itself, e.g. of accelerate, are not memattn's). A missing extra is one CLI line.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from conftest import HANG_GUARD_S

from memattn.extras import EXTRA_OF, missing_extra

PACKAGE = Path(__file__).resolve().parents[1] / "memattn"
CORE = ("memattn", "memattn.testing", "memattn.testbed.model", "memattn.loading")


def _source(module: str) -> Path | None:
    path = PACKAGE.parent.joinpath(*module.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _module_level_imports(path: Path) -> list[str]:
    names: list[str] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                names.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.append(node.module)
                names.extend(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(ast.parse(path.read_text()).body)
    return names


def test_the_core_imports_no_optional_package_at_module_level():
    seen: set[str] = set()
    offending: list[tuple[str, str]] = []
    todo = list(CORE)
    while todo:
        module = todo.pop()
        path = _source(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        for name in _module_level_imports(path):
            if name.split(".")[0] in EXTRA_OF:
                offending.append((module, name))
            elif name.startswith("memattn."):
                todo.append(name)
    assert len(seen) > 20  # the crawl followed the package (the public API alone spans ~30 modules)
    assert not offending, offending


AUDITED_RUN = r"""
import builtins, json, sys
EXTRAS = set(json.loads(sys.argv[1]))
hits = []
real_import = builtins.__import__

def audited(name, globals=None, locals=None, fromlist=(), level=0):
    caller = (globals or {}).get("__name__", "")
    if level == 0 and name.split(".")[0] in EXTRAS and caller.split(".")[0] == "memattn":
        hits.append([caller, name])
    return real_import(name, globals, locals, fromlist, level)

builtins.__import__ = audited
import torch
import memattn
from memattn.testing import tiny_pipeline

pipe = tiny_pipeline("sd1")
run = dict(num_inference_steps=3, guidance_scale=7.5, output_type="np")
with memattn.trace(pipe) as tr:
    pipe(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0), **run)
d, e = memattn.score_d(tr.record), memattn.score_e(tr.record)
with memattn.mitigate(pipe):
    pipe("a red circle", generator=torch.Generator().manual_seed(0), **run)
guard = memattn.Guard(pipe, threshold=0.0)
guarded = guard("a red circle", generator=torch.Generator().manual_seed(0), **run)
detected = memattn.detect(pipe, ["a red circle"], steps=3)
print(json.dumps({"hits": hits, "d": [float(x) for x in d], "flagged": guarded.verdicts[0].flagged}))
"""


def test_trace_score_mitigate_and_guard_import_no_optional_package():
    result = subprocess.run(
        [sys.executable, "-c", AUDITED_RUN, json.dumps(sorted(EXTRA_OF))],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["d"]) == 2 and isinstance(report["flagged"], bool)  # the run did the work
    assert report["hits"] == []


def test_a_missing_extra_is_one_line_naming_the_pip_command():
    error = ModuleNotFoundError("No module named 'pyarrow'", name="pyarrow")
    assert missing_extra(error) == (
        "pyarrow is not installed; it comes with pip install 'memattn[scan]' (or 'memattn[all]')"
    )
    sklearn = ModuleNotFoundError("No module named 'sklearn.metrics'", name="sklearn.metrics")
    assert "scikit-learn is not installed" in missing_extra(sklearn) and "memattn[bench]" in missing_extra(
        sklearn
    )
    assert missing_extra(ModuleNotFoundError("No module named 'torch'", name="torch")) is None
