"""The testbed's alignment measure (its "CLIP score"): which of a caption's attributes an image shows.

A small CNN reads background colour, shape colour, shape, size and position from a rendered image.
It is trained on freshly rendered scenes with known labels: every attribute combination (the
withheld colour x shape pairs included, so it can read novel compositions), random detail seeds, the
dataset's templates now and then, and Gaussian pixel noise so that slightly noisy generations still
read correctly. It never sees a generated image. Its accuracy on clean held-out renders is stored
with its weights and reported (``held_out_accuracy``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from memattn.errors import MemattnError
from memattn.testbed.data import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES
from memattn.testbed.objects import ATTRIBUTE_VALUES as OBJECT_ATTRIBUTES

ATTRIBUTES: dict[str, tuple[str, ...]] = {  # testbed v1 (fine-detail scenes)
    "background": tuple(BACKGROUNDS),
    "color": tuple(COLORS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
}
VOCABULARIES: tuple[dict[str, tuple[str, ...]], ...] = (ATTRIBUTES, OBJECT_ATTRIBUTES)
CLASSIFIER_FILE = "memattn_attribute_classifier.safetensors"


def conv_layers(width: int) -> list[nn.Module]:
    """The testbed's small image CNN: three 3x3 convolutions (two of stride 2) with GELUs."""
    return [
        nn.Conv2d(3, width, 3, padding=1),
        nn.GELU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.GELU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
        nn.GELU(),
    ]


class AttributeClassifier(nn.Module):
    """Three conv layers and one linear head per attribute; input ``(N, 3, S, S)`` in [-1, 1]."""

    def __init__(
        self, image_size: int, width: int = 48, attributes: dict[str, tuple[str, ...]] = ATTRIBUTES
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.width = width
        self.attributes = {name: tuple(values) for name, values in attributes.items()}
        self.features = nn.Sequential(*conv_layers(width), nn.Flatten())
        flat = 2 * width * ((image_size + 3) // 4) ** 2
        self.heads = nn.ModuleDict(
            {name: nn.Linear(flat, len(values)) for name, values in self.attributes.items()}
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(images)
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor, batch_size: int = 512) -> dict[str, list[str]]:
        """Attribute names read from each image."""
        images = torch.as_tensor(np.asarray(images, np.float32))
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise MemattnError(
                f"the attribute classifier reads (N, 3, {self.image_size}, {self.image_size}) images, "
                f"got {tuple(images.shape)}"
            )
        self.eval()
        out: dict[str, list[str]] = {name: [] for name in self.attributes}
        for start in range(0, len(images), batch_size):
            logits = self(images[start : start + batch_size])
            for name, values in self.attributes.items():
                out[name] += [values[i] for i in logits[name].argmax(-1).tolist()]
        return out


@dataclass(frozen=True)
class Alignment:
    """Per image and attribute: did the classifier read the caption's value (``correct[i, a]``)."""

    correct: np.ndarray  # bool [image, attribute], in the classifier's attribute order
    predicted: dict[str, list[str]]

    @property
    def accuracy(self) -> np.ndarray:
        """Fraction of the caption's attributes an image gets right (the per-image alignment score)."""
        return self.correct.mean(axis=1)

    @property
    def all_correct(self) -> np.ndarray:
        return self.correct.all(axis=1)


def alignment(
    classifier: AttributeClassifier, images: np.ndarray, attributes: list[dict[str, str]]
) -> Alignment:
    """How well each image shows its caption's attributes (``attributes[i]`` belongs to ``images[i]``)."""
    if len(images) != len(attributes):
        raise MemattnError(f"{len(images)} images but {len(attributes)} attribute sets")
    predicted = classifier.predict(images)
    names = list(classifier.attributes)
    correct = np.array(
        [[predicted[name][i] == attributes[i][name] for name in names] for i in range(len(images))],
        dtype=bool,
    ).reshape(len(images), len(names))
    return Alignment(correct=correct, predicted=predicted)


def train_classifier(
    dataset,
    *,
    seed: int = 0,
    steps: int = 1500,
    batch_size: int = 128,
    pool: int = 20_000,
    progress: bool = True,
) -> tuple[AttributeClassifier, float]:
    """Train on ``pool`` fresh renders (``dataset.random_scenes``); returns the classifier and its accuracy
    (every attribute right) on 2,000 other renders."""
    rng = np.random.default_rng((seed, 7))
    torch.manual_seed(seed)
    vocabulary = dataset.attribute_values
    model = AttributeClassifier(dataset.config.canvas_size, attributes=vocabulary)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    pool_images, pool_attributes = dataset.random_scenes(pool, rng)
    images = torch.from_numpy(pool_images)
    targets = {
        name: torch.tensor([values.index(a[name]) for a in pool_attributes])
        for name, values in vocabulary.items()
    }
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in tqdm(range(steps), desc="attribute classifier", disable=not progress):
        rows = torch.from_numpy(rng.integers(len(images), size=batch_size))
        sigma = torch.from_numpy(rng.uniform(0.0, 0.2, size=(batch_size, 1, 1, 1)).astype(np.float32))
        noise = torch.from_numpy(rng.standard_normal((batch_size, *images.shape[1:])).astype(np.float32))
        logits = model((images[rows] + sigma * noise).clamp(-1, 1))
        loss = sum(loss_fn(logits[name], targets[name][rows]) for name in vocabulary)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    held_images, attributes = dataset.random_scenes(2_000, rng)
    accuracy = float(alignment(model, held_images, attributes).all_correct.mean())
    return model.eval(), accuracy


def save_classifier(model: AttributeClassifier, accuracy: float, path: Path) -> Path:
    metadata = {
        "image_size": str(model.image_size),
        "width": str(model.width),
        "held_out_accuracy": f"{accuracy:.4f}",
        "attributes": json.dumps(model.attributes),
    }
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata=metadata)
    return path


def load_classifier(path: Path) -> tuple[AttributeClassifier, float]:
    """Weights from safetensors; the attribute vocabulary must match this memattn's testbed."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise MemattnError(
            f"no attribute classifier at {path}; re-export the testbed or call "
            "memattn.testbed.alignment.train_classifier"
        )
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(path)
        vocabulary = {k: tuple(v) for k, v in json.loads(metadata["attributes"]).items()}
        if vocabulary not in VOCABULARIES:
            raise MemattnError(f"{path} was trained on an attribute vocabulary this memattn does not know")
        model = AttributeClassifier(int(metadata["image_size"]), int(metadata["width"]), vocabulary)
        model.load_state_dict(state)
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as error:
        raise MemattnError(
            f"attribute classifier {path} is corrupt ({type(error).__name__}: {error})"
        ) from None
    return model.eval(), float(metadata["held_out_accuracy"])
