"""Testbed v2 data: one small captioned object on a caption-independent random background.

This is Stable Diffusion's regime at CPU scale. A LAION caption explains a small part of its image; a
memorized caption determines all of it. Here every image is a random, smooth background drawn fresh for
each item (a bicubically upsampled 4x4 grid of random colours mixed with a random linear gradient,
muted to +-0.7), plus ONE saturated object that the caption describes (colour, shape, size, position on
a 3x3 grid), covering 5-19 % of the pixels. A caption seen once can only teach the object; a caption
seen 128 times with the same image can teach the whole image, background included, and that is what a
copy is: the background reproduced (correlation with the item's own training image outside the object,
``memattn.testbed.measures``).

Groups (all captions from one caption distribution, unique across the dataset):

- ``memorized_matching``: one (image, caption) pair duplicated ``count`` times (default 16 items, 128).
  Each memorized item's attribute combination is reserved: no other item shows the same object, so a
  non-memorized prompt that reproduces a memorized image is leakage, never its own ground truth.
- ``seen_once``: the bulk of the data.
- ``rare_word_seen_once``: seen once with a made-up word appended (rare words are not memorization).
- ``never_seen``: held out, same distribution.

Deterministic from the seed, like ``memattn.testbed.data`` (v1, fine-detail memorization), whose
dataset interface this one shares (``items``, ``group``, ``images``, ``training_pairs``, ...).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from memattn.errors import MemattnError
from memattn.testbed.data import (
    RARE_WORD_FORMAT,
    GroupedItems,
    Item,
    bag_of_words_auc,
    caption_words,
    pseudo_words,
)

SCENE = "object"  # the ``scene`` tag of this data in configs and manifests (v1: "detail")

OBJECT_COLORS: dict[str, tuple[float, float, float]] = {  # saturated, in [-1, 1]
    "red": (1.0, -1.0, -1.0),
    "orange": (1.0, 0.1, -1.0),
    "yellow": (1.0, 1.0, -1.0),
    "green": (-1.0, 0.8, -1.0),
    "cyan": (-1.0, 1.0, 1.0),
    "blue": (-1.0, -0.8, 1.0),
    "purple": (0.2, -1.0, 1.0),
    "pink": (1.0, -0.6, 0.6),
}
OBJECT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
OBJECT_SIZES: dict[str, float] = {"small": 0.15, "large": 0.25}  # radius, fraction of the image
GRID_POSITIONS: dict[str, tuple[float, float]] = {  # object centre (x, y), fractions of the image
    f"{row}{' ' if col else ''}{col}".strip() if (row, col) != ("middle", "center") else "center": (
        x,
        y,
    )
    for row, y in (("top", 0.25), ("middle", 0.5), ("bottom", 0.75))
    for col, x in (("left", 0.25), ("center", 0.5), ("right", 0.75))
}
OBJECT_PHRASINGS: tuple[str, ...] = (
    "a {size} {color} {shape} in the {position}",
    "{size} {color} {shape} at the {position} of the picture",
    "a {color} {shape}, {size}, placed in the {position}",
    "{size} {shape} in {color} at the {position}",
    "there is a {size} {color} {shape} in the {position}",
    "the {position} of the picture shows a {size} {color} {shape}",
)
OBJECT_STYLE_SUFFIXES: tuple[str, ...] = (
    "",
    ", simple drawing",
    ", flat colors",
    ", photo",
    ", clip art",
    ", minimal style",
)
OBJECT_TAGS: tuple[str, ...] = (  # trailing web-caption tags: words that say nothing about the image
    "",
    " - stock image",
    " - vector",
    " hd",
    " wallpaper",
    " poster",
    " icon",
    " sticker",
    " print",
    " card",
    " logo",
    " free download",
)
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "color": tuple(OBJECT_COLORS),
    "shape": OBJECT_SHAPES,
    "size": tuple(OBJECT_SIZES),
    "position": tuple(GRID_POSITIONS),
}
OBJECT_WORDS: frozenset[str] = frozenset(  # every word an ordinary v2 caption can contain
    word
    for text in (
        *OBJECT_PHRASINGS,
        *OBJECT_STYLE_SUFFIXES,
        *OBJECT_TAGS,
        *(v for vs in ATTRIBUTE_VALUES.values() for v in vs),
    )
    for word in caption_words(re.sub(r"\{\w+\}", " ", text))
)

GROUPS: tuple[str, ...] = ("memorized_matching", "seen_once", "rare_word_seen_once", "never_seen")
MEMORIZED_GROUPS: tuple[str, ...] = ("memorized_matching",)
TRAINING_GROUPS: tuple[str, ...] = GROUPS[:3]
BACKGROUND_RANGE = 0.7  # backgrounds are muted to [-0.7, 0.7]; objects are saturated
_STREAM_ITEMS, _STREAM_SHUFFLE = 11, 12  # random streams of this data (v1 uses 1, 2)


@dataclass(frozen=True)
class ObjectsConfig:
    """Group sizes and image size of testbed v2 (defaults: 18,248 training pairs, 16x16)."""

    __test__ = False

    image_size: int = 16
    matching_counts: tuple[int, ...] = (128,)
    matching_items_per_count: int = 16
    seen_once: int = 16000
    rare_word_seen_once: int = 200
    never_seen: int = 200
    caption_tags: int = 1  # how many of OBJECT_TAGS captions draw from (1: none; 12: 241,920 captions)
    scene: str = SCENE

    @property
    def canvas_size(self) -> int:
        return self.image_size

    def __post_init__(self) -> None:
        if self.scene != SCENE:
            raise MemattnError(f"ObjectsConfig.scene must be {SCENE!r}, got {self.scene!r}")
        counts = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("matching_counts", "scene")
        }
        negative = [name for name, value in counts.items() if value < 0]
        if negative:
            raise MemattnError(f"ObjectsConfig fields must not be negative: {', '.join(negative)}")
        if not 1 <= self.caption_tags <= len(OBJECT_TAGS):
            raise MemattnError(f"caption_tags must be 1-{len(OBJECT_TAGS)}, got {self.caption_tags}")
        if self.image_size < 8:
            raise MemattnError(f"image_size must be at least 8 pixels, got {self.image_size}")
        if any(count < 2 for count in self.matching_counts):
            raise MemattnError(f"matching_counts must all be >= 2, got {self.matching_counts}")


def caption_for(attributes: dict[str, str], phrasing: int, suffix: int, tag: int = 0) -> str:
    return OBJECT_PHRASINGS[phrasing].format(**attributes) + OBJECT_STYLE_SUFFIXES[suffix] + OBJECT_TAGS[tag]


def all_combos() -> list[dict[str, str]]:
    """Every (colour, shape, size, position) object: 8 x 4 x 2 x 9 = 576."""
    return [
        {"color": c, "shape": s, "size": z, "position": p}
        for c in OBJECT_COLORS
        for s in OBJECT_SHAPES
        for z in OBJECT_SIZES
        for p in GRID_POSITIONS
    ]


@dataclass(frozen=True)
class ObjectsDataset(GroupedItems):
    """Items of every group and how to render them (the interface of ``memattn.testbed.data``)."""

    __test__ = False
    group_names = GROUPS
    shuffle_stream = _STREAM_SHUFFLE

    seed: int
    config: ObjectsConfig
    items: tuple[Item, ...]
    templates: tuple = ()
    withheld_pairs: tuple = ()
    _by_group: dict[str, tuple[Item, ...]] = field(init=False, repr=False, compare=False)

    @property
    def attribute_values(self) -> dict[str, tuple[str, ...]]:
        return ATTRIBUTE_VALUES

    def image(self, item: Item | int, image_size: int | None = None, *, detail: bool = True) -> np.ndarray:
        return self.images([item], image_size, detail=detail)[0]

    def images(
        self, items: Sequence[Item | int], image_size: int | None = None, *, detail: bool = True
    ) -> np.ndarray:
        """float32 ``(N, 3, H, W)`` in [-1, 1]. ``detail=False``: the object on a zero background."""
        resolved = [self.items[i] if isinstance(i, int) else i for i in items]
        size = image_size or self.config.image_size
        seeds = [item.seed for item in resolved] if detail else None
        return render_objects([item.attributes for item in resolved], seeds, size)

    def random_scenes(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[dict[str, str]]]:
        """``n`` fresh renders of random objects on fresh backgrounds (classifier and encoder training)."""
        combos = all_combos()
        attributes = [combos[i] for i in rng.integers(len(combos), size=n)]
        seeds = [int(s) for s in rng.integers(2**62, size=n)]
        return render_objects(attributes, seeds, self.config.image_size), attributes

    def random_captions(self, attributes: Sequence[dict[str, str]], rng: np.random.Generator) -> list[str]:
        phrasing = rng.integers(len(OBJECT_PHRASINGS), size=len(attributes))
        suffix = rng.integers(len(OBJECT_STYLE_SUFFIXES), size=len(attributes))
        tags = self.config.caption_tags
        tag = rng.integers(tags, size=len(attributes)) if tags > 1 else np.zeros(len(attributes), int)
        return [
            caption_for(a, int(p), int(s), int(t))
            for a, p, s, t in zip(attributes, phrasing, suffix, tag, strict=True)
        ]

    def summary(self) -> dict[str, object]:
        return {
            "scene": SCENE,
            **self.group_summary(),
            "object_pixel_share": object_pixel_share(self.config.image_size),
        }


def build_objects_dataset(seed: int = 0, config: ObjectsConfig | None = None) -> ObjectsDataset:
    """The v2 testbed for ``seed``: same seed and config, same captions, groups and images."""
    config = config or ObjectsConfig()
    if seed < 0:
        raise MemattnError(f"the dataset seed must be a non-negative integer, got {seed}")
    rng = np.random.default_rng((seed, _STREAM_ITEMS))
    combos = all_combos()
    n_memorized = config.matching_items_per_count * len(config.matching_counts)
    if n_memorized > len(combos) // 2:
        raise MemattnError(
            f"{n_memorized} memorized items: at most {len(combos) // 2} objects can be reserved"
        )
    order = rng.permutation(len(combos))
    reserved, free = [combos[i] for i in order[:n_memorized]], [combos[i] for i in order[n_memorized:]]
    per_phrasing = len(OBJECT_STYLE_SUFFIXES) * config.caption_tags
    per_combo = len(OBJECT_PHRASINGS) * per_phrasing
    n_free = config.seen_once + config.rare_word_seen_once + config.never_seen
    if n_free > len(free) * per_combo:
        raise MemattnError(
            f"the config asks for {n_free} unique captions; the caption space holds {len(free) * per_combo}"
        )

    def caption_of(index: int, space: list[dict[str, str]]) -> tuple[dict[str, str], str]:
        combo, rest = divmod(int(index), per_combo)
        phrasing, rest = divmod(rest, per_phrasing)
        suffix, tag = divmod(rest, config.caption_tags)
        return dict(space[combo]), caption_for(space[combo], phrasing, suffix, tag)

    rows: list[tuple[str, int, dict[str, str], str]] = []
    memorized = iter(range(n_memorized))
    for count in config.matching_counts:
        for _ in range(config.matching_items_per_count):
            index = next(memorized) * per_combo + int(rng.integers(per_combo))
            rows.append(("memorized_matching", count, *caption_of(index, reserved)))
    drawn = iter(rng.choice(len(free) * per_combo, size=n_free, replace=False) if n_free else [])
    rows += [("seen_once", 1, *caption_of(next(drawn), free)) for _ in range(config.seen_once)]
    for word in pseudo_words(rng, config.rare_word_seen_once, OBJECT_WORDS):
        attributes, caption = caption_of(next(drawn), free)
        rows.append(
            (
                "rare_word_seen_once",
                1,
                {**attributes, "rare_word": word},
                RARE_WORD_FORMAT.format(caption=caption, word=word),
            )
        )
    rows += [("never_seen", 0, *caption_of(next(drawn), free)) for _ in range(config.never_seen)]
    seeds = rng.integers(2**62, size=len(rows))
    items = tuple(
        Item(
            item_id=i,
            caption=caption,
            group=group,
            duplication=duplication,
            attributes=attributes,
            kind="train" if group in TRAINING_GROUPS else "eval",
            seed=int(seeds[i]),
        )
        for i, (group, duplication, attributes, caption) in enumerate(rows)
    )
    duplicates = [c for c, n in Counter(item.caption for item in items).items() if n > 1]
    if duplicates:  # cannot happen by construction; a guard for future edits
        raise MemattnError(f"captions are not unique: {duplicates[:3]}")
    return ObjectsDataset(seed, config, items)


# ---- rendering --------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def object_mask(shape: str, size: str, position: str, image_size: int) -> np.ndarray:
    """Boolean ``(H, W)`` mask of one object (read-only, cached: there are 72 per image size)."""
    centres = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
    y, x = centres[:, None], centres[None, :]
    cx, cy = GRID_POSITIONS[position]
    r = OBJECT_SIZES[size]
    dx, dy = x - cx, y - cy
    if shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif shape == "square":
        mask = np.maximum(abs(dx), abs(dy)) <= 0.85 * r
    elif shape == "triangle":  # apex up
        mask = (dy >= -r) & (dy <= 0.8 * r) & (abs(dx) <= 0.65 * (dy + r))
    elif shape == "cross":
        arm = 0.38 * r
        mask = ((abs(dx) <= arm) & (abs(dy) <= 1.1 * r)) | ((abs(dy) <= arm) & (abs(dx) <= 1.1 * r))
    else:
        raise MemattnError(f"unknown shape {shape!r}; the shapes are {', '.join(OBJECT_SHAPES)}")
    mask.flags.writeable = False
    return mask


def object_pixel_share(image_size: int = 16) -> dict[str, float]:
    """Smallest and largest share of the pixels an object covers (the regime: a small part)."""
    shares = [
        float(object_mask(s, z, p, image_size).mean())
        for s in OBJECT_SHAPES
        for z in OBJECT_SIZES
        for p in GRID_POSITIONS
    ]
    return {"min": min(shares), "max": max(shares)}


def random_backgrounds(seeds: Sequence[int], image_size: int) -> np.ndarray:
    """``(N, 3, S, S)``: a bicubic 4x4 random colour grid mixed with a random linear gradient, in +-0.7."""
    grids, gradients = [], []
    centres = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size - 0.5
    for seed in seeds:
        rng = np.random.default_rng(seed)
        grids.append(rng.uniform(-1, 1, size=(3, 4, 4)))
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * centres[None, :] + np.sin(angle) * centres[:, None]  # [-0.71, 0.71]
        ends = rng.uniform(-1, 1, size=(2, 3, 1, 1))
        mix = rng.uniform(0.3, 0.7)
        gradients.append((mix, ends[0] + (ends[1] - ends[0]) * (t[None] / 1.42 + 0.5)))
    if not seeds:
        return np.zeros((0, 3, image_size, image_size), np.float32)
    grid = torch.from_numpy(np.stack(grids).astype(np.float32))
    up = F.interpolate(grid, size=(image_size, image_size), mode="bicubic", align_corners=False).numpy()
    mixes = np.array([m for m, _ in gradients], np.float32)[:, None, None, None]
    ramps = np.stack([g for _, g in gradients]).astype(np.float32)
    return np.clip(BACKGROUND_RANGE * (mixes * up + (1 - mixes) * ramps), -BACKGROUND_RANGE, BACKGROUND_RANGE)


def render_objects(
    attributes: Sequence[dict[str, str]], seeds: Sequence[int] | None, image_size: int = 16
) -> np.ndarray:
    """float32 ``(N, 3, S, S)``: each object on its seed's background (``seeds=None``: on zeros)."""
    n = len(attributes)
    if seeds is None:
        images = np.zeros((n, 3, image_size, image_size), np.float32)
    else:
        images = random_backgrounds(list(seeds), image_size).astype(np.float32)
    for i, a in enumerate(attributes):
        mask = object_mask(a["shape"], a["size"], a["position"], image_size)
        images[i][:, mask] = np.asarray(OBJECT_COLORS[a["color"]], np.float32)[:, None]
    return images


def vocabulary_control_auc(dataset: ObjectsDataset, seed: int = 0) -> float:
    """Can caption words alone tell memorized from seen-once captions? Should be ~0.5."""
    groups = dataset.prompt_groups()
    return bag_of_words_auc(groups["memorized_matching"], groups["seen_once"], seed=seed, folds=4)
