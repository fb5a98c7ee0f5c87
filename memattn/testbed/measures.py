"""The testbed's copy measure: nearest training image by normalized pixel correlation.

At 16×16 the item-specific detail (texture inside the shape, a random corner patch, a template's
stripes) is what separates a copy from a faithful new image of the same caption: two renders of the
same attributes with different detail correlate far less than an image with its own training image.
``copy_threshold`` is calibrated on that gap (see ``calibrate_copy_threshold``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _normalize(images: np.ndarray) -> np.ndarray:
    flat = images.reshape(len(images), -1).astype(np.float64)
    flat = flat - flat.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return flat / np.maximum(norms, 1e-8)


@dataclass(frozen=True)
class NearestMatch:
    """For each generated image: the index of the nearest training image and the correlation."""

    index: np.ndarray
    similarity: np.ndarray


def nearest_training_image(generated: np.ndarray, training: np.ndarray) -> NearestMatch:
    """Pearson correlation over all pixels and channels, maximised over the training images."""
    similarity = _normalize(generated) @ _normalize(training).T
    index = similarity.argmax(axis=1)
    return NearestMatch(index=index, similarity=similarity[np.arange(len(generated)), index])


def correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation of two equally long stacks of images."""
    return (_normalize(a) * _normalize(b)).sum(axis=1)
