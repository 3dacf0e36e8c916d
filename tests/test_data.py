"""Tests of the training data layer (`msvit.train.data`): IDX parsing, Fashion-MNIST, translated canvases, splits,
imagefolder / Hub-style loading and transforms. The real-data tests need the Debian package `dataset-fashion-mnist`."""

import gzip
import struct

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from transformers import ViTImageProcessorPil

from modeling_msvit.mixed_scale_tokens import build_scale_tree
from msvit.train.data import (
    CANVAS_SIZES,
    CLEAN_CANVASES,
    CLUTTER_FRAGMENT_SIZE,
    CLUTTER_FRAGMENTS,
    CLUTTER_SEEDS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    PLACEMENT_SEEDS,
    SPARSE_ITEM_SCALE,
    SPARSE_SEEDS,
    TEST_BACKGROUNDS,
    TEXTURE_SEEDS,
    TRAIN_BACKGROUNDS,
    FashionMNISTNotFoundError,
    add_clutter,
    add_texture_background,
    background_photos,
    class_names,
    collate_fn,
    image_column_of,
    load_classification_splits,
    load_fashion_mnist,
    load_fashion_mnist_arrays,
    make_transforms,
    read_idx,
    subsample,
    train_validation_split,
    translate_to_canvas,
)
from msvit.train.evaluation import processed_pixel_values
from msvit.train.gate_training import content_regions, translated_item_regions
from tests.conftest import tiny_config


REAL_DATA_PRESENT = all((FASHION_MNIST_DIR / name).is_file() for pair in FASHION_MNIST_FILES.values() for name in pair)
requires_real_data = pytest.mark.skipif(
    not REAL_DATA_PRESENT,
    reason=f"Fashion-MNIST IDX files absent from {FASHION_MNIST_DIR}: `sudo apt-get install dataset-fashion-mnist`",
)
NUM_TINY = {"train": 600, "test": 200}


