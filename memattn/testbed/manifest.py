"""What a testbed pipeline says about itself: its manifest (recipe, seed, ground-truth groups) and the
exact dataset it was trained on, rebuilt from that manifest (v1 fine-detail or v2 objects)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memattn.errors import MemattnError
from memattn.testbed.data import TestbedConfig, TestbedDataset, build_dataset
from memattn.testbed.objects import SCENE as OBJECT_SCENE
from memattn.testbed.objects import ObjectsConfig, ObjectsDataset, build_objects_dataset

MANIFEST = "memattn_testbed.json"


def data_config_from_json(raw: dict) -> TestbedConfig | ObjectsConfig:
    """A data config from its JSON form; ``scene`` says which testbed (absent: v1, older manifests)."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return ObjectsConfig(**values) if values.get("scene") == OBJECT_SCENE else TestbedConfig(**values)


def build_any_dataset(seed: int, config: TestbedConfig | ObjectsConfig) -> TestbedDataset | ObjectsDataset:
    if isinstance(config, ObjectsConfig):
        return build_objects_dataset(seed, config)
    return build_dataset(seed, config)


def load_manifest(model: Path) -> dict[str, Any]:
    path = Path(model) / MANIFEST
    if not path.is_file():
        raise MemattnError(f"{model} has no {MANIFEST}: not a testbed pipeline directory")
    return json.loads(path.read_text())


def dataset_for(model: Path) -> TestbedDataset | ObjectsDataset:
    """Rebuild the exact dataset a testbed pipeline was trained on (from its manifest): v1 or v2."""
    manifest = load_manifest(model)
    return build_any_dataset(manifest["seed"], data_config_from_json(manifest["config"]["data"]))


def scene_of(model: Path) -> str:
    """``"detail"`` (v1, fine-detail memorization) or ``"object"`` (v2, whole-image copies)."""
    return load_manifest(model)["config"]["data"].get("scene", "detail")
