"""Copy measure (detail similarity), alignment classifier and the uncaptioned frame option."""

from __future__ import annotations

import numpy as np
import pytest

from memattn.errors import MemattnError
from memattn.testbed.alignment import (
    ATTRIBUTES,
    alignment,
    load_classifier,
    save_classifier,
    train_classifier,
)
from memattn.testbed.data import FRAME_VALUE, TestbedConfig, build_dataset, expected_scene, render_scene
from memattn.testbed.measures import DetailMatcher, high_pass, nearest_training_image
from memattn.testbed.model import ModelConfig
from memattn.testbed.train import TrainConfig

SMALL = TestbedConfig(
    matching_counts=(4,),
    matching_items_per_count=8,
    n_templates=2,
    template_copies=16,
    seen_once=300,
    rare_word_seen_once=10,
    never_seen=40,
    novel_composition=20,
)


@pytest.fixture(scope="module")
def dataset():
    return build_dataset(0, SMALL)


@pytest.fixture(scope="module")
def matcher(dataset):
    return DetailMatcher.for_items(dataset, [item for item in dataset.items if item.duplication > 0])


def _rerender(dataset, items, seed_offset: int, keep_template: bool = True) -> np.ndarray:
    return np.stack(
        [
            render_scene(
                item.attributes,
                item.seed + seed_offset,
                dataset.config.image_size,
                dataset.templates[item.template_id]
                if keep_template and item.template_id is not None
                else None,
            )
            for item in items
        ]
    )


def test_expected_scene_is_the_mean_over_detail_seeds(dataset):
    for item in dataset.group("seen_once")[:3]:
        mean = np.mean([render_scene(item.attributes, seed, 16) for seed in range(3000)], axis=0)
        assert np.abs(mean - expected_scene(item.attributes, 16)).max() < 0.05
    assert np.array_equal(
        dataset.images(dataset.items[:2], detail=False)[0], expected_scene(dataset.items[0].attributes)
    )


def test_high_pass_removes_flat_colour():
    flat = np.full((2, 3, 8, 8), 0.7)
    assert np.abs(high_pass(flat)).max() < 1e-12


def test_detail_similarity_separates_copies_from_faithful_new_images(dataset, matcher):
    train_items = [item for item in dataset.items if item.duplication > 0]
    copies = matcher.match(dataset.images(train_items[:40]))
    assert np.allclose(copies.similarity, 1.0) and (copies.index == np.arange(40)).all()
    # Same caption, other detail: what a model that generalizes draws. Never a copy.
    ordinary = list(dataset.group("seen_once")[:100])
    faithful = matcher.match(_rerender(dataset, ordinary, 12345))
    assert faithful.similarity.max() < 0.5 and np.median(faithful.similarity) < 0.35
    # A template's pattern is memorized content: another shape on it is a (template) copy.
    template_items = list(dataset.group("memorized_template")[:20])
    template = matcher.match(_rerender(dataset, template_items, 999))
    assert np.median(template.similarity) > 0.7
    assert matcher.match(_rerender(dataset, template_items, 999, keep_template=False)).similarity.max() < 0.5
    # Whole-image pixel correlation cannot tell the faithful images from copies (why detail is used).
    train = dataset.images(train_items)
    assert np.median(nearest_training_image(_rerender(dataset, ordinary, 12345), train).similarity) > 0.7


def test_detail_similarity_degrades_gracefully_with_noise(dataset, matcher):
    items = [item for item in dataset.items if item.duplication > 0][:30]
    noisy = dataset.images(items) + np.random.default_rng(0).normal(0, 0.1, (30, 3, 16, 16))
    assert np.median(matcher.match(noisy).similarity) > 0.8


@pytest.fixture(scope="module")
def classifier(dataset):
    return train_classifier(dataset, steps=300, pool=4000, progress=False)


def test_classifier_reads_attributes_and_is_not_fooled_by_shuffled_labels(dataset, classifier):
    model, held_out = classifier
    assert held_out > 0.85
    items = list(dataset.group("never_seen"))
    images = _rerender(dataset, items, 4242)
    right = alignment(model, images, [item.attributes for item in items])
    assert right.accuracy.mean() > 0.95
    shuffled = [items[(i + 1) % len(items)].attributes for i in range(len(items))]
    wrong = alignment(model, images, shuffled)
    assert wrong.accuracy.mean() < 0.6  # chance is about 1/5 to 1/2 per attribute
    assert right.correct.shape == (len(items), len(ATTRIBUTES))


def test_classifier_save_load_and_errors(dataset, classifier, tmp_path):
    model, accuracy = classifier
    path = save_classifier(model, accuracy, tmp_path / "clf.safetensors")
    loaded, loaded_accuracy = load_classifier(path)
    images = dataset.images(dataset.items[:8])
    assert loaded_accuracy == pytest.approx(accuracy, abs=1e-4)
    assert loaded.predict(images) == model.predict(images)
    with pytest.raises(MemattnError, match="reads \\(N, 3, 16, 16\\)"):
        loaded.predict(np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(MemattnError, match="no attribute classifier"):
        load_classifier(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MemattnError, match="corrupt"):
        load_classifier(tmp_path / "bad.safetensors")
    with pytest.raises(MemattnError, match="2 images but 1"):
        alignment(model, images[:2], [dataset.items[0].attributes])


def test_frame_option_adds_an_uncaptioned_border():
    framed = build_dataset(0, TestbedConfig(**{**SMALL.__dict__, "border": 3}))
    plain = build_dataset(0, SMALL)
    image = framed.image(framed.items[0])
    assert image.shape == (3, 22, 22) and framed.config.canvas_size == 22
    assert np.array_equal(image[:, 3:-3, 3:-3], plain.image(plain.items[0]))
    assert (image[:, :3] == FRAME_VALUE).all() and (image[:, :, -3:] == FRAME_VALUE).all()
    assert framed.images(framed.items[:2], detail=False).shape == (2, 3, 22, 22)
    with pytest.raises(MemattnError, match="must not be negative: border"):
        TestbedConfig(border=-1)
    with pytest.raises(MemattnError, match="must equal the rendered image size"):
        TrainConfig(data=TestbedConfig(border=4))
    assert TrainConfig(data=TestbedConfig(border=4), model=ModelConfig(image_size=24)).data.canvas_size == 24