def write_idx(path, array: np.ndarray, magic: int | None = None) -> None:
    """Write a gzip IDX file of unsigned bytes: magic `0x00000800 + ndim`, then the dimensions, then the data."""
    magic = 0x0800 + array.ndim if magic is None else magic
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def tiny_images(num: int, offset: int = 0) -> np.ndarray:
    """`(num, 28, 28)` uint8 items with known pixels: a bright block whose value encodes the item, on black."""
    images = np.zeros((num, 28, 28), dtype=np.uint8)
    for index in range(num):
        images[index, 4:24, 6:22] = 1 + (index + offset) % 255
        images[index, 0, 0] = 7  # a corner pixel, so the whole 28x28 item must be pasted
    return images


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A folder with the four Fashion-MNIST IDX files, tiny: 600 train and 200 test items, labels `index % 10`."""
    folder = tmp_path_factory.mktemp("tiny_fashion_mnist")
    for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        num = NUM_TINY[split]
        write_idx(folder / images_name, tiny_images(num, offset=0 if split == "train" else 100))
        write_idx(folder / labels_name, np.arange(num) % 10)
    return folder


@pytest.fixture(scope="module")
def processor():
    return ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=0.5, image_std=0.5)


# ----------------------------------------------------------------------------------------------------------------
# IDX parsing


def test_read_idx_known_values(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "images.gz", images)
    write_idx(tmp_path / "labels.gz", np.array([3, 1]))
    parsed = read_idx(tmp_path / "images.gz", expected_magic=IDX_IMAGES_MAGIC)
    assert parsed.shape == (2, 3, 4) and parsed.dtype == np.uint8
    np.testing.assert_array_equal(parsed, images)
    assert parsed[1, 2, 3] == 23
    assert read_idx(tmp_path / "labels.gz", expected_magic=IDX_LABELS_MAGIC).tolist() == [3, 1]
    # uncompressed files are read too
    (tmp_path / "raw").write_bytes(gzip.decompress((tmp_path / "labels.gz").read_bytes()))
    assert read_idx(tmp_path / "raw").tolist() == [3, 1]


def test_read_idx_rejects_bad_files(tmp_path):
    write_idx(tmp_path / "labels.gz", np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="expected 0x00000803"):
        read_idx(tmp_path / "labels.gz", expected_magic=IDX_IMAGES_MAGIC)
    write_idx(tmp_path / "bad_magic.gz", np.array([1, 2, 3]), magic=0x12340801)
    with pytest.raises(ValueError, match="bad magic number 0x12340801"):
        read_idx(tmp_path / "bad_magic.gz")
    with gzip.open(tmp_path / "truncated.gz", "wb") as file:
        file.write(struct.pack(">IIII", IDX_IMAGES_MAGIC, 2, 28, 28) + bytes(100))
    with pytest.raises(ValueError, match="holds 100 bytes"):
        read_idx(tmp_path / "truncated.gz")


def test_load_fashion_mnist_tiny(tiny_dir):
    dataset = load_fashion_mnist("train", data_dir=tiny_dir)
    assert len(dataset) == NUM_TINY["train"] and dataset.column_names == ["image", "label"]
    assert isinstance(dataset.features["label"], datasets.ClassLabel)
    assert dataset.features["label"].names == list(FASHION_MNIST_CLASSES)
    assert dataset.features["label"].names[9] == "Ankle boot" and dataset.features["label"].names[0] == "T-shirt/top"
    expected = tiny_images(NUM_TINY["train"])
    for index in (0, 1, 599):
        row = dataset[index]
        assert row["image"].mode == "L" and row["image"].size == (28, 28)
        np.testing.assert_array_equal(np.asarray(row["image"]), expected[index])
        assert row["label"] == index % 10
    assert len(load_fashion_mnist("test", data_dir=tiny_dir)) == NUM_TINY["test"]


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FashionMNISTNotFoundError) as error:
        load_fashion_mnist("train", data_dir=tmp_path)
    assert isinstance(error.value, FileNotFoundError)
    message = str(error.value)
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "--dataset zalando-datasets/fashion_mnist" in message
    with pytest.raises(FashionMNISTNotFoundError):
        load_classification_splits("translated_fashion_mnist", data_dir=tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist("validation", data_dir=tmp_path)


def test_mismatched_counts_are_rejected(tmp_path):
    images_name, labels_name = FASHION_MNIST_FILES["test"]
    write_idx(tmp_path / images_name, tiny_images(5))
    write_idx(tmp_path / labels_name, np.arange(4))
    with pytest.raises(ValueError, match="5 images but .* 4 labels"):
        load_fashion_mnist_arrays("test", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Real Fashion-MNIST (Debian package)


@pytest.fixture(scope="module")
def real_train():
    return load_fashion_mnist("train")


@requires_real_data
def test_real_fashion_mnist(real_train):
    test = load_fashion_mnist("test")
    assert len(real_train) == 60000 and len(test) == 10000
    train_labels = real_train.with_format("arrow")[:]["label"].to_numpy()
    assert np.bincount(train_labels, minlength=10).tolist() == [6000] * 10
    assert train_labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert test[:10]["label"] == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    first = np.asarray(real_train[0]["image"])
    assert real_train[0]["image"].mode == "L" and first.shape == (28, 28)
    assert int(first.astype(np.int64).sum()) == 76247
    assert first[20, 10:18].tolist() == [197, 206, 198, 213, 240, 195, 227, 245]


@requires_real_data
def test_real_translated_splits():
    splits = load_classification_splits("translated_fashion_mnist")
    assert {name: len(split) for name, split in splits.items()} == {"train": 55000, "validation": 5000, "test": 10000}
    assert class_names(splits) == list(FASHION_MNIST_CLASSES)
    validation_labels = splits["validation"].with_format("arrow")[:]["label"].to_numpy()
    assert np.bincount(validation_labels, minlength=10).tolist() == [500] * 10  # stratified
    test = splits["test"]
    image = test[0]["image"]
    assert image.mode == "L" and image.size == (64, 64)
    placements = test.select_columns(["top", "left"]).with_format("numpy")[:]
    assert placements["top"].min() == 0 and placements["top"].max() == 36
    assert placements["left"].min() == 0 and placements["left"].max() == 36
    # the test canvases are those of the fixed test placement seed, independent of the validation carve
    expected = translate_to_canvas(load_fashion_mnist("test"), seed=PLACEMENT_SEEDS["test"])
    expected = expected.select_columns(["top", "left"]).with_format("numpy")[:]
    np.testing.assert_array_equal(placements["top"], expected["top"])
    np.testing.assert_array_equal(placements["left"], expected["left"])
    canvas, item = np.asarray(image), np.asarray(load_fashion_mnist("test")[0]["image"])
    top, left = int(placements["top"][0]), int(placements["left"][0])
    np.testing.assert_array_equal(canvas[top : top + 28, left : left + 28], item)


# ----------------------------------------------------------------------------------------------------------------
# Translated canvases


def test_translate_pastes_item_exactly(tiny_dir):
    base = load_fashion_mnist("train", data_dir=tiny_dir)
    translated = translate_to_canvas(base, canvas_size=64, seed=5)
    assert translated.column_names == ["image", "label", "top", "left"]
    assert translated.features["label"] == base.features["label"]
    items = tiny_images(len(base))
    rows = translated.select_columns(["label", "top", "left"]).with_format("numpy")[:]
    assert rows["label"].tolist() == base["label"]
    for index in range(0, len(base), 37):
        canvas = np.asarray(translated[index]["image"]).copy()
        assert canvas.shape == (64, 64) and translated[index]["image"].mode == "L"
        top, left = int(rows["top"][index]), int(rows["left"][index])
        np.testing.assert_array_equal(canvas[top : top + 28, left : left + 28], items[index])
        canvas[top : top + 28, left : left + 28] = 0
        assert not canvas.any()
    # uniform over every position where the item fits: 0..36 on a 64 px canvas
    assert set(rows["top"].tolist()) == set(range(37)) and set(rows["left"].tolist()) == set(range(37))


def test_translate_is_deterministic(tiny_dir):
    base = load_fashion_mnist("test", data_dir=tiny_dir)
    first, again = translate_to_canvas(base, seed=3), translate_to_canvas(base, seed=3)
    other = translate_to_canvas(base, seed=4)
    stored = datasets.Image(decode=False)
    first_bytes = [row["bytes"] for row in first.cast_column("image", stored)["image"]]
    assert first_bytes == [row["bytes"] for row in again.cast_column("image", stored)["image"]]
    assert first["top"] == again["top"] and first["left"] == again["left"]
    assert first["top"] != other["top"] and first["left"] != other["left"]


def test_translate_rgb_and_too_large_items():
    images = [PIL.Image.new("RGB", (5, 4), (10, 20, 30)), PIL.Image.new("RGBA", (3, 3), (1, 2, 3, 255))]
    dataset = datasets.Dataset.from_dict({"image": images, "label": [0, 1]}, features=None)
    translated = translate_to_canvas(dataset, canvas_size=8, seed=0)
    canvas = np.asarray(translated[0]["image"])
    assert translated[0]["image"].mode == "RGB" and canvas.shape == (8, 8, 3)
    top, left = translated[0]["top"], translated[0]["left"]
    assert 0 <= top <= 4 and 0 <= left <= 3
    assert (canvas[top : top + 4, left : left + 5] == [10, 20, 30]).all() and canvas.sum() == 4 * 5 * 60
    with pytest.raises(ValueError, match="do not fit"):
        translate_to_canvas(dataset, canvas_size=4)


def test_translated_splits_use_fixed_placement_seeds(tiny_dir):
    assert len(set(PLACEMENT_SEEDS.values())) == 3
    splits = load_classification_splits("translated_fashion_mnist", data_dir=tiny_dir, validation_size=100)
    assert {name: len(split) for name, split in splits.items()} == {"train": 500, "validation": 100, "test": 200}
    assert splits["train"][0]["image"].size == (64, 64)
    test_base = load_fashion_mnist("test", data_dir=tiny_dir)
    expected = translate_to_canvas(test_base, seed=PLACEMENT_SEEDS["test"])
    assert splits["test"]["top"] == expected["top"] and splits["test"]["left"] == expected["left"]
    # a different split seed gives different placements on the same items
    as_train = translate_to_canvas(test_base, seed=PLACEMENT_SEEDS["train"])
    assert as_train["top"] != expected["top"]
    # the test set does not depend on the validation carve, and a subset keeps its rows' canvases
    reseeded = load_classification_splits(
        "translated_fashion_mnist", data_dir=tiny_dir, validation_size=50, seed=1, max_eval_samples=20
    )
    stored = datasets.Image(decode=False)
    full_canvases = {row["bytes"] for row in splits["test"].cast_column("image", stored)["image"]}
    subset_canvases = [row["bytes"] for row in reseeded["test"].cast_column("image", stored)["image"]]
    assert len(subset_canvases) == 20 and all(canvas in full_canvases for canvas in subset_canvases)


def canvases_of(dataset: datasets.Dataset) -> np.ndarray:
    return np.stack([np.asarray(image) for image in dataset["image"]])


def test_clutter_adds_fragments_of_other_items_and_keeps_the_item(tiny_dir):
    translated = translate_to_canvas(load_fashion_mnist("test", data_dir=tiny_dir), seed=2)
    cluttered = add_clutter(translated, seed=7)
    assert cluttered.column_names == translated.column_names
    assert cluttered["top"] == translated["top"] and cluttered["label"] == translated["label"]
    clean, noisy = canvases_of(translated), canvases_of(cluttered)
    assert (noisy >= clean).all()  # pasted with a maximum: the item is never darkened
    block_values = 1 + (np.arange(len(clean)) + 100) % 255  # tiny_images(offset=100): item i's block value
    for index in range(0, len(clean), 13):
        added = noisy[index][noisy[index] != clean[index]]
        fragments = set(added.tolist())
        # every added pixel comes from another item's block, at most one item per fragment
        assert 0 < len(fragments) <= CLUTTER_FRAGMENTS
        assert fragments <= set(block_values.tolist()) - {int(block_values[index])}
        assert len(added) <= CLUTTER_FRAGMENTS * CLUTTER_FRAGMENT_SIZE**2
    again = add_clutter(translated, seed=7)
    np.testing.assert_array_equal(canvases_of(again), noisy)
    assert not np.array_equal(canvases_of(add_clutter(translated, seed=8)), noisy)
    with pytest.raises(ValueError, match="at least 2 images"):
        add_clutter(translated.select([0]), seed=0)


def test_cluttered_splits_are_the_translated_canvases_with_seeded_clutter(tiny_dir):
    assert len(set(CLUTTER_SEEDS.values())) == 3
    clean = load_classification_splits("translated_fashion_mnist", data_dir=tiny_dir, validation_size=100)
    cluttered = load_classification_splits(
        "cluttered_translated_fashion_mnist", data_dir=tiny_dir, validation_size=100
    )
    for split in ("train", "validation", "test"):
        assert cluttered[split]["top"] == clean[split]["top"]
        expected = add_clutter(clean[split], seed=CLUTTER_SEEDS[split])
        np.testing.assert_array_equal(canvases_of(cluttered[split]), canvases_of(expected))


def gradient_photo(height: int, width: int) -> np.ndarray:
    """A grey photo whose value is its column index, scaled to [0, 1]: a crop's value tells where it was cut."""
    return np.broadcast_to(np.linspace(0.0, 1.0, width), (height, width)).copy()


