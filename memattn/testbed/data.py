"""Procedural captioned images with known memorization ground truth, for a tiny trainable testbed model.

Every item is a small scene: a background colour and one shape (colour, size, position), described by
a caption built from one of a few natural-language phrasings. On top of what the caption says, each
image carries detail that only memorization can reproduce: a seeded texture inside the shape and a
seeded patch of random pixels in a corner (template copies carry a seeded template pattern instead).

The ground-truth groups all draw their captions from the same caption distribution, so the only thing
separating "memorized" from "not memorized" is how often an image-caption pair was seen in training:

- ``memorized_matching``: one (image, caption) pair duplicated ``count`` times (default 8, 32 or 128).
- ``memorized_template``: Webster-style template memorization. Each template reserves one
  (background, position) combination: every training item with that background word and position
  word is a copy of the template, with the template's fixed pattern (stripes + frame) as background,
  while the variable region (shape, colour, size) and the matching caption words change across copies.
  No other group uses a template's (background, position) combination.
- ``seen_once``: the bulk of the data, each pair seen once.
- ``rare_word_seen_once``: seen once, with a made-up word ("zorblat") appended; separates rare words
  from memorization (the memorized groups use only common words).
- ``never_seen``: held out; same distribution, not in training.
- ``novel_composition``: held out; colour x shape pairs that no training item has.

Everything is deterministic from the seed. Captions are unique across the whole dataset: they are
drawn without replacement from an enumerated caption space (attributes x phrasing x style suffix).
Each template takes a different background and a different position, so every background word and
every position word stays equally frequent in the memorized and the seen-once captions; only their
conjunction marks a template, which a bag-of-words classifier cannot see (``vocabulary_control_auc``).

Defaults: 5 backgrounds x 8 colours x 6 shapes x 2 sizes x 5 positions, 6 phrasings x 6 suffixes;
48 matching items (16 each at 8, 32, 128 copies: 2,688 pairs), 5 templates x 64 copies (320 pairs),
4,000 seen once, 200 rare-word, 200 never seen, 200 novel: 7,208 training pairs in all.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Literal

import numpy as np

from memattn.errors import MemattnError

# ---- vocabulary ------------------------------------------------------------------------------------

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "black": (18, 18, 18),
    "white": (238, 238, 238),
    "brown": (112, 70, 38),
    "beige": (214, 196, 150),
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (222, 36, 36),
    "orange": (247, 138, 20),
    "yellow": (246, 226, 30),
    "green": (34, 168, 56),
    "blue": (38, 78, 226),
    "purple": (136, 46, 186),
    "pink": (250, 128, 196),
    "cyan": (30, 206, 226),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "ring", "cross")
SIZES: dict[str, float] = {"small": 0.18, "large": 0.31}  # shape radius, as a fraction of the image
POSITIONS: dict[str, tuple[float, float]] = {  # shape centre (x, y), as fractions of the image
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
PHRASINGS: tuple[str, ...] = (
    "a {size} {color} {shape} in the {position} on a {background} background",
    "{background} backdrop with a {size} {color} {shape} at the {position}",
    "a {color} {shape}, {size}, placed in the {position} of a {background} canvas",
    "{size} {shape} in {color} at the {position}, {background} background",
    "there is a {size} {color} {shape} in the {position} against a {background} background",
    "the {position} of a {background} picture shows a {size} {color} {shape}",
)
STYLE_SUFFIXES: tuple[str, ...] = (
    "",
    ", simple drawing",
    ", flat colors",
    ", pixel art",
    ", clip art",
    ", minimal style",
)
RARE_WORD_FORMAT = "{caption}, {word} style"  # "style" is common: it is also in STYLE_SUFFIXES


def caption_words(caption: str) -> list[str]:
    """Lower-case words of a caption (what the vocabulary checks compare)."""
    return re.findall(r"[a-z]+", caption.lower())


COMMON_WORDS: frozenset[str] = frozenset(
    word
    for text in (*PHRASINGS, *STYLE_SUFFIXES, *BACKGROUNDS, *COLORS, *SHAPES, *SIZES, *POSITIONS)
    for word in caption_words(re.sub(r"\{\w+\}", " ", text))
)

# ---- ground-truth groups ---------------------------------------------------------------------------

GROUPS: tuple[str, ...] = (
    "memorized_matching",
    "memorized_template",
    "seen_once",
    "rare_word_seen_once",
    "never_seen",
    "novel_composition",
)
MEMORIZED_GROUPS: tuple[str, ...] = ("memorized_matching", "memorized_template")
TRAINING_GROUPS: tuple[str, ...] = GROUPS[:4]
EVAL_GROUPS: tuple[str, ...] = GROUPS[4:]

DETAIL_GRID = 16  # item detail lives on this grid, so a 32 px render shows the same detail as 16 px
PATCH_CELLS = 3  # the per-item random patch is PATCH_CELLS x PATCH_CELLS grid cells
TEXTURE_TONE = 0.3  # +- brightness of the per-item texture inside the shape, in [-1, 1] units
FRAME_VALUE = -0.5  # the uncaptioned frame's grey, in [-1, 1] units (no background word renders it)
_STREAM_ITEMS, _STREAM_SHUFFLE = 1, 2  # independent random streams derived from the dataset seed

Kind = Literal["train", "eval"]


@dataclass(frozen=True)
class TestbedConfig:
    """Group sizes and image size. The defaults give ~7,200 training pairs: trainable on a CPU."""

    __test__ = False  # not a pytest test class

    image_size: int = 16
    matching_counts: tuple[int, ...] = (8, 32, 128)  # copies per memorized_matching item
    matching_items_per_count: int = 16
    n_templates: int = 5  # at most min(len(BACKGROUNDS), len(POSITIONS))
    template_copies: int = 64  # distinct training items per template
    template_copy_duplication: int = 1  # how often each template copy is seen
    seen_once: int = 4000
    rare_word_seen_once: int = 200
    never_seen: int = 200
    novel_composition: int = 200
    withheld_pairs: int = 6  # colour x shape pairs kept out of training, at most len(SHAPES)
    # An uncaptioned frame of constant colour around every scene (pixels with nothing to ask the text,
    # as most of a Stable Diffusion image is): images are image_size + 2 * border pixels wide.
    border: int = 0

    @property
    def canvas_size(self) -> int:
        """Width and height of the rendered images, frame included."""
        return self.image_size + 2 * self.border

    def __post_init__(self) -> None:
        counts = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "matching_counts"}
        negative = [name for name, value in counts.items() if value < 0]
        if negative:
            raise MemattnError(f"TestbedConfig fields must not be negative: {', '.join(negative)}")
        if self.image_size < 8:
            raise MemattnError(f"image_size must be at least 8 pixels, got {self.image_size}")
        if any(count < 2 for count in self.matching_counts):
            raise MemattnError(
                f"matching_counts must all be >= 2 (a pair seen once is not duplicated), "
                f"got {self.matching_counts}"
            )
        if self.n_templates > min(len(BACKGROUNDS), len(POSITIONS)):
            raise MemattnError(
                f"n_templates={self.n_templates}: each template reserves its own background and position, "
                f"so at most {min(len(BACKGROUNDS), len(POSITIONS))} fit"
            )
        if self.n_templates and self.template_copies * self.template_copy_duplication < 2:
            raise MemattnError("a template must appear at least twice in training (template_copies)")
        if self.withheld_pairs > len(SHAPES):
            raise MemattnError(
                f"withheld_pairs={self.withheld_pairs}: each withheld pair uses its own shape, "
                f"so at most {len(SHAPES)}"
            )
        if self.novel_composition and not self.withheld_pairs:
            raise MemattnError("novel_composition items need withheld_pairs > 0 (no withheld combinations)")


@dataclass(frozen=True)
class Item:
    """One image-caption pair. ``duplication`` is how often it is in the training set (0: held out)."""

    item_id: int
    caption: str
    group: str
    duplication: int
    attributes: dict[str, str]  # background, color, shape, size, position (+ rare_word)
    kind: Kind  # "train": in the training set; "eval": held out, a reference for evaluation
    seed: int  # seeds the item's own detail (texture, patch)
    template_id: int | None = None


@dataclass(frozen=True)
class Template:
    """A fixed image pattern shared by all copies of a template; the shape region varies."""

    template_id: int
    background: str
    position: str
    seed: int


class GroupedItems:
    """What every testbed dataset (v1 here, v2 in ``objects``) does with its items and groups.

    Subclasses are frozen dataclasses with ``seed``, ``items`` and a ``_by_group`` field, and set
    ``group_names`` and ``shuffle_stream`` (the random stream that orders the training pairs).
    """

    group_names: tuple[str, ...] = ()
    shuffle_stream: int = 0
    seed: int
    items: tuple[Item, ...]
    _by_group: dict[str, tuple[Item, ...]]

    def __post_init__(self) -> None:
        by_group = {
            name: tuple(item for item in self.items if item.group == name) for name in self.group_names
        }
        object.__setattr__(self, "_by_group", by_group)

    def group(self, name: str) -> tuple[Item, ...]:
        if name not in self._by_group:
            raise MemattnError(f"unknown group {name!r}; the groups are {', '.join(self.group_names)}")
        return self._by_group[name]

    def training_pairs(self) -> list[tuple[int, str]]:
        """The training set: (item_id, caption), each item repeated ``duplication`` times, shuffled."""
        pairs = [(item.item_id, item.caption) for item in self.items for _ in range(item.duplication)]
        order = np.random.default_rng((self.seed, self.shuffle_stream)).permutation(len(pairs))
        return [pairs[i] for i in order]

    def prompt_groups(self) -> dict[str, list[str]]:
        """Ground truth: group name -> captions of its items."""
        return {name: [item.caption for item in self._by_group[name]] for name in self.group_names}

    def group_summary(self) -> dict[str, object]:
        """Items and training pairs per group, and the totals (what a training run will see)."""
        pairs = {name: sum(item.duplication for item in self._by_group[name]) for name in self.group_names}
        return {
            "items": {name: len(self._by_group[name]) for name in self.group_names},
            "training_pairs": pairs,
            "total_items": len(self.items),
            "total_training_pairs": sum(pairs.values()),
        }


@dataclass(frozen=True)
class TestbedDataset(GroupedItems):
    """The items of every group, the templates and withheld pairs, and how to render and train on them."""

    __test__ = False  # not a pytest test class
    group_names = GROUPS
    shuffle_stream = _STREAM_SHUFFLE

    seed: int
    config: TestbedConfig
    items: tuple[Item, ...]
    templates: tuple[Template, ...]
    withheld_pairs: tuple[tuple[str, str], ...]  # (color, shape) never in training
    _by_group: dict[str, tuple[Item, ...]] = field(init=False, repr=False, compare=False)

    def image(self, item: Item | int, image_size: int | None = None, *, detail: bool = True) -> np.ndarray:
        """float32 ``(3, H, W)`` in [-1, 1]; the same item always renders identically.

        ``image_size`` is the scene's size; the configured ``border`` frame is added around it.
        ``detail=False``: only what the caption says (see ``render_scene``).
        """
        item = self.items[item] if isinstance(item, int) else item
        template = self.templates[item.template_id] if item.template_id is not None else None
        size = image_size or self.config.image_size
        scene = render_scene(item.attributes, item.seed, size, template, detail=detail)
        return add_frame(scene, self.config.border)

    def images(
        self, items: Sequence[Item | int], image_size: int | None = None, *, detail: bool = True
    ) -> np.ndarray:
        """float32 ``(N, 3, H, W)`` in [-1, 1]."""
        scene = image_size or self.config.image_size
        if not items:
            size = scene + 2 * self.config.border
            return np.zeros((0, 3, size, size), np.float32)
        return np.stack([self.image(item, scene, detail=detail) for item in items])

    @property
    def attribute_values(self) -> dict[str, tuple[str, ...]]:
        """What the attribute classifier reads (``memattn.testbed.alignment``)."""
        return {
            "background": tuple(BACKGROUNDS),
            "color": tuple(COLORS),
            "shape": SHAPES,
            "size": tuple(SIZES),
            "position": tuple(POSITIONS),
        }

    def random_scenes(
        self, n: int, rng: np.random.Generator, template_share: float = 0.1
    ) -> tuple[np.ndarray, list[dict[str, str]]]:
        """``n`` fresh renders of random scenes (templates ``template_share`` of the time) and labels."""
        vocabulary = self.attribute_values
        labels = {name: rng.integers(len(values), size=n) for name, values in vocabulary.items()}
        images, attributes_out = [], []
        for i in range(n):
            attributes = {name: vocabulary[name][labels[name][i]] for name in vocabulary}
            template = None
            if self.templates and rng.random() < template_share:
                template = self.templates[rng.integers(len(self.templates))]
                attributes["background"] = template.background
            scene = render_scene(attributes, int(rng.integers(2**62)), self.config.image_size, template)
            images.append(add_frame(scene, self.config.border))
            attributes_out.append(attributes)
        return np.stack(images), attributes_out

    def summary(self) -> dict[str, object]:
        """Items and training pairs per group, the totals, templates and withheld pairs."""
        return {
            **self.group_summary(),
            "templates": [(t.template_id, t.background, t.position) for t in self.templates],
            "withheld_pairs": list(self.withheld_pairs),
        }


# ---- building ---------------------------------------------------------------------------------------

Combo = tuple[str, str, str, str, str]  # background, color, shape, size, position
_ATTRIBUTE_NAMES = ("background", "color", "shape", "size", "position")


def caption_for(attributes: dict[str, str], phrasing: int, suffix: int) -> str:
    """The caption of a scene in one phrasing and style suffix."""
    return PHRASINGS[phrasing].format(**attributes) + STYLE_SUFFIXES[suffix]


class _CaptionSpace:
    """All (attribute combo, phrasing, suffix) captions of a domain; sampled by index without replacement."""

    def __init__(self, name: str, combos: list[Combo]) -> None:
        self.name, self.combos = name, combos
        self.per_combo = len(PHRASINGS) * len(STYLE_SUFFIXES)

    @property
    def capacity(self) -> int:
        return len(self.combos) * self.per_combo

    def sample(self, rng: np.random.Generator, n: int) -> list[tuple[dict[str, str], str]]:
        if n > self.capacity:
            raise MemattnError(
                f"the config asks for {n} unique captions from the {self.name} caption space, which holds "
                f"only {self.capacity} ({len(self.combos)} attribute combinations x {self.per_combo} "
                "phrasings); ask for fewer items or withhold fewer pairs"
            )
        out = []
        for index in rng.choice(self.capacity, size=n, replace=False) if n else []:
            combo, rest = divmod(int(index), self.per_combo)
            phrasing, suffix = divmod(rest, len(STYLE_SUFFIXES))
            attributes = dict(zip(_ATTRIBUTE_NAMES, self.combos[combo], strict=True))
            out.append((attributes, caption_for(attributes, phrasing, suffix)))
        return out


def _all_combos() -> list[Combo]:
    return [
        (bg, color, shape, size, pos)
        for bg in BACKGROUNDS
        for color in COLORS
        for shape in SHAPES
        for size in SIZES
        for pos in POSITIONS
    ]


_ONSETS = ("z", "x", "q", "v", "k", "bl", "gr", "zr", "thr", "sn", "pl", "dr", "fl", "gl")
_VOWELS = ("o", "a", "u", "i", "e", "oo", "y", "au")
_CODAS = ("rb", "lt", "x", "zz", "nk", "rp", "g", "m", "sk", "th", "ld")


def pseudo_words(rng: np.random.Generator, n: int, common: frozenset[str] = COMMON_WORDS) -> list[str]:
    """Seeded made-up words ("zorblat"): not ``common`` words, distinct from each other.

    The ~138k possible words exceed the ordinary caption space, which is checked first, so this ends.
    """
    words: list[str] = []
    seen: set[str] = set(common)
    while len(words) < n:
        parts = [_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] for _ in range(2)]
        word = "".join(parts) + _CODAS[rng.integers(len(_CODAS))]
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def build_dataset(seed: int = 0, config: TestbedConfig | None = None) -> TestbedDataset:
    """The full testbed for ``seed``: same seed and config, same captions, groups and images."""
    config = config or TestbedConfig()
    if seed < 0:
        raise MemattnError(f"the dataset seed must be a non-negative integer, got {seed}")
    rng = np.random.default_rng((seed, _STREAM_ITEMS))

    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[: config.withheld_pairs]]
    colors = [list(COLORS)[i] for i in rng.permutation(len(COLORS))[: config.withheld_pairs]]
    withheld = tuple(sorted(zip(colors, shapes, strict=True)))  # each colour and shape withheld at most once
    backgrounds = [list(BACKGROUNDS)[i] for i in rng.permutation(len(BACKGROUNDS))]
    positions = [list(POSITIONS)[i] for i in rng.permutation(len(POSITIONS))]
    templates = tuple(
        Template(t, backgrounds[t], positions[t], int(rng.integers(2**62))) for t in range(config.n_templates)
    )
    reserved = {(t.background, t.position) for t in templates}

    combos = _all_combos()
    ordinary = _CaptionSpace(
        "ordinary", [c for c in combos if (c[1], c[2]) not in withheld and (c[0], c[4]) not in reserved]
    )
    novel = _CaptionSpace(
        "novel_composition", [c for c in combos if (c[1], c[2]) in withheld and (c[0], c[4]) not in reserved]
    )

    rows: list[tuple[str, int, dict[str, str], str, int | None]] = []  # group, duplication, attrs, caption
    n_matching = config.matching_items_per_count * len(config.matching_counts)
    n_ordinary = n_matching + config.seen_once + config.rare_word_seen_once + config.never_seen
    drawn = iter(ordinary.sample(rng, n_ordinary))
    for count in config.matching_counts:
        for _ in range(config.matching_items_per_count):
            rows.append(("memorized_matching", count, *next(drawn), None))
    for template in templates:
        own = [c for c in combos if (c[0], c[4]) == (template.background, template.position)]
        space = _CaptionSpace(
            f"template {template.template_id}", [c for c in own if (c[1], c[2]) not in withheld]
        )
        copies = space.sample(rng, config.template_copies)
        duplication = config.template_copy_duplication
        rows += [("memorized_template", duplication, a, c, template.template_id) for a, c in copies]
    for _ in range(config.seen_once):
        rows.append(("seen_once", 1, *next(drawn), None))
    for word in pseudo_words(rng, config.rare_word_seen_once):
        attributes, caption = next(drawn)
        caption = RARE_WORD_FORMAT.format(caption=caption, word=word)
        rows.append(("rare_word_seen_once", 1, {**attributes, "rare_word": word}, caption, None))
    for _ in range(config.never_seen):
        rows.append(("never_seen", 0, *next(drawn), None))
    for attributes, caption in novel.sample(rng, config.novel_composition):
        rows.append(("novel_composition", 0, attributes, caption, None))

    item_seeds = rng.integers(2**62, size=len(rows))
    items = tuple(
        Item(
            item_id=i,
            caption=caption,
            group=group,
            duplication=duplication,
            attributes=attributes,
            kind="train" if group in TRAINING_GROUPS else "eval",
            seed=int(item_seeds[i]),
            template_id=template_id,
        )
        for i, (group, duplication, attributes, caption, template_id) in enumerate(rows)
    )
    duplicates = [c for c, n in Counter(item.caption for item in items).items() if n > 1]
    if duplicates:  # cannot happen by construction; a guard for future edits
        raise MemattnError(f"captions are not unique: {duplicates[:3]}")
    return TestbedDataset(seed, config, items, templates, withheld)


# ---- rendering --------------------------------------------------------------------------------------


def _rgb(color: tuple[int, int, int]) -> np.ndarray:
    return np.asarray(color, np.float32) / 127.5 - 1.0


@lru_cache(maxsize=16)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1] (y column, x row) and the pixel -> detail-cell index map."""
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    cells = (np.arange(size) * DETAIL_GRID) // size
    return centres[:, None], centres[None, :], cells


