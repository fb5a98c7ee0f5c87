"""Testbed v2 data and text encoders: one captioned object on a random background, EOS-copy, CLIP loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memattn.errors import MemattnError
from memattn.testbed.model import (
    ModelConfig,
    TestbedCLIPTextModel,
    build_text_encoder,
    build_tokenizer_files,
    load_tokenizer,
    tokenize,
)
from memattn.testbed.objects import (
    ATTRIBUTE_VALUES,
    BACKGROUND_RANGE,
    OBJECT_COLORS,
    OBJECT_TAGS,
    OBJECT_WORDS,
    ObjectsConfig,
    build_objects_dataset,
    caption_words,
    object_mask,
    object_pixel_share,
    vocabulary_control_auc,
)
from memattn.testbed.text_pretrain import pretrain_text_encoder, summary_state_similarity

SMALL = ObjectsConfig(matching_items_per_count=4, seen_once=300, rare_word_seen_once=20, never_seen=20)


@pytest.fixture(scope="module")
def dataset():
    return build_objects_dataset(0, SMALL)


@pytest.fixture(scope="module")
def tokenizer(dataset, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    return load_tokenizer(build_tokenizer_files([item.caption for item in dataset.items], directory))


def test_groups_sizes_and_determinism(dataset):
    summary = dataset.summary()
    assert summary["items"] == {
        "memorized_matching": 4,
        "seen_once": 300,
        "rare_word_seen_once": 20,
        "never_seen": 20,
    }
    assert summary["training_pairs"]["memorized_matching"] == 4 * 128
    again = build_objects_dataset(0, SMALL)
    assert [i.caption for i in again.items] == [i.caption for i in dataset.items]
    assert np.array_equal(again.images(again.items[:10]), dataset.images(dataset.items[:10]))
    assert [i.caption for i in build_objects_dataset(1, SMALL).items] != [i.caption for i in dataset.items]
    assert len({item.caption for item in dataset.items}) == len(dataset.items)


def test_memorized_objects_are_reserved(dataset):
    def key(item):
        return tuple(item.attributes[name] for name in ATTRIBUTE_VALUES)

    memorized = {key(item) for item in dataset.group("memorized_matching")}
    others = [item for item in dataset.items if item.group != "memorized_matching"]
    assert memorized and not memorized & {key(item) for item in others}


def test_images_are_object_on_random_background(dataset):
    items = dataset.group("seen_once")[:50]
    images = dataset.images(items)
    assert images.shape == (50, 3, 16, 16) and images.dtype == np.float32
    for item, image in zip(items, images, strict=True):
        a = item.attributes
        mask = object_mask(a["shape"], a["size"], a["position"], 16)
        assert np.allclose(image[:, mask], np.asarray(OBJECT_COLORS[a["color"]])[:, None])
        assert np.abs(image[:, ~mask]).max() <= BACKGROUND_RANGE + 1e-6
    # Backgrounds differ from item to item (the caption does not determine them) ...
    outside = images.reshape(50, -1)
    correlation = np.corrcoef(outside)[~np.eye(50, dtype=bool)]
    assert np.median(np.abs(correlation)) < 0.5
    # ... and the same item always renders the same background: a memorized item is a fixed image.
    item = dataset.group("memorized_matching")[0]
    assert np.array_equal(dataset.image(item), dataset.image(item))


def test_object_covers_a_small_part_of_the_image():
    share = object_pixel_share(16)
    assert 0.04 <= share["min"] and share["max"] <= 0.21


def test_rare_words_are_rare_and_vocabulary_does_not_reveal_memorization():
    dataset = build_objects_dataset(0)
    for item in dataset.group("rare_word_seen_once"):
        assert item.attributes["rare_word"] not in OBJECT_WORDS
        assert item.attributes["rare_word"] in caption_words(item.caption)
    for item in dataset.group("seen_once")[:200]:
        assert set(caption_words(item.caption)) <= OBJECT_WORDS
    assert 0.2 < vocabulary_control_auc(dataset) < 0.8  # 16 memorized captions: chance within noise


def test_config_is_validated():
    with pytest.raises(MemattnError, match="must not be negative"):
        ObjectsConfig(seen_once=-1)
    with pytest.raises(MemattnError, match="matching_counts"):
        ObjectsConfig(matching_counts=(1,))
    with pytest.raises(MemattnError, match="caption space"):
        build_objects_dataset(0, ObjectsConfig(seen_once=30_000))


def test_eos_copy_encoder_copies_the_eos_state_and_round_trips(tokenizer, tmp_path):
    torch.manual_seed(0)
    plain = build_text_encoder(ModelConfig(), tokenizer)
    copied = build_text_encoder(ModelConfig(), tokenizer, eos_copy=True)
    copied.load_state_dict(plain.state_dict())
    ids = tokenize(tokenizer, ["a red circle", "a small red circle in the top left, photo"])
    with torch.no_grad():
        before, after = plain(ids)[0], copied(ids)[0]
    for row in range(2):
        eos = int((ids[row] == tokenizer.eos_token_id).int().argmax())
        assert torch.equal(after[row, : eos + 1], before[row, : eos + 1])  # prompt and EOS untouched
        assert torch.equal(after[row, eos + 1 :], before[row, eos].expand(77 - eos - 1, -1))
        assert not torch.equal(before[row, eos + 1], before[row, eos])  # the plain encoder differs there
    copied.save_pretrained(tmp_path / "te")
    loaded = TestbedCLIPTextModel.from_pretrained(tmp_path / "te")
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], after)


def test_contrastive_pretraining_is_seeded_and_freezes_the_encoder(dataset, tokenizer):
    def run(pool: str):
        torch.manual_seed(0)
        encoder = build_text_encoder(ModelConfig(), tokenizer)
        log = pretrain_text_encoder(
            encoder, tokenizer, dataset, steps=3, seed=0, batch_size=32, pool=pool, progress=False
        )
        return encoder, log

    first, log = run("eos")
    second, _ = run("eos")
    summary, _ = run("summary")
    state = first.state_dict()
    assert all(torch.equal(state[k], v) for k, v in second.state_dict().items())
    assert not all(torch.equal(state[k], v) for k, v in summary.state_dict().items())
    assert np.isfinite(log.final_loss) and 0 <= log.retrieval_accuracy <= 1
    assert not first.training and all(not p.requires_grad for p in first.parameters())
    captions = [item.caption for item in dataset.group("seen_once")[:16]]
    cosine = summary_state_similarity(first, tokenizer, captions)
    assert set(cosine) == {"eos", "padding_10"} and all(-1 <= v <= 1 for v in cosine.values())


def test_own_image_matcher_tells_own_copies_leakage_and_new_images(dataset):
    from memattn.testbed.measures import OBJECT_COPY_THRESHOLD, OwnImageMatcher

    train = [item for item in dataset.items if item.duplication > 0]
    memorized = list(dataset.group("memorized_matching"))
    matcher = OwnImageMatcher(dataset, train, memorized)
    seen, never = dataset.group("seen_once")[0], dataset.group("never_seen")[0]
    fresh, _ = dataset.random_scenes(40, np.random.default_rng(3))
    images = np.concatenate([dataset.images([memorized[0], seen, memorized[1]]), fresh])
    ids = [memorized[0].item_id, seen.item_id, never.item_id] + [seen.item_id] * 40
    match = matcher.match(images, ids)
    row = {item.item_id: i for i, item in enumerate(train)}
    assert match.similarity[0] == pytest.approx(1.0) and match.index[0] == row[memorized[0].item_id]
    assert match.similarity[1] == pytest.approx(1.0) and match.index[1] == row[seen.item_id]
    # a never-seen prompt that reproduces a memorized image: leakage, pointing at that item
    assert match.similarity[2] == pytest.approx(1.0) and match.index[2] == row[memorized[1].item_id]
    # fresh renders are neither the prompt's own image nor a memorized one
    assert (match.similarity[3:] < OBJECT_COPY_THRESHOLD).mean() >= 0.95


def test_caption_tags_widen_the_caption_space_and_one_tag_is_the_old_space():
    """``caption_tags``: web-caption endings that say nothing about the image (a one-pass training set
    needs ~190k unique captions; without tags the space holds 20,160). One tag keeps the old captions."""
    assert ObjectsConfig().caption_tags == 1 and OBJECT_TAGS[0] == ""
    wide = build_objects_dataset(
        0, ObjectsConfig(seen_once=25_000, rare_word_seen_once=0, never_seen=0, caption_tags=len(OBJECT_TAGS))
    )
    captions = [item.caption for item in wide.items]
    assert len(set(captions)) == len(captions) == 25_016
    assert {tag for tag in OBJECT_TAGS[1:] if any(c.endswith(tag) for c in captions)} == set(OBJECT_TAGS[1:])
    assert all(w in OBJECT_WORDS for c in captions[:500] for w in caption_words(c))
    with pytest.raises(MemattnError, match="unique captions"):
        build_objects_dataset(0, ObjectsConfig(seen_once=25_000))
    with pytest.raises(MemattnError, match="caption_tags"):
        ObjectsConfig(caption_tags=0)
    drawn = wide.random_captions([wide.items[0].attributes] * 200, np.random.default_rng(0))
    assert any(c.endswith(OBJECT_TAGS[3]) for c in drawn)  # pre-training sees the tagged captions too