def test_texture_background_keeps_the_item_and_fills_the_rest_from_a_photo_crop(tiny_dir):
    translated = translate_to_canvas(load_fashion_mnist("test", data_dir=tiny_dir), seed=2)
    photos = [gradient_photo(200, 300), np.zeros((100, 100))]
    photos[1][50:, :] = 1.0  # top half black, bottom half white
    textured = add_texture_background(translated, seed=5, photos=photos, contrast=0.6)
    assert textured.column_names == [*translated.column_names, "background"]
    assert textured["top"] == translated["top"] and textured["label"] == translated["label"]
    clean, canvases = canvases_of(translated), canvases_of(textured)
    item = clean > 0
    np.testing.assert_array_equal(canvases[item], clean[item])  # item pixels replace the background exactly
    background = canvases[~item]
    assert background.max() <= round(0.6 * 255) and background.min() >= 0
    # the backgrounds are photo crops: varied across canvases, smooth along each row of the gradient photo
    assert len({canvas[~item[index]].mean().round(1) for index, canvas in enumerate(canvases)}) > 50
    np.testing.assert_array_equal(canvases_of(add_texture_background(translated, 5, photos, 0.6)), canvases)
    assert not np.array_equal(canvases_of(add_texture_background(translated, 6, photos, 0.6)), canvases)
    with pytest.raises(ValueError, match="background_contrast must lie in"):
        add_texture_background(translated, 5, photos, contrast=0.0)
    with pytest.raises(ValueError, match="at least one background photo"):
        add_texture_background(translated, 5, [], contrast=1.0)


