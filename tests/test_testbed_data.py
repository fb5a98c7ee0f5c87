"""The testbed dataset (memattn.testbed): deterministic, with the ground truth it claims.

Checks determinism, caption uniqueness, duplication counts, held-out groups, images, vocabulary
controls (memorized captions are not separable by their words), templates and the CLIP token budget.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import numpy as np
import pytest

from memattn.errors import MemattnError
from memattn.testbed import (
    COMMON_WORDS,
    EVAL_GROUPS,
    GROUPS,
    MEMORIZED_GROUPS,
    SHAPES,
    SIZES,
    TRAINING_GROUPS,
    TestbedConfig,
    bag_of_words_auc,
    build_dataset,
    caption_words,
    render_scene,
    shape_mask,
    vocabulary_control_auc,
)

VISUAL = ("background", "color", "shape", "size", "position")


@pytest.fixture(scope="module")
def dataset():
    return build_dataset(seed=0)


def _visual(item) -> tuple[str, ...]:
    return tuple(item.attributes[name] for name in VISUAL)


def test_same_seed_same_dataset_other_seed_other_dataset(dataset):
    again = build_dataset(seed=0)
    assert [i.caption for i in again.items] == [i.caption for i in dataset.items]
    assert again.prompt_groups() == dataset.prompt_groups()
    assert [(i.attributes, i.seed, i.duplication) for i in again.items] == [
        (i.attributes, i.seed, i.duplication) for i in dataset.items
    ]
    assert again.training_pairs() == dataset.training_pairs()
    sample = list(range(0, len(dataset.items), 37))
    np.testing.assert_array_equal(again.images(sample), dataset.images(sample))

    other = build_dataset(seed=1)
    assert len(other.items) == len(dataset.items)
    same_captions = sum(a.caption == b.caption for a, b in zip(other.items, dataset.items, strict=True))
    assert same_captions < len(dataset.items) // 20
    assert not np.array_equal(other.images(sample), dataset.images(sample))
    assert other.training_pairs() != dataset.training_pairs()


def test_group_sizes_and_summary(dataset):
    config = TestbedConfig()
    summary = dataset.summary()
    items, pairs = summary["items"], summary["training_pairs"]
    assert items == {name: len(dataset.group(name)) for name in GROUPS}
    assert items["memorized_matching"] == config.matching_items_per_count * len(config.matching_counts)
    assert items["memorized_template"] == config.n_templates * config.template_copies
    assert items["seen_once"] == config.seen_once
    assert pairs["memorized_matching"] == config.matching_items_per_count * sum(config.matching_counts)
    assert summary["total_training_pairs"] == len(dataset.training_pairs()) == sum(pairs.values())
    assert 6000 <= summary["total_training_pairs"] <= 12000
    assert [item.item_id for item in dataset.items] == list(range(len(dataset.items)))
    with pytest.raises(MemattnError, match="unknown group"):
        dataset.group("memorised")


def test_captions_unique_and_duplication_counts_exact(dataset):
    captions = [item.caption for item in dataset.items]
    assert len(set(captions)) == len(captions)

    pairs = dataset.training_pairs()
    seen = Counter(item_id for item_id, _ in pairs)
    caption_of = {item_id: caption for item_id, caption in pairs}
    for item in dataset.items:
        assert seen.get(item.item_id, 0) == item.duplication
        assert (item.kind == "train") == (item.group in TRAINING_GROUPS) == (item.duplication > 0)
        if item.duplication:
            assert caption_of[item.item_id] == item.caption
    # one caption per training item: the training set holds exactly as many captions as training items
    assert len({caption for _, caption in pairs}) == sum(len(dataset.group(g)) for g in TRAINING_GROUPS)

    matching = Counter(item.duplication for item in dataset.group("memorized_matching"))
    assert matching == {8: 16, 32: 16, 128: 16}
    for name in ("seen_once", "rare_word_seen_once", "memorized_template"):
        assert {item.duplication for item in dataset.group(name)} == {1}
    copies = Counter(item.template_id for item in dataset.group("memorized_template"))
    assert copies == dict.fromkeys(range(5), 64)
    # the training set is shuffled, not grouped by item
    assert [item_id for item_id, _ in pairs[:50]] != sorted(item_id for item_id, _ in pairs[:50])


def test_heldout_groups_absent_from_training(dataset):
    training_captions = {caption for _, caption in dataset.training_pairs()}
    groups = dataset.prompt_groups()
    for name in EVAL_GROUPS:
        assert groups[name]
        assert not training_captions & set(groups[name])

    withheld = set(dataset.withheld_pairs)
    assert len(withheld) == 6
    assert len({color for color, _ in withheld}) == len({shape for _, shape in withheld}) == 6
    trained = {(i.attributes["color"], i.attributes["shape"]) for i in dataset.items if i.duplication}
    assert not trained & withheld
    novel = {(i.attributes["color"], i.attributes["shape"]) for i in dataset.group("novel_composition")}
    assert novel == withheld  # every withheld pair is tested
    # the held-out colours and shapes are each still seen in training, only not together
    assert {c for c, _ in withheld} <= {c for c, _ in trained}
    assert {s for _, s in withheld} <= {s for _, s in trained}


def test_template_keys_are_reserved(dataset):
    keys = {(t.background, t.position): t.template_id for t in dataset.templates}
    assert len({bg for bg, _ in keys}) == len({pos for _, pos in keys}) == len(keys) == 5
    for item in dataset.items:
        key = (item.attributes["background"], item.attributes["position"])
        assert keys.get(key) == item.template_id, item


def _same_attribute_pair(dataset, group: str):
    by_attributes = defaultdict(list)
    for item in dataset.group(group):
        by_attributes[_visual(item)].append(item)
    return next(items[:2] for items in by_attributes.values() if len(items) > 1)


@pytest.mark.parametrize("size", [16, 32])
def test_images_shape_range_and_item_detail(dataset, size):
    sample = [dataset.items[i] for i in range(0, len(dataset.items), 11)]
    images = dataset.images(sample, image_size=size)
    assert images.shape == (len(sample), 3, size, size) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    np.testing.assert_array_equal(dataset.images(sample, image_size=size), images)
    # every item has its own image
    assert len({im.tobytes() for im in images}) == len(sample)

    first, second = _same_attribute_pair(dataset, "seen_once")
    a, b = dataset.image(first, size), dataset.image(second, size)
    assert not np.array_equal(a, b)
    # they differ in the shape texture and the corner patch, and nowhere else
    mask = shape_mask(first.attributes["shape"], first.attributes["size"], first.attributes["position"], size)
    differs = np.any(a != b, axis=0)
    assert differs[mask].any()
    corner = size * 3 // 16
    outside = ~mask
    for rows in (slice(0, corner), slice(size - corner, size)):
        for cols in (slice(0, corner), slice(size - corner, size)):
            outside[rows, cols] = False
    assert not differs[outside].any()
    # background pixels carry the background colour
    background = a[:, outside]
    assert np.allclose(background, background[:, :1])


def test_detail_is_seeded_and_shapes_are_drawn():
    attributes = dict(background="gray", color="red", shape="circle", size="large", position="center")
    np.testing.assert_array_equal(render_scene(attributes, 5), render_scene(attributes, 5))
    assert not np.array_equal(render_scene(attributes, 5), render_scene(attributes, 6))
    masks = {(shape, size): shape_mask(shape, size, "center", 16) for shape in SHAPES for size in SIZES}
    assert len({m.tobytes() for m in masks.values()}) == len(masks)  # every shape and size looks different
    for shape in SHAPES:
        assert masks[(shape, "small")].sum() < masks[(shape, "large")].sum()
    # 32 px shows the same detail as 16 px, at twice the resolution
    small, big = render_scene(attributes, 5, 16), render_scene(attributes, 5, 32)
    assert np.mean(big[:, ::2, ::2] == small) > 0.9


def test_rendering_is_fast(dataset):
    items = dataset.items[:1000]
    start = time.perf_counter()
    dataset.images(items)
    assert time.perf_counter() - start < 2.0  # measured ~0.1 s; thousands per second


def test_memorized_groups_use_common_words_and_rare_words_are_rare(dataset):
    groups = dataset.prompt_groups()
    for name in GROUPS:
        if name != "rare_word_seen_once":
            for caption in groups[name]:
                assert set(caption_words(caption)) <= COMMON_WORDS, caption
    other_words = {
        w for name in GROUPS if name != "rare_word_seen_once" for c in groups[name] for w in caption_words(c)
    }
    rare_words = set()
    for item in dataset.group("rare_word_seen_once"):
        words = set(caption_words(item.caption))
        assert words - other_words == {item.attributes["rare_word"]}, item.caption
        rare_words.add(item.attributes["rare_word"])
    assert len(rare_words) == len(dataset.group("rare_word_seen_once"))


def test_vocabulary_control_is_near_chance_and_detects_a_confound(dataset):
    auc = vocabulary_control_auc(dataset, seed=0)
    print(f"vocabulary-control AUC (memorized vs seen_once, bag of words): {auc:.3f}")
    assert 0.35 < auc < 0.65

    groups = dataset.prompt_groups()
    memorized = [caption for name in MEMORIZED_GROUPS for caption in groups[name]]
    confounded = [caption + " vintage" for caption in memorized]
    confound_auc = bag_of_words_auc(confounded, groups["seen_once"], seed=0)
    print(f"same classifier with a confound word appended to memorized captions: {confound_auc:.3f}")
    assert confound_auc > 0.9


def test_template_copies_share_the_pattern_and_vary_the_shape(dataset):
    patterns = []
    for template in dataset.templates:
        copies = [
            item for item in dataset.group("memorized_template") if item.template_id == template.template_id
        ]
        assert {(i.attributes["background"], i.attributes["position"]) for i in copies} == {
            (template.background, template.position)
        }
        assert len({i.caption for i in copies}) == len(copies)
        assert (
            len({(i.attributes["color"], i.attributes["shape"], i.attributes["size"]) for i in copies}) > 20
        )
        for size in (16, 32):
            variable = np.zeros((size, size), bool)
            for shape in SHAPES:
                for shape_size in SIZES:
                    variable |= shape_mask(shape, shape_size, template.position, size)
            images = dataset.images(copies, image_size=size)
            fixed = images[:, :, ~variable]
            assert np.array_equal(
                fixed, np.broadcast_to(fixed[:1], fixed.shape)
            )  # same pattern in every copy
            inside = images[:, :, variable].reshape(len(copies), -1)
            assert len({row.tobytes() for row in inside}) == len(copies)  # the variable region changes
        # the fixed region is textured (not a flat background) and differs between templates
        assert np.unique(fixed[0].round(3), axis=1).shape[1] > 4
        patterns.append((dataset.image(copies[0], 32), ~variable))
    for k, (a, fixed_a) in enumerate(patterns):
        for b, fixed_b in patterns[k + 1 :]:
            both = fixed_a & fixed_b
            assert not np.allclose(a[:, both], b[:, both], atol=0.05)


def test_clip_tokenizer_fits_every_caption(dataset):
    from memattn.testing import clip_tokenizer

    tokenizer = clip_tokenizer()
    captions = [item.caption for item in dataset.items]
    lengths = [len(ids) for ids in tokenizer(captions, truncation=False)["input_ids"]]
    assert max(lengths) <= 77
    assert min(lengths) > 8


def test_config_errors_are_clear():
    with pytest.raises(MemattnError, match="caption space"):
        build_dataset(config=TestbedConfig(seen_once=100_000))
    with pytest.raises(MemattnError, match="template"):
        build_dataset(config=TestbedConfig(template_copies=5_000))
    with pytest.raises(MemattnError, match="n_templates"):
        TestbedConfig(n_templates=6)
    with pytest.raises(MemattnError, match="withheld_pairs"):
        TestbedConfig(withheld_pairs=0)
    with pytest.raises(MemattnError, match="matching_counts"):
        TestbedConfig(matching_counts=(1, 8))
    with pytest.raises(MemattnError, match="seed"):
        build_dataset(seed=-1)


def test_small_config_builds_and_sizes_follow_it():
    config = TestbedConfig(
        image_size=32,
        matching_counts=(4,),
        matching_items_per_count=3,
        n_templates=2,
        template_copies=5,
        seen_once=40,
        rare_word_seen_once=4,
        never_seen=6,
        novel_composition=7,
        withheld_pairs=2,
    )
    data = build_dataset(seed=3, config=config)
    assert data.summary()["items"] == {
        "memorized_matching": 3,
        "memorized_template": 10,
        "seen_once": 40,
        "rare_word_seen_once": 4,
        "never_seen": 6,
        "novel_composition": 7,
    }
    assert data.summary()["total_training_pairs"] == 3 * 4 + 10 + 40 + 4
    assert data.image(0).shape == (3, 32, 32)
