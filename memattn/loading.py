"""Load a diffusers pipeline from a local directory or a hub id, with one-line errors.

Weights are read from safetensors only (``use_safetensors=True``): memattn never unpickles a file.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from memattn.errors import MemattnError, ModelNotFoundError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise MemattnError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


BUNDLED_TESTBED_NAME = "testbed"
# The trained testbeds shipped in the package: v2 (whole-image copies, Stable Diffusion's regime) is
# ``testbed``; v1 (fine-detail and template memorization) is ``testbed-detail``.
BUNDLED_TESTBED = Path(__file__).parent / "testbed" / "bundled"
BUNDLED_TESTBED_DETAIL = Path(__file__).parent / "testbed" / "bundled_detail"
BUNDLED_TESTBEDS = {BUNDLED_TESTBED_NAME: BUNDLED_TESTBED, "testbed-detail": BUNDLED_TESTBED_DETAIL}


def resolve_model(model: str) -> Path | str:
    """``"testbed"`` / ``"testbed-detail"`` (when no such directory exists here) mean a bundled testbed."""
    bundled = BUNDLED_TESTBEDS.get(model)
    if bundled is not None and not Path(model).exists():
        if not (bundled / "model_index.json").is_file():
            flag = " --detail" if model != BUNDLED_TESTBED_NAME else ""
            raise ModelNotFoundError(
                f"the bundled {model} is missing from this install ({bundled}); reinstall memattn "
                f"or train one with `memattn testbed train{flag} --out DIR` and pass DIR/pipeline"
            )
        return bundled
    return model


def load_pipeline(
    model: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu", progress_bar: bool = True
) -> Any:
    """``DiffusionPipeline.from_pretrained`` on a local path, else on a hub id (cache first).

    ``"testbed"`` loads the testbed model bundled with memattn. ``progress_bar=False`` switches the
    pipeline's per-call bar off, for callers that show their own progress; by default the pipeline
    keeps diffusers' setting.
    """
    from diffusers import DiffusionPipeline

    check_device(device)
    model = str(resolve_model(model))
    path = Path(model).expanduser()
    if path.exists():
        if path.is_file():
            raise ModelNotFoundError(
                f"{model} is a single file; pass a diffusers pipeline directory (with model_index.json), "
                "e.g. one written by `pipe.save_pretrained(DIR)`"
            )
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"{model} is not a diffusers pipeline directory: model_index.json is missing"
            )
        _import_own_components(path / "model_index.json")
        _check_weight_files(path)
        return _from_pretrained(DiffusionPipeline, str(path), model, dtype, device, True, progress_bar)
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelNotFoundError(f"model {model} not found: no such directory")
    try:
        return _from_pretrained(DiffusionPipeline, model, model, dtype, device, True, progress_bar)
    except ModelNotFoundError:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise
    return _from_pretrained(DiffusionPipeline, model, model, dtype, device, False, progress_bar)


def check_device(device: str) -> torch.device:
    """``device`` as torch reads it, or one line saying why this machine cannot use it."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise MemattnError(
            f"--device {device!r} is not a torch device ({error}); e.g. cpu, cuda, cuda:1"
        ) from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no visible GPU"
        raise MemattnError(
            f"--device {device}: this torch ({torch.__version__}) has {build}; use --device cpu, or "
            "install a CUDA build of torch on a machine with a GPU"
        )
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise MemattnError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise MemattnError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    return parsed


def _check_weight_files(path: Path) -> None:
    """Every safetensors file of the pipeline has a readable header (a corrupt, truncated or empty file
    is named here instead of surfacing as a safetensors traceback or a 'no safetensors weights')."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(path.glob("*/*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as error:
            size = file.stat().st_size
            raise ModelNotFoundError(
                f"{file} is corrupt or truncated ({size} bytes; {str(error).splitlines()[0][:100]}); "
                "copy or save the model again"
            ) from None


def _import_own_components(model_index: Path) -> None:
    """Import memattn's own component classes (e.g. the testbed's PixelSpaceVAE) named by a pipeline.

    diffusers only loads classes from modules that are already imported; memattn's modules are
    installed code, so importing them runs nothing from the model directory. Other libraries stay
    unimported (diffusers then refuses them, as it should).
    """
    try:
        index = json.loads(model_index.read_text())
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"{model_index} is not readable JSON ({error})") from None
    for value in index.values():
        if (
            isinstance(value, list)
            and value
            and isinstance(value[0], str)
            and value[0].startswith("memattn.")
        ):
            importlib.import_module(value[0])


class _OwnComponentTypes(logging.Filter):
    """Drops diffusers' "Expected types for vae: … got memattn.…" notice: a testbed pipeline holds
    memattn's own components on purpose. Every other loading message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Expected types for") and "memattn." in message)


def _from_pretrained(
    cls: Any, source: str, model: str, dtype: torch.dtype, device: str, local_only: bool, progress_bar: bool
) -> Any:
    notices = logging.getLogger("diffusers.pipelines.pipeline_utils")
    own_types = _OwnComponentTypes()
    notices.addFilter(own_types)
    try:
        pipe = cls.from_pretrained(source, dtype=dtype, use_safetensors=True, local_files_only=local_only)
    except (OSError, ValueError) as error:
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "safetensors" in text.lower():
            raise ModelNotFoundError(
                f"model {model} has no safetensors weights ({text}); memattn never unpickles .bin/.ckpt "
                "files: convert them to safetensors first"
            ) from None
        raise ModelNotFoundError(
            f"model {model} not found locally; pass a local path to a diffusers pipeline directory, or a "
            "hub id that is cached or reachable from this machine"
        ) from None
    finally:
        notices.removeFilter(own_types)
    if not progress_bar:
        pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