def test_texture_background_crops_at_least_a_quarter_of_the_photo():
    # one item-free canvas on a photo of 4 vertical bars: a crop of a quarter of the side or more always spans
    # several photo values, a tiny crop would be flat
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    blank = datasets.Dataset.from_dict({"image": [PIL.Image.new("L", (16, 16))] * 64, "label": [0] * 64}, features)
    photo = np.repeat(np.arange(4.0) / 3, 64)[None, :].repeat(256, 0)
    canvases = canvases_of(add_texture_background(blank, seed=0, photos=[photo], crop_scale=(0.25, 0.25)))
    # the crop is a quarter of the side: 64 photo columns, 16 canvas columns, at most two bars
    assert all(len(np.unique(canvas)) <= 3 for canvas in canvases)
    canvases = canvases_of(add_texture_background(blank, seed=0, photos=[photo], crop_scale=(1.0, 1.0)))
    assert all(np.array_equal(canvas[0, ::4], np.round(np.arange(4) / 3 * 255)) for canvas in canvases)


def test_texture_background_column_names_each_canvas_photo():
    # item-free canvases on two flat photos, dark and bright: each canvas's value says which photo is behind it
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    blank = datasets.Dataset.from_dict({"image": [PIL.Image.new("L", (16, 16))] * 64, "label": [0] * 64}, features)
    photos = [np.zeros((64, 64)), np.ones((64, 64))]
    textured = add_texture_background(blank, seed=3, photos=photos)
    bright = [int(canvas.mean() > 127) for canvas in canvases_of(textured)]
    assert textured["background"] == bright and 0 < sum(bright) < 64