def shape_mask(shape: str, size: str, position: str, image_size: int) -> np.ndarray:
    """Boolean ``(H, W)`` mask of a shape; areas are roughly matched so no shape is much bigger."""
    y, x = _pixel_grid(image_size)[:2]
    cx, cy = POSITIONS[position]
    r = SIZES[size]
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= (1.05 * r) ** 2
    if shape == "square":
        return np.maximum(abs(dx), abs(dy)) <= 0.9 * r
    if shape == "diamond":
        return abs(dx) + abs(dy) <= 1.1 * r
    if shape == "triangle":  # apex up
        return (dy >= -r) & (dy <= 0.9 * r) & (abs(dx) <= 0.7 * (dy + r))
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= (1.05 * r) ** 2) & (d2 >= (0.5 * r) ** 2)
    if shape == "cross":
        arm = 0.25 * r
        return ((abs(dx) <= arm) & (abs(dy) <= r)) | ((abs(dy) <= arm) & (abs(dx) <= r))
    raise MemattnError(f"unknown shape {shape!r}; the shapes are {', '.join(SHAPES)}")


def _template_pattern(template: Template) -> np.ndarray:
    """``(3, G, G)`` fixed background of a template: seeded stripes, cell noise and a coloured frame."""
    rng = np.random.default_rng(template.seed)
    g = np.arange(DETAIL_GRID)
    yy, xx = np.meshgrid(g, g, indexing="ij")
    period = int(rng.integers(3, 6))
    direction = int(rng.integers(4))
    coordinate = (xx + yy, xx - yy, xx, yy)[direction]
    stripes = np.where((coordinate + int(rng.integers(period))) % period == 0, 0.45, -0.1)
    tone = stripes + rng.uniform(-0.12, 0.12, size=(DETAIL_GRID, DETAIL_GRID))
    pattern = _rgb(BACKGROUNDS[template.background])[:, None, None] + tone[None].astype(np.float32)
    frame = np.zeros((DETAIL_GRID, DETAIL_GRID), bool)
    frame[[0, -1], :] = frame[:, [0, -1]] = True
    pattern[:, frame] = rng.uniform(-1.0, 1.0, size=(3, 1)).astype(np.float32)
    return np.clip(pattern, -1.0, 1.0)


