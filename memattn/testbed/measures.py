"""The testbed's copy measures: how much of a training image's own detail a generation reproduces.

At 16×16 the caption fixes most pixels (background colour, shape, colour, size, position), so two
faithful images of the same caption correlate highly without either being a copy: whole-image pixel
correlation (``nearest_training_image``) calls 6–15 % of never-seen captions "copies" (RESULTS.md).
What only memorization can reproduce is the detail the caption does not describe: the seeded texture
inside the shape, the random corner patch, a template's stripes and frame. ``DetailMatcher`` compares
exactly that: for a training image ``T`` with expected caption-only rendering ``E``
(``expected_scene``: the mean over detail seeds), the detail is ``D = T - E`` and a generation ``g``
scores ``cos(g - E, D)``, maximised over the training images. A faithful non-copy adds its own,
independent detail and scores near 0; a copy scores near 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_COPY_THRESHOLD = 0.55  # v1 detail similarity; calibrated on non-memorized generations (RESULTS.md)
# v2 (random backgrounds): Pearson correlation with the prompt's own training image (or a memorized
# item's image: leakage) over the BACKGROUND pixels only: outside the object the caption describes (and
# outside the other image's object), each mask dilated by one pixel. The background is what the caption
# does not say, so only memorization reproduces it. A whole-image correlation was the first v2 measure; it
# failed its null: a generation that draws the right object on a smooth, mean background correlates
# above 0.8 with a fresh render of the same object on another background in 40-54 % of non-memorized
# generations (benchmarks/copy_null_v2.py, RESULTS.md), so its "seen-once copies" were the object, not
# the image. Over the background, that null (best of 16 fresh renders per generation) has p99 0.55-0.67,
# memorized 128x generations a median of 0.95.
OBJECT_COPY_THRESHOLD = 0.8


def copy_threshold_for(scene: str) -> float:
    """The calibrated copy threshold of a testbed scene kind (``"detail"``: v1, ``"object"``: v2)."""
    return OBJECT_COPY_THRESHOLD if scene == "object" else DEFAULT_COPY_THRESHOLD


def _normalize(images: np.ndarray) -> np.ndarray:
    flat = images.reshape(len(images), -1).astype(np.float64)
    flat = flat - flat.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return flat / np.maximum(norms, 1e-8)


@dataclass(frozen=True)
class NearestMatch:
    """For each generated image: the index of the nearest training image and the similarity."""

    index: np.ndarray
    similarity: np.ndarray


def nearest_training_image(generated: np.ndarray, training: np.ndarray) -> NearestMatch:
    """Pearson correlation over all pixels and channels, maximised over the training images."""
    similarity = _normalize(generated) @ _normalize(training).T
    index = similarity.argmax(axis=1)
    return NearestMatch(index=index, similarity=similarity[np.arange(len(generated)), index])


def high_pass(images: np.ndarray) -> np.ndarray:
    """``x - mean of its 3x3 neighbourhood`` per channel (edge-replicated): drops flat colour offsets.

    Texture, patch and template stripes vary from pixel to pixel; backgrounds and shape fills do not.
    """
    x = np.asarray(images, np.float64)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = x.shape[-2:]
    local = sum(padded[..., i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0
    return x - local


def background_mask(attributes: Sequence[dict[str, str]], size: int) -> np.ndarray:
    """Bool ``(H, W)``: pixels outside every listed object, each object's mask dilated by one pixel."""
    from memattn.testbed.objects import object_mask

    inside = np.zeros((size, size), dtype=bool)
    for a in attributes:
        mask = np.pad(object_mask(a["shape"], a["size"], a["position"], size), 1)
        inside |= np.logical_or.reduce(
            [mask[1 + dy : 1 + dy + size, 1 + dx : 1 + dx + size] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        )
    return ~inside


def masked_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of two ``(3, H, W)`` images over the pixels of ``mask`` (all channels)."""
    x = np.asarray(a, np.float64)[:, mask].ravel()
    y = np.asarray(b, np.float64)[:, mask].ravel()
    x, y = x - x.mean(), y - y.mean()
    return float(x @ y / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-12))


class OwnImageMatcher:
    """v2 copy measure: background correlation with the prompt's own training image, or a memorized
    item's image (see ``OBJECT_COPY_THRESHOLD``).

    ``match(generated, item_ids)`` returns, per generation, the higher of its background correlation
    with its own item's training image (if the item was trained on) and the best one with another
    memorized item's image; ``index`` points into the training items, so callers can tell own copies
    from leakage.
    """

    def __init__(self, dataset, train_items: Sequence, memorized: Sequence) -> None:
        self._dataset, self._items = dataset, train_items
        self._row = {item.item_id: i for i, item in enumerate(train_items)}
        self._memorized = list(memorized)
        self._memorized_rows = [self._row[item.item_id] for item in memorized]
        # Only the memorized images up front: a one-pass training set has ~190k images.
        self._memorized_images = dataset.images(self._memorized) if self._memorized else None

    def images(self, rows: Sequence[int]) -> np.ndarray:
        """The training images of ``rows`` (indices into the training items), rendered on demand."""
        return self._dataset.images([self._items[int(r)] for r in rows])

    def match(self, generated: np.ndarray, item_ids: Sequence[int]) -> NearestMatch:
        index = np.zeros(len(generated), dtype=int)
        similarity = np.full(len(generated), -1.0)
        size = generated.shape[-1]
        prompts = [self._dataset.items[item_id].attributes for item_id in item_ids]
        for i, item_id in enumerate(item_ids):
            for j, item in enumerate(self._memorized):
                if item.item_id == item_id:
                    continue
                mask = background_mask([prompts[i], item.attributes], size)
                value = masked_correlation(generated[i], self._memorized_images[j], mask)
                if value > similarity[i]:
                    index[i], similarity[i] = self._memorized_rows[j], value
        own_rows = [self._row.get(item_id) for item_id in item_ids]
        trained = [row for row in own_rows if row is not None]
        own_images = dict(zip(trained, self.images(trained), strict=True)) if trained else {}
        for i, own in enumerate(own_rows):
            if own is not None:
                value = masked_correlation(generated[i], own_images[own], background_mask([prompts[i]], size))
                if value >= similarity[i]:
                    index[i], similarity[i] = own, value
        return NearestMatch(index=index, similarity=similarity)


class DetailMatcher:
    """Nearest training image by reproduced detail (see the module docstring).

    Built once from the training images and their caption-only renderings; ``match`` is a few matrix
    products, so thousands of generations against thousands of training images take about a second.
    """

    def __init__(self, training: np.ndarray, expected: np.ndarray) -> None:
        if training.shape != expected.shape:
            raise ValueError(f"training {training.shape} and expected {expected.shape} renderings differ")
        self._expected = high_pass(expected).reshape(len(expected), -1)
        self._detail = high_pass(training).reshape(len(training), -1) - self._expected
        self._detail_norm = np.maximum(np.linalg.norm(self._detail, axis=1), 1e-8)
        self._expected_dot_detail = (self._expected * self._detail).sum(axis=1)
        self._expected_sq = (self._expected**2).sum(axis=1)

    @classmethod
    def for_items(cls, dataset, items: Sequence) -> DetailMatcher:
        """From a ``TestbedDataset`` and the items to match against (normally its training items)."""
        return cls(dataset.images(items), dataset.images(items, detail=False))

    def similarity_matrix(self, generated: np.ndarray) -> np.ndarray:
        """``[generated, training]``: cosine of ``g - E`` with ``D = T - E`` over all pixels."""
        g = high_pass(generated).reshape(len(generated), -1)
        dot = g @ self._detail.T - self._expected_dot_detail[None]
        residual_sq = (g**2).sum(axis=1, keepdims=True) - 2 * g @ self._expected.T + self._expected_sq[None]
        residual_norm = np.sqrt(np.maximum(residual_sq, 1e-16))
        return dot / (residual_norm * self._detail_norm[None])

    def match(self, generated: np.ndarray) -> NearestMatch:
        similarity = self.similarity_matrix(generated)
        index = similarity.argmax(axis=1)
        return NearestMatch(index=index, similarity=similarity[np.arange(len(generated)), index])