def test_textured_splits_use_held_out_photos_and_seeded_crops(tiny_dir):
    assert not set(TRAIN_BACKGROUNDS) & set(TEST_BACKGROUNDS) and len(set(TEXTURE_SEEDS.values())) == 3
    clean = load_classification_splits("translated_fashion_mnist", data_dir=tiny_dir, validation_size=100)
    textured = load_classification_splits(
        "textured_translated_fashion_mnist", data_dir=tiny_dir, validation_size=100, background_contrast=0.5
    )
    for split in ("train", "validation", "test"):
        assert textured[split]["top"] == clean[split]["top"]
        photos = background_photos(TEST_BACKGROUNDS if split == "test" else TRAIN_BACKGROUNDS)
        expected = add_texture_background(clean[split], TEXTURE_SEEDS[split], photos, contrast=0.5)
        np.testing.assert_array_equal(canvases_of(textured[split]), canvases_of(expected))


def test_textured_canvases_say_how_to_get_scikit_image(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "skimage", None)
    with pytest.raises(ImportError, match="pip install scikit-image"):
        background_photos(["brick"])


def test_sparse_canvases_hold_the_upscaled_item_exactly(tiny_dir):
    assert SPARSE_ITEM_SCALE == 2
    assert CANVAS_SIZES["sparse_translated_fashion_mnist"] == 192 and CANVAS_SIZES["translated_fashion_mnist"] == 64
    base = load_fashion_mnist("test", data_dir=tiny_dir)
    sparse = translate_to_canvas(base, canvas_size=192, seed=SPARSE_SEEDS["test"], item_scale=SPARSE_ITEM_SCALE)
    assert sparse.column_names == ["image", "label", "top", "left"] and sparse["label"] == base["label"]
    items = tiny_images(len(base), offset=100)
    rows = sparse.select_columns(["top", "left"]).with_format("numpy")[:]
    for index in range(0, len(base), 23):
        canvas = np.asarray(sparse[index]["image"]).copy()
        assert canvas.shape == (192, 192) and sparse[index]["image"].mode == "L"
        top, left = int(rows["top"][index]), int(rows["left"][index])
        block = canvas[top : top + 56, left : left + 56]
        for row in (0, 1):  # every source pixel is a 2x2 block of its exact value
            for col in (0, 1):
                np.testing.assert_array_equal(block[row::2, col::2], items[index])
        canvas[top : top + 56, left : left + 56] = 0
        assert not canvas.any()
    # uniform over every position where the 56 px item fits: 0..136 on a 192 px canvas
    assert rows["top"].min() >= 0 and rows["top"].max() <= 136 and len(set(rows["top"].tolist())) > 50
    assert rows["left"].min() >= 0 and rows["left"].max() <= 136 and len(set(rows["left"].tolist())) > 50
    with pytest.raises(ValueError, match="do not fit"):
        translate_to_canvas(base.select(range(2)), canvas_size=40, item_scale=2)
    with pytest.raises(ValueError, match="positive integer"):
        translate_to_canvas(base.select(range(2)), canvas_size=64, item_scale=0)