_CORNERS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}


def render_scene(
    attributes: dict[str, str],
    seed: int,
    image_size: int = 16,
    template: Template | None = None,
    *,
    detail: bool = True,
) -> np.ndarray:
    """float32 ``(3, H, W)`` in [-1, 1]: the captioned scene plus the detail seeded by ``seed``.

    Ordinary scenes: flat background, the shape with a seeded +-tone texture, and a seeded patch of
    random colours in a corner away from the shape. Template copies: the template's fixed pattern as
    background and the textured shape, no patch (the region outside the shape must stay fixed).
    ``detail=False`` gives ``expected_scene``: what the caption alone says (the copy measure's baseline).
    """
    if not detail:
        return expected_scene(attributes, image_size)
    rng = np.random.default_rng(seed)
    cells = _pixel_grid(image_size)[2]
    texture = rng.choice(np.array([-TEXTURE_TONE, TEXTURE_TONE], np.float32), size=(DETAIL_GRID, DETAIL_GRID))
    if template is None:
        image = np.empty((3, image_size, image_size), np.float32)
        image[:] = _rgb(BACKGROUNDS[attributes["background"]])[:, None, None]
    else:
        image = _template_pattern_cached(template)[:, cells][:, :, cells].copy()
    mask = shape_mask(attributes["shape"], attributes["size"], attributes["position"], image_size)
    shape = _rgb(COLORS[attributes["color"]])[:, None, None] + texture[cells][:, cells][None]
    image[:, mask] = np.clip(shape, -1.0, 1.0)[:, mask]
    if template is None:
        corners = _patch_corners(attributes["position"])
        row, col = corners[rng.integers(len(corners))]
        rows, cols = _patch_cells((row, col))
        patch = np.zeros((3, DETAIL_GRID, DETAIL_GRID), np.float32)
        patch[:, rows, cols] = rng.uniform(-1.0, 1.0, size=(3, PATCH_CELLS, PATCH_CELLS))
        pixels = _patch_pixels((row, col), image_size)
        image[:, pixels] = patch[:, cells][:, :, cells][:, pixels]
    return image


