"""Training pairs for fine-tuning: the testbed dataset (known duplicates) or an image folder + captions."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memattn.errors import MemattnError
from memattn.training.config import CAPTION_FILES, IMAGE_CACHE_BYTES

# ---- data --------------------------------------------------------------------------------------------


@dataclass
class TrainData:
    """Training rows (one per sample the loop may draw; a duplicated pair appears once per copy).

    ``caption_of_row[r]`` indexes ``captions`` (what gets pre-encoded, in this order); ``images(rows)``
    returns ``[N, 3, H, W]`` in [-1, 1]; ``ground_truth`` maps a sample id to what is known about it
    (testbed: group, duplication, memorized). ``manifest`` is written to ``manifest_file`` of the
    exported model and ``carried_files`` are copied from the base model to it: what describes the data
    travels with a model trained on it (the testbed's ground truth and attribute classifier).
    """

    ids: list[Any]
    caption_of_row: list[int]
    captions: list[str]
    images: Callable[[torch.Tensor], torch.Tensor]
    ground_truth: dict[Any, dict[str, Any]] | None = None
    manifest: dict[str, Any] | None = None
    manifest_file: str | None = None
    carried_files: tuple[str, ...] = ()
    description: str = ""

    def __len__(self) -> int:
        return len(self.ids)


def load_testbed_data(model: Path) -> TrainData:
    """The training pairs of the testbed dataset that ``model``'s manifest describes."""
    from memattn.testbed.alignment import CLASSIFIER_FILE
    from memattn.testbed.data import MEMORIZED_GROUPS
    from memattn.testbed.manifest import MANIFEST, dataset_for, load_manifest

    manifest = load_manifest(model)
    dataset = dataset_for(model)
    pairs = dataset.training_pairs()
    index = {item.item_id: i for i, item in enumerate(dataset.items)}
    row_items = torch.tensor([index[item_id] for item_id, _ in pairs])
    train_items = sorted(set(row_items.tolist()))
    size = dataset.config.canvas_size
    images = torch.zeros(len(dataset.items), 3, size, size)
    images[train_items] = torch.from_numpy(dataset.images([dataset.items[i] for i in train_items]))
    truth = {
        item.item_id: {
            "group": item.group,
            "duplication": item.duplication,
            "memorized": item.group in MEMORIZED_GROUPS,
        }
        for item in dataset.items
        if item.duplication > 0
    }
    return TrainData(
        ids=[item_id for item_id, _ in pairs],
        caption_of_row=row_items.tolist(),
        captions=[item.caption for item in dataset.items],  # all items, in item order (as the trainer)
        images=lambda rows: images[row_items[rows]],
        ground_truth=truth,
        manifest=manifest,
        manifest_file=MANIFEST,
        carried_files=(CLASSIFIER_FILE,),
        description=f"testbed (seed {dataset.seed}, {len(pairs)} training pairs of {len(train_items)} items)",
    )


def load_folder_data(directory: Path, resolution: int) -> TrainData:
    """Images + ``captions.jsonl``/``metadata.jsonl`` (``file_name`` and ``text`` or ``caption``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MemattnError(f"--data {directory}: no such directory (or pass 'testbed')")
    meta = next((directory / name for name in CAPTION_FILES if (directory / name).is_file()), None)
    if meta is None:
        raise MemattnError(
            f"{directory} has no {' or '.join(CAPTION_FILES)}: write one JSON object per line, "
            '{"file_name": "0001.png", "text": "a caption"}'
        )
    files, captions, groups = [], [], {}
    for number, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = str(row["file_name"])
            text = row["text"] if "text" in row else row["caption"]
        except (ValueError, KeyError, TypeError):
            raise MemattnError(
                f"{meta}:{number}: expected a JSON object with file_name and text (or caption)"
            ) from None
        if not (directory / name).is_file():
            raise MemattnError(f"{meta}:{number}: image {directory / name} does not exist")
        files.append(name)
        captions.append(str(text))
        if "group" in row:
            groups[name] = {"group": str(row["group"]), "memorized": bool(row.get("memorized", False))}
    if not files:
        raise MemattnError(f"{meta} lists no images")
    unique = list(dict.fromkeys(captions))
    position = {caption: i for i, caption in enumerate(unique)}
    cache: dict[int, torch.Tensor] = {}
    per_image = 3 * resolution * resolution * 4

    def load(row: int) -> torch.Tensor:
        if row in cache:
            return cache[row]
        from PIL import Image

        with Image.open(directory / files[row]) as image:
            image = image.convert("RGB")
            scale = resolution / min(image.size)
            size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
            left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        tensor = pixels.view(resolution, resolution, 3).permute(2, 0, 1).float() / 127.5 - 1.0
        if (len(cache) + 1) * per_image <= IMAGE_CACHE_BYTES:
            cache[row] = tensor
        return tensor

    def images(rows: torch.Tensor) -> torch.Tensor:
        return torch.stack([load(int(r)) for r in rows])

    return TrainData(
        ids=files,
        caption_of_row=[position[c] for c in captions],
        captions=unique,
        images=images,
        ground_truth=groups or None,
        description=f"{directory} ({len(files)} images, {len(unique)} distinct captions)",
    )
