"""Tests of the segmentation data layer (`msvit.train.segmentation_data`): scene layout and masks, splits, Hub-style
loading and transforms. The real-data test needs the Debian package `dataset-fashion-mnist`."""

import gzip
import struct

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from transformers import SegformerImageProcessorPil

from msvit.train.data import FASHION_MNIST_FILES, load_classification_splits, load_fashion_mnist_arrays
from msvit.train.segmentation_data import (
    FOREGROUND_THRESHOLD,
    IGNORE_INDEX,
    SCENE_CLASSES,
    SCENE_SEEDS,
    _ignore_boundaries,
    compose_scenes,
    load_segmentation_splits,
    make_segmentation_transforms,
    scene_item_split,
    scene_label_maps,
    scene_layout,
    segmentation_collate_fn,
)
from tests.test_data import NUM_TINY, requires_real_data


def unique_items(num: int, offset: int = 0) -> np.ndarray:
    """`(num, 28, 28)` uint8 items, each different: a 20x16 block of value `30 + i % 200` on black, plus a bar in
    row 26 whose length is `1 + i // 200`. Every block is far above the foreground threshold."""
    items = np.zeros((num, 28, 28), dtype=np.uint8)
    for index in range(num):
        identity = index + offset
        items[index, 4:24, 6:22] = 30 + identity % 200
        items[index, 26, : 1 + identity // 200] = 255
    return items


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The four Fashion-MNIST IDX files, tiny: 600 train and 200 test items (all different), labels `index % 10`."""
    folder = tmp_path_factory.mktemp("tiny_fashion_mnist")
    for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        num = NUM_TINY[split]
        write_idx(folder / images_name, unique_items(num, offset=0 if split == "train" else 1000))
        write_idx(folder / labels_name, np.arange(num) % 10)
    return folder


@pytest.fixture(scope="module")
def tiny_splits(tiny_dir):
    return load_segmentation_splits(
        data_dir=tiny_dir, canvas_size=64, validation_items=100, num_train=120, num_validation=30, num_test=40
    )


# ----------------------------------------------------------------------------------------------------------------
# Masks by hand


def test_mask_of_a_hand_built_item():
    item = np.zeros((1, 28, 28), dtype=np.uint8)
    item[0, 10:14, 10:14] = 200  # a 4x4 square inside the canvas
    item[0, 0:4, 0:4] = 90  # a 4x4 square in the canvas corner
    item[0, 20, 20] = FOREGROUND_THRESHOLD  # not above the threshold: background
    item[0, 20, 24] = FOREGROUND_THRESHOLD + 1  # a lone foreground pixel
    # a 28 px canvas leaves one position for a 28x28 item: top = left = 0
    images, masks = compose_scenes(item, np.array([4]), 1, canvas_size=28, max_items=1, seed=0)
    assert images.shape == masks.shape == (1, 28, 28) and images.dtype == masks.dtype == np.uint8
    np.testing.assert_array_equal(images[0], item[0])

    expected = np.zeros((28, 28), dtype=np.uint8)
    # square at rows/columns 10..13: dilation covers 9..14, erosion keeps 11..12, so the 6x6 ring is ignored and
    # the 2x2 centre has class 4 + 1
    expected[9:15, 9:15] = IGNORE_INDEX
    expected[11:13, 11:13] = 5
    # corner square at 0..3: the canvas edge is no boundary, so erosion keeps 0..2 and dilation reaches 4
    expected[0:5, 0:5] = IGNORE_INDEX
    expected[0:3, 0:3] = 5
    # the lone pixel is its own boundary: its 3x3 neighbourhood is ignored
    expected[19:22, 23:26] = IGNORE_INDEX
    np.testing.assert_array_equal(masks[0], expected)
    assert (masks[0] == 5).sum() == 4 + 9 and (masks[0] == IGNORE_INDEX).sum() == 32 + 16 + 9


def test_boundary_between_two_classes_is_ignored():
    masks = np.array([[[1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 2, 2]], [[3, 3, 3, 3], [3, 3, 3, 3], [3, 3, 3, 0]]])
    masks = masks.astype(np.uint8)
    _ignore_boundaries(masks)
    np.testing.assert_array_equal(masks[0], [[1, 255, 255, 2]] * 3)
    np.testing.assert_array_equal(masks[1], [[3, 3, 3, 3], [3, 3, 255, 255], [3, 3, 255, 255]])


def test_scene_label_maps():
    id2label, label2id = scene_label_maps()
    assert len(id2label) == len(SCENE_CLASSES) == 11
    assert id2label[0] == "background" and id2label[1] == "T-shirt/top" and id2label[10] == "Ankle boot"
    assert label2id["Trouser"] == 2 and all(label2id[name] == index for index, name in id2label.items())


# ----------------------------------------------------------------------------------------------------------------
# Layout and composition


def boxes_overlap(top_a, left_a, top_b, left_b, size: int = 28) -> bool:
    return max(top_a, top_b) < min(top_a, top_b) + size and max(left_a, left_b) < min(left_a, left_b) + size


def test_layout_counts_no_overlap_and_no_repeats():
    layout = scene_layout(10000, 2000, canvas_size=64, max_items=4, seed=0)
    counts = np.bincount(layout.scene, minlength=2000)
    assert counts.min() == 1 and counts.max() == 4  # every scene has 1..max_items items, and some have 4
    assert layout.top.min() >= 0 and layout.top.max() <= 64 - 28 and layout.left.max() <= 64 - 28
    assert 0 < layout.num_dropped and len(layout.scene) + layout.num_dropped <= 4 * 2000  # crowded: some dropped
    assert np.all(np.diff(layout.scene) >= 0)
    for scene in range(0, 2000, 7):
        placed = np.flatnonzero(layout.scene == scene)
        for position, first in enumerate(placed):
            for second in placed[position + 1 :]:
                assert not boxes_overlap(
                    layout.top[first], layout.left[first], layout.top[second], layout.left[second]
                )
    # fewer draws than items: no item is used twice
    assert len(np.unique(layout.item)) == len(layout.item)
    # more draws than items: each item is used before any repeats (at most ceil(draws / items) times)
    small = scene_layout(30, 40, canvas_size=96, max_items=4, seed=1)
    uses = np.bincount(small.item, minlength=30)
    assert uses.min() >= 1 and uses.max() - uses.min() <= 1


def test_compose_pastes_items_and_labels_them():
    items, labels = unique_items(60), np.arange(60) % 10
    images, masks = compose_scenes(items, labels, 25, canvas_size=80, max_items=3, seed=4)
    layout = scene_layout(60, 25, canvas_size=80, max_items=3, seed=4)
    assert images.shape == masks.shape == (25, 80, 80)
    covered = np.zeros(images.shape, dtype=bool)
    for scene, item, top, left in zip(layout.scene, layout.item, layout.top, layout.left):
        np.testing.assert_array_equal(images[scene, top : top + 28, left : left + 28], items[item])
        # the block interior (rows 5..22, columns 7..20) is the item's class + 1
        assert (masks[scene, top + 5 : top + 23, left + 7 : left + 21] == labels[item] + 1).all()
        covered[scene, max(top - 1, 0) : top + 29, max(left - 1, 0) : left + 29] = True
    for scene in range(25):
        placed_labels = {int(labels[item]) + 1 for item in layout.item[layout.scene == scene]}
        assert set(np.unique(masks[scene]).tolist()) == {0, IGNORE_INDEX} | placed_labels
    # away from the items (one pixel of band around each box) everything is black background
    assert not images[~covered].any() and not masks[~covered].any()


def test_compose_is_deterministic():
    items, labels = unique_items(50), np.arange(50) % 10
    first = compose_scenes(items, labels, 20, canvas_size=64, seed=3)
    again = compose_scenes(items, labels, 20, canvas_size=64, seed=3)
    other = compose_scenes(items, labels, 20, canvas_size=64, seed=4)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0]) and not np.array_equal(first[1], other[1])


def test_compose_rejects_bad_inputs():
    items = unique_items(3)
    with pytest.raises(ValueError, match="uint8"):
        compose_scenes(items.astype(np.float32), np.zeros(3), 1)
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        compose_scenes(items, np.zeros(4, dtype=np.int64), 1)
    with pytest.raises(ValueError, match="do not fit on a 20x20 canvas"):
        compose_scenes(items, np.zeros(3, dtype=np.int64), 1, canvas_size=20)
    with pytest.raises(ValueError, match="max_items must be at least 1"):
        compose_scenes(items, np.zeros(3, dtype=np.int64), 1, max_items=0)
    with pytest.raises(ValueError, match=r"classes must be in 0\.\.253"):
        compose_scenes(items, np.array([0, 1, 254]), 1)


# ----------------------------------------------------------------------------------------------------------------
# Splits


def test_scene_splits_tiny(tiny_dir, tiny_splits):
    assert {name: len(split) for name, split in tiny_splits.items()} == {"train": 120, "validation": 30, "test": 40}
    for split in tiny_splits.values():
        assert split.column_names == ["image", "label"]
        row = split[0]
        assert row["image"].mode == row["label"].mode == "L" and row["image"].size == row["label"].size == (64, 64)

    train_images, train_labels = load_fashion_mnist_arrays("train", tiny_dir)
    train_indices, validation_indices = scene_item_split(train_labels, 100, seed=0)
    # disjoint item pools covering the training images; validation = the classification scripts' validation carve
    assert len(validation_indices) == 100 and not set(train_indices) & set(validation_indices)
    assert len(train_indices) + len(validation_indices) == NUM_TINY["train"]
    held_out = load_classification_splits("fashion_mnist", data_dir=tiny_dir, validation_size=100)["validation"]
    held_out_images = np.stack([np.asarray(image) for image in held_out["image"]])
    np.testing.assert_array_equal(held_out_images, train_images[validation_indices])

    # each split's scenes are composed from its own pool with its fixed seed
    test_images, test_labels = load_fashion_mnist_arrays("test", tiny_dir)
    pools = {
        "train": (train_images[train_indices], train_labels[train_indices]),
        "validation": (train_images[validation_indices], train_labels[validation_indices]),
        "test": (test_images, test_labels),
    }
    for split, (items, labels) in pools.items():
        images, masks = compose_scenes(items, labels, len(tiny_splits[split]), canvas_size=64, seed=SCENE_SEEDS[split])
        stored = tiny_splits[split]
        np.testing.assert_array_equal(np.stack([np.asarray(image) for image in stored["image"]]), images)
        np.testing.assert_array_equal(np.stack([np.asarray(mask) for mask in stored["label"]]), masks)


def test_scene_splits_subsets_keep_their_scenes(tiny_dir, tiny_splits):
    subset = load_segmentation_splits(
        data_dir=tiny_dir,
        canvas_size=64,
        validation_items=100,
        num_train=120,
        num_validation=30,
        num_test=40,
        max_train_samples=10,
        max_eval_samples=5,
    )
    assert {name: len(split) for name, split in subset.items()} == {"train": 10, "validation": 5, "test": 5}
    stored = datasets.Image(decode=False)
    full = {row["bytes"] for row in tiny_splits["test"].cast_column("label", stored)["label"]}
    assert all(row["bytes"] in full for row in subset["test"].cast_column("label", stored)["label"])


@requires_real_data
def test_real_fashion_mnist_scenes():
    splits = load_segmentation_splits(num_train=300, num_validation=50, num_test=60)
    assert {name: len(split) for name, split in splits.items()} == {"train": 300, "validation": 50, "test": 60}
    _, train_labels = load_fashion_mnist_arrays("train")
    train_indices, validation_indices = scene_item_split(train_labels, 5000, seed=0)
    assert len(train_indices) == 55000 and len(validation_indices) == 5000
    assert np.bincount(train_labels[validation_indices]).tolist() == [500] * 10  # stratified, as for classification
    assert np.union1d(train_indices, validation_indices).tolist() == list(range(60000))
    test_images, test_labels = load_fashion_mnist_arrays("test")
    images, masks = compose_scenes(test_images, test_labels, 60, seed=SCENE_SEEDS["test"])
    np.testing.assert_array_equal(np.asarray(splits["test"][7]["label"]), masks[7])
    np.testing.assert_array_equal(np.asarray(splits["test"][7]["image"]), images[7])
    values = np.unique(masks)
    assert values[0] == 0 and values[-1] == IGNORE_INDEX and set(values[1:-1].tolist()) <= set(range(1, 11))


# ----------------------------------------------------------------------------------------------------------------
# Hub-style data sets


def write_parquet(folder, columns: dict, features: datasets.Features) -> None:
    folder.mkdir()
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(folder / "train.parquet"))


def test_hub_style_columns_are_detected(tmp_path):
    images = [PIL.Image.new("RGB", (6, 5), (value, 0, 0)) for value in range(20)]
    masks = [PIL.Image.new("L", (6, 5), value % 3) for value in range(20)]
    features = datasets.Features(
        {"img": datasets.Image(), "annotation": datasets.Image(), "scene_category": datasets.Value("int64")}
    )
    write_parquet(tmp_path / "hub", {"img": images, "annotation": masks, "scene_category": [0] * 20}, features)
    splits = load_segmentation_splits(
        str(tmp_path / "hub"), num_validation=4, num_test=3, cache_dir=tmp_path / "cache"
    )
    assert {name: len(split) for name, split in splits.items()} == {"train": 13, "validation": 4, "test": 3}
    row = splits["validation"][0]
    assert splits["train"].column_names == ["image", "label"] and row["image"].mode == "RGB"
    assert np.asarray(row["label"]).max() == row["image"].getpixel((0, 0))[0] % 3  # the mask of its own image


def test_missing_mask_column_and_unknown_data_set(tmp_path):
    features = datasets.Features({"img": datasets.Image(), "target": datasets.Value("int64")})
    images = [PIL.Image.new("L", (4, 4), value) for value in range(6)]
    write_parquet(tmp_path / "nomask", {"img": images, "target": list(range(6))}, features)
    with pytest.raises(ValueError, match=r"no mask column.*label, annotation, segmentation_mask, mask.*'target'"):
        load_segmentation_splits(str(tmp_path / "nomask"), cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="Unknown segmentation data set 'no_such_segmentation_set'.*fashion_mnist"):
        load_segmentation_splits("no_such_segmentation_set", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="imagefolder data sets hold class labels"):
        load_segmentation_splits(f"imagefolder:{tmp_path}")


# ----------------------------------------------------------------------------------------------------------------
# Transforms


def test_transforms_keep_mask_values(tiny_splits):
    rows = tiny_splits["test"].select(range(6))
    masks = np.stack([np.asarray(mask) for mask in rows["label"]])
    assert (masks == IGNORE_INDEX).any()

    same_size = SegformerImageProcessorPil(size={"height": 64, "width": 64}, image_mean=0.5, image_std=0.5)
    batch = rows.with_transform(make_segmentation_transforms(same_size, num_channels=1))[:6]
    assert batch["pixel_values"].shape == (6, 1, 64, 64) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].shape == (6, 64, 64) and batch["labels"].dtype == torch.long
    np.testing.assert_array_equal(batch["labels"].numpy(), masks)  # exactly, 255 included
    assert batch["pixel_values"].min() == -1.0  # black background after mean/std 0.5

    half = SegformerImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    transformed = rows.with_transform(make_segmentation_transforms(half, num_channels=3))
    collated = segmentation_collate_fn([transformed[index] for index in range(6)])
    assert collated["pixel_values"].shape == (6, 3, 32, 32) and collated["labels"].shape == (6, 32, 32)
    assert torch.equal(collated["pixel_values"][:, 0], collated["pixel_values"][:, 2])  # grey replicated to RGB
    # nearest resize by 2 keeps every second pixel (PIL samples pixel centres: 1, 3, 5, ...)
    np.testing.assert_array_equal(collated["labels"].numpy(), masks[:, 1::2, 1::2])
    assert collated["labels"].dtype == torch.long

    images_only = rows.remove_columns("label").with_transform(make_segmentation_transforms(half, num_channels=3))[:2]
    assert set(images_only) == {"pixel_values"}


def test_transform_errors(tiny_splits):
    processor = SegformerImageProcessorPil(size={"height": 32, "width": 32})
    with pytest.raises(ValueError, match="num_channels must be 1 or 3"):
        make_segmentation_transforms(processor, num_channels=2)
    with pytest.raises(ValueError, match="do_reduce_labels=False"):
        make_segmentation_transforms(SegformerImageProcessorPil(do_reduce_labels=True), num_channels=3)
    transform = make_segmentation_transforms(processor, num_channels=3)
    image = PIL.Image.new("L", (8, 8))
    with pytest.raises(ValueError, match="not a colour image"):
        transform({"image": [image], "label": [PIL.Image.new("RGB", (8, 8))]})
    with pytest.raises(ValueError, match="Image 0 is 8x8 px but its mask is 6x8"):
        transform({"image": [image], "label": [PIL.Image.new("L", (6, 8))]})
    with pytest.raises(ValueError, match=r"class ids 0\.\.300"):
        transform({"image": [image], "label": [np.array([[0, 300]] * 4 + [[0, 0]] * 4, dtype=np.int32).repeat(4, 1)]})