def test_sparse_splits_use_their_own_placement_seeds(tiny_dir):
    seeds = [*PLACEMENT_SEEDS.values(), *CLUTTER_SEEDS.values(), *TEXTURE_SEEDS.values(), *SPARSE_SEEDS.values()]
    assert len(set(seeds)) == len(seeds)
    splits = load_classification_splits("sparse_translated_fashion_mnist", data_dir=tiny_dir, validation_size=100)
    assert {name: len(split) for name, split in splits.items()} == {"train": 500, "validation": 100, "test": 200}
    assert all(split[0]["image"].size == (192, 192) for split in splits.values())  # the set's own default canvas
    test_base = load_fashion_mnist("test", data_dir=tiny_dir)
    expected = translate_to_canvas(test_base, 192, seed=SPARSE_SEEDS["test"], item_scale=2)
    assert splits["test"]["top"] == expected["top"] and splits["test"]["left"] == expected["left"]
    np.testing.assert_array_equal(canvases_of(splits["test"].select(range(5))), canvases_of(expected.select(range(5))))
    # reproducible for a split, different across splits (the same items under another split's seed)
    again = load_classification_splits("sparse_translated_fashion_mnist", data_dir=tiny_dir, validation_size=100)
    assert all(
        again[name]["top"] == split["top"] and again[name]["left"] == split["left"] for name, split in splits.items()
    )
    for other in ("train", "validation"):
        moved = translate_to_canvas(test_base, 192, seed=SPARSE_SEEDS[other], item_scale=2)
        assert moved["top"] != expected["top"] and moved["left"] != expected["left"]
    # subsets keep the full split's canvases; canvas_size stays overridable
    subset = load_classification_splits(
        "sparse_translated_fashion_mnist",
        data_dir=tiny_dir,
        validation_size=100,
        max_train_samples=20,
        max_eval_samples=10,
    )
    assert {name: len(split) for name, split in subset.items()} == {"train": 20, "validation": 10, "test": 10}
    full = set(zip(splits["test"]["label"], splits["test"]["top"], splits["test"]["left"]))
    assert set(zip(subset["test"]["label"], subset["test"]["top"], subset["test"]["left"])) <= full
    small = load_classification_splits(
        "sparse_translated_fashion_mnist", data_dir=tiny_dir, validation_size=100, canvas_size=96, max_eval_samples=10
    )
    assert small["test"][0]["image"].size == (96, 96) and max(small["test"]["top"]) <= 40


def test_processed_pixel_values_in_chunks_equal_all_at_once(tiny_dir, processor):
    test = load_classification_splits("translated_fashion_mnist", data_dir=tiny_dir, validation_size=100)["test"]
    test = test.select(range(23))
    whole = processed_pixel_values(test, processor, 1, chunk_size=23)
    assert whole.shape == (23, 1, 32, 32)
    for chunk_size in (5, 1):  # a ragged last chunk (23 = 4 x 5 + 3), and one image at a time
        assert torch.equal(processed_pixel_values(test, processor, 1, chunk_size=chunk_size), whole)


def test_item_regions_of_the_translated_sets(tiny_dir, processor):
    assert CLEAN_CANVASES == {
        "cluttered_translated_fashion_mnist": "translated_fashion_mnist",
        "textured_translated_fashion_mnist": "translated_fashion_mnist",
    }
    load = dict(data_dir=tiny_dir, validation_size=100, max_eval_samples=40)
    config = tiny_config(num_channels=1)  # 32 px images, 4 x 4 regions of 8 px
    tree = build_scale_tree((8, 8), 2, 2)
    # clean canvases (translated, sparse): every region with content is the item's
    for name in ("translated_fashion_mnist", "sparse_translated_fashion_mnist"):
        assert translated_item_regions(name, processor, config, load) == {"validation": None, "test": None}
    # cluttered and textured: the regions with content on the clean translated canvases, as before
    clean = load_classification_splits("translated_fashion_mnist", **load)
    expected = {split: content_regions(processed_pixel_values(clean[split], processor, 1), tree, 4) for split in clean}
    for name in ("cluttered_translated_fashion_mnist", "textured_translated_fashion_mnist"):
        regions = translated_item_regions(name, processor, config, load)
        assert regions.keys() == {"validation", "test"}
        assert all(
            regions[split].shape == (40, 16) and torch.equal(regions[split], expected[split]) for split in regions
        )
    # on the sparse canvases every item shows in 1 to 9 regions of 32 px (56 px span 2 or 3 cells along each axis)
    sparse = load_classification_splits("sparse_translated_fashion_mnist", **load)["test"]
    canvases = torch.from_numpy(canvases_of(sparse)).float()[:, None] * 2 - 1
    content = content_regions(canvases, build_scale_tree((12, 12), 2, 2), 16)
    assert content.any(1).all() and content.sum(1).max() <= 9


# ----------------------------------------------------------------------------------------------------------------
# Splits