def add_frame(scene: np.ndarray, border: int) -> np.ndarray:
    """``scene`` inside an uncaptioned frame of ``FRAME_VALUE`` grey, ``border`` pixels wide."""
    if not border:
        return scene
    return np.pad(scene, ((0, 0), (border, border), (border, border)), constant_values=FRAME_VALUE)


def expected_scene(attributes: dict[str, str], image_size: int = 16) -> np.ndarray:
    """The mean of ``render_scene`` over detail seeds: everything the caption determines, nothing else.

    Texture: the mean of the two clipped tones; corner patch: its corner is uniform over the allowed
    corners and its colours have mean 0. A generation minus this is the detail it added; a training
    image minus this is the detail only memorization can reproduce (see ``memattn.testbed.measures``).
    """
    image = np.empty((3, image_size, image_size), np.float32)
    image[:] = _rgb(BACKGROUNDS[attributes["background"]])[:, None, None]
    mask = shape_mask(attributes["shape"], attributes["size"], attributes["position"], image_size)
    color = _rgb(COLORS[attributes["color"]])[:, None]
    tones = (np.clip(color + TEXTURE_TONE, -1.0, 1.0) + np.clip(color - TEXTURE_TONE, -1.0, 1.0)) / 2
    image[:, mask] = tones
    corners = _patch_corners(attributes["position"])
    for corner in corners:
        image[:, _patch_pixels(corner, image_size)] *= 1.0 - 1.0 / len(corners)
    return image


def _patch_corners(position: str) -> list[tuple[int, int]]:
    return [c for name, c in _CORNERS.items() if name != position]


def _patch_cells(corner: tuple[int, int]) -> tuple[slice, slice]:
    row, col = corner
    rows = slice(0, PATCH_CELLS) if row == 0 else slice(DETAIL_GRID - PATCH_CELLS, DETAIL_GRID)
    cols = slice(0, PATCH_CELLS) if col == 0 else slice(DETAIL_GRID - PATCH_CELLS, DETAIL_GRID)
    return rows, cols


def _patch_pixels(corner: tuple[int, int], image_size: int) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the patch in ``corner`` (row, col in {0, 1})."""
    cells = _pixel_grid(image_size)[2]
    rows, cols = _patch_cells(corner)
    in_patch = np.zeros((DETAIL_GRID, DETAIL_GRID), bool)
    in_patch[rows, cols] = True
    return in_patch[cells][:, cells]


@lru_cache(maxsize=64)
def _template_pattern_cached(template: Template) -> np.ndarray:
    pattern = _template_pattern(template)
    pattern.flags.writeable = False
    return pattern


# ---- vocabulary control -----------------------------------------------------------------------------


def bag_of_words_auc(
    positive: Sequence[str], negative: Sequence[str], seed: int = 0, folds: int = 5
) -> float:
    """Cross-validated ROC AUC of a bag-of-words logistic regression telling the two caption sets apart.

    Out-of-fold probabilities from stratified k-fold (the vectorizer is fitted inside each fold), pooled
    into one AUC. 0.5 means the words alone carry no information about the label.
    """
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    if min(len(positive), len(negative)) < folds:
        raise MemattnError(
            f"need at least {folds} captions on each side, got {len(positive)} and {len(negative)}"
        )
    texts = [*positive, *negative]
    labels = np.array([1] * len(positive) + [0] * len(negative))
    model = make_pipeline(
        CountVectorizer(token_pattern=r"[a-z]+"), LogisticRegression(max_iter=2000, class_weight="balanced")
    )
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(model, texts, labels, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(labels, scores))


def vocabulary_control_auc(dataset: TestbedDataset, seed: int = 0) -> float:
    """Can the caption text alone tell memorized (matching + template) from seen-once? Should be ~0.5."""
    groups = dataset.prompt_groups()
    memorized = [caption for name in MEMORIZED_GROUPS for caption in groups[name]]
    return bag_of_words_auc(memorized, groups["seen_once"], seed=seed)