def id_dataset(num: int = 1000) -> datasets.Dataset:
    features = datasets.Features({"id": datasets.Value("int64"), "label": datasets.ClassLabel(num_classes=4)})
    labels = [0] * (num // 2) + [1] * (num // 4) + [2] * (num // 8) + [3] * (num - num // 2 - num // 4 - num // 8)
    return datasets.Dataset.from_dict({"id": list(range(num)), "label": labels}, features=features)


def test_train_validation_split_sizes_disjoint_stratified():
    dataset = id_dataset()
    parts = train_validation_split(dataset, validation_size=200, seed=0)
    train_ids, validation_ids = set(parts["train"]["id"]), set(parts["validation"]["id"])
    assert len(parts["train"]) == 800 and len(parts["validation"]) == 200
    assert not train_ids & validation_ids and train_ids | validation_ids == set(range(1000))
    assert np.bincount(parts["validation"]["label"]).tolist() == [100, 50, 25, 25]
    assert parts["train"]["id"] == sorted(parts["train"]["id"])  # original order kept
    again = train_validation_split(dataset, validation_size=200, seed=0)
    assert again["validation"]["id"] == parts["validation"]["id"]
    assert (
        train_validation_split(dataset, validation_size=200, seed=1)["validation"]["id"] != parts["validation"]["id"]
    )
    assert len(train_validation_split(dataset, validation_size=0.1)["validation"]) == 100
    plain = train_validation_split(dataset, validation_size=200, stratify=False)
    assert len(plain["validation"]) == 200 and not set(plain["train"]["id"]) & set(plain["validation"]["id"])
    with pytest.raises(ValueError, match="validation_size"):
        train_validation_split(dataset, validation_size=1000)


def test_subsample_is_fixed_and_ordered():
    dataset = id_dataset(100)
    subset = subsample(dataset, 10, seed=0)
    assert len(subset) == 10 and subset["id"] == sorted(subset["id"])
    assert (
        subsample(dataset, 10, seed=0)["id"] == subset["id"] and subsample(dataset, 10, seed=1)["id"] != subset["id"]
    )
    assert subsample(dataset, None) is dataset and subsample(dataset, 1000) is dataset


def test_fashion_mnist_splits_with_limits(tiny_dir):
    splits = load_classification_splits(
        "fashion_mnist", data_dir=tiny_dir, validation_size=100, max_train_samples=50, max_eval_samples=30
    )
    assert {name: len(split) for name, split in splits.items()} == {"train": 50, "validation": 30, "test": 30}
    assert all(split.column_names == ["image", "label"] for split in splits.values())
    assert splits["test"][0]["image"].size == (28, 28)


# ----------------------------------------------------------------------------------------------------------------
# imagefolder and Hub-style data sets


def write_png_classes(folder, per_class: int) -> None:
    for value, name in ((40, "cat"), (200, "dog")):
        (folder / name).mkdir(parents=True)
        for index in range(per_class):
            PIL.Image.new("RGB", (12, 10), (value, value + index, 0)).save(folder / name / f"{index}.png")


def test_imagefolder_carves_missing_splits(tmp_path):
    write_png_classes(tmp_path / "images", per_class=6)
    splits = load_classification_splits(
        f"imagefolder:{tmp_path / 'images'}", validation_size=2, cache_dir=str(tmp_path / "cache")
    )
    assert {name: len(split) for name, split in splits.items()} == {"train": 8, "validation": 2, "test": 2}
    assert class_names(splits) == ["cat", "dog"]
    for split in splits.values():
        assert split.column_names == ["image", "label"]
        for row in split:
            assert row["image"].size == (12, 10)
            assert row["image"].getpixel((0, 0))[0] == (40 if row["label"] == 0 else 200)
        assert sorted(split["label"]) == [0] * (len(split) // 2) + [1] * (len(split) // 2)  # stratified


def test_imagefolder_keeps_its_test_split(tmp_path):
    write_png_classes(tmp_path / "images" / "train", per_class=5)
    write_png_classes(tmp_path / "images" / "test", per_class=2)
    splits = load_classification_splits(
        f"imagefolder:{tmp_path / 'images'}", validation_size=2, cache_dir=str(tmp_path / "cache")
    )
    assert {name: len(split) for name, split in splits.items()} == {"train": 8, "validation": 2, "test": 4}
    with pytest.raises(FileNotFoundError):
        load_classification_splits(f"imagefolder:{tmp_path / 'missing'}")


def test_hub_style_dataset_columns_are_detected(tmp_path):
    images = [PIL.Image.new("L", (8, 8), value) for value in range(0, 200, 10)]
    features = datasets.Features({"img": datasets.Image(), "labels": datasets.ClassLabel(names=["a", "b"])})
    data = datasets.Dataset.from_dict({"img": images, "labels": [i % 2 for i in range(20)]}, features=features)
    (tmp_path / "hub").mkdir()
    data.to_parquet(str(tmp_path / "hub" / "train.parquet"))
    splits = load_classification_splits(str(tmp_path / "hub"), validation_size=4, cache_dir=str(tmp_path / "cache"))
    assert {name: len(split) for name, split in splits.items()} == {"train": 12, "validation": 4, "test": 4}
    assert splits["train"].column_names == ["image", "label"] and class_names(splits) == ["a", "b"]

    (tmp_path / "nolabel").mkdir()
    data.rename_column("labels", "target").to_parquet(str(tmp_path / "nolabel" / "train.parquet"))
    with pytest.raises(ValueError, match="no label column"):
        load_classification_splits(str(tmp_path / "nolabel"), validation_size=4, cache_dir=str(tmp_path / "cache"))


# ----------------------------------------------------------------------------------------------------------------
# Transforms


def test_transforms_shape_range_and_flip(tiny_dir, processor):
    dataset = load_classification_splits("translated_fashion_mnist", data_dir=tiny_dir, validation_size=100)["test"]
    rows = dataset.select(range(16))
    evaluation = rows.with_transform(make_transforms(processor, train=False, num_channels=1))[:16]
    pixel_values = evaluation["pixel_values"]
    assert pixel_values.shape == (16, 1, 32, 32) and pixel_values.dtype == torch.float32  # 64x64 -> processor size
    assert pixel_values.min() == -1.0 and pixel_values.max() <= 1.0  # black background at -1 after mean/std 0.5
    assert evaluation["labels"].tolist() == rows["label"] and evaluation["labels"].dtype == torch.long
    assert torch.equal(
        rows.with_transform(make_transforms(processor, train=False, num_channels=1))[:16]["pixel_values"], pixel_values
    )

    train_transform = make_transforms(processor, train=True, num_channels=1)
    torch.manual_seed(0)
    trained = rows.with_transform(train_transform)[:16]["pixel_values"]
    torch.manual_seed(0)
    assert torch.equal(rows.with_transform(train_transform)[:16]["pixel_values"], trained)  # seeded: reproducible
    flipped = [torch.equal(trained[i], pixel_values[i].flip(-1)) for i in range(16)]
    kept = [torch.equal(trained[i], pixel_values[i]) for i in range(16)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    no_flip = rows.with_transform(make_transforms(processor, train=True, hflip=False, num_channels=1))[:16]
    assert torch.equal(no_flip["pixel_values"], pixel_values)


def test_transforms_rgb_and_collate(tiny_dir):
    processor = ViTImageProcessorPil(size={"height": 48, "width": 48})  # 3-value mean/std
    dataset = load_fashion_mnist("test", data_dir=tiny_dir).select(range(6))
    rgb = dataset.with_transform(make_transforms(processor, train=True, num_channels=3))
    batch = collate_fn([rgb[i] for i in range(6)])
    assert batch["pixel_values"].shape == (6, 3, 48, 48) and batch["labels"].tolist() == list(range(6))
    assert torch.equal(batch["pixel_values"][:, 0], batch["pixel_values"][:, 2])  # grey converted to RGB
    gray = dataset.with_transform(make_transforms(processor, train=False, num_channels=1))
    loader = torch.utils.data.DataLoader(gray, batch_size=4, collate_fn=collate_fn)
    first = next(iter(loader))
    assert first["pixel_values"].shape == (4, 1, 48, 48) and first["labels"].dtype == torch.long
    assert -1.0 <= first["pixel_values"].min() and first["pixel_values"].max() <= 1.0
    with pytest.raises(ValueError, match="num_channels"):
        make_transforms(processor, train=False, num_channels=2)


def test_image_column_of_finds_the_one_image_column():
    features = datasets.Features(
        {"photo": datasets.Image(), "mask": datasets.Image(), "label": datasets.Value("int64")}
    )
    assert image_column_of(features, "d", exclude="mask") == "photo"
    with pytest.raises(ValueError, match=r"found several \(photo, mask\); columns: \['photo', 'mask', 'label'\]"):
        image_column_of(features, "d")
    with pytest.raises(ValueError, match=r"besides 'photo' \(a `datasets.Image` feature\), found none"):
        image_column_of(datasets.Features({"photo": datasets.Image()}), "d", exclude="photo")
    assert image_column_of(datasets.Features({"image": datasets.Image(), **features}), "d") == "image"
