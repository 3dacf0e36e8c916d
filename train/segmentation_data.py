"""Semantic-segmentation data for the training scripts: composed scenes, Hub data sets, transforms.

`load_segmentation_splits(name)` returns a `datasets.DatasetDict` with splits `train`, `validation` and `test`, each
with an `image` column (PIL image) and a `label` column (PIL image, mode "L": the mask, one class id per pixel).
`name` is one of:

- `"fashion_mnist_scenes"`: Fashion-MNIST scenes, a data set COMPOSED here from the real Fashion-MNIST images (Xiao
  et al. 2017, Debian package `dataset-fashion-mnist`); it is not a public benchmark. No real dense-label data set
  ships in any registry, so this one gives the segmentation scripts real image content with exact masks. Each scene
  places 1 to `max_items` 28x28 items at random non-overlapping positions on a black `canvas_size` square canvas
  (`compose_scenes`). Mask: 0 = background, `1 + class` where the item's intensity exceeds `FOREGROUND_THRESHOLD`,
  and `IGNORE_INDEX` (255) on the one-pixel band either side of every label boundary, where the label of an
  anti-aliased edge pixel is a matter of taste. Train and validation scenes are built from disjoint items of the
  60,000 training images (the validation items are the validation carve of `msvit.train.data`, 5,000 by default), test
  scenes from the 10,000 test images; each split has a fixed seed (`SCENE_SEEDS`), so every model sees the same
  validation and test scenes.
- any other string: a Hub data set id (or a local data set folder) loaded with `datasets.load_dataset`, e.g.
  `"scene_parse_150"` (ADE20K) when online. The mask column (a `datasets.Image` feature named one of
  `MASK_COLUMN_NAMES`) and the image column (the other `datasets.Image` feature) are detected and renamed to
  `label` / `image`; a missing validation or test split is carved out of train.

`make_segmentation_transforms(image_processor, num_channels=...)` gives the function to pass to
`dataset.with_transform`; it returns `pixel_values` (float, `(batch, num_channels, height, width)`) and `labels`
(int64, `(batch, height, width)`, 255 kept), which `segmentation_collate_fn` stacks into a batch.
"""

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from msvit.train.data import (
    FASHION_MNIST_CLASSES,
    VALIDATION_SPLIT_NAMES,
    _image_column,
    _in_memory_dataset,
    _pnm_records,
    image_column_of,
    image_mode_and_processor_kwargs,
    load_fashion_mnist_arrays,
    subsample,
    train_validation_split,
)


SCENES_NAME = "fashion_mnist_scenes"
SCENE_CLASSES = ("background", *FASHION_MNIST_CLASSES)
IGNORE_INDEX = 255
# Fashion-MNIST backgrounds are exactly 0 and items are bright, but their anti-aliased rims fade through every value;
# 25/255 (about 10 %) keeps faint texture inside an item as foreground and leaves the rim to the ignore band.
FOREGROUND_THRESHOLD = 25
# Rejection sampling tries per item; with 28x28 items, 4 per 96x96 canvas almost always fit (an item that does not is
# dropped, never overlapped).
MAX_PLACEMENT_TRIES = 64
# Scene seeds, one per split and independent of the validation-carve seed, so the test scenes are the same for every
# model and run.
SCENE_SEEDS = {"train": 0, "validation": 1, "test": 2}
SCENE_VALIDATION_ITEMS = 5000
MASK_COLUMN_NAMES = ("label", "annotation", "segmentation_mask", "mask")
_RENDER_CHUNK = 512  # scenes per chunk of the ignore-band computation (keeps its temporaries in cache)


# ----------------------------------------------------------------------------------------------------------------
# Scene composition


@dataclass(frozen=True)
class SceneLayout:
    """Where `compose_scenes` puts its items: one entry per placed item, ordered by scene.

    `scene[p]` is the scene of placed item `p`, `item[p]` its row in the items array, `top[p]`, `left[p]` the
    top-left corner of its box on the canvas. `num_dropped` counts drawn items that found no free spot.
    """

    scene: np.ndarray
    item: np.ndarray
    top: np.ndarray
    left: np.ndarray
    num_dropped: int


def scene_layout(
    num_items: int,
    num_scenes: int,
    *,
    item_size: tuple[int, int] = (28, 28),
    canvas_size: int = 96,
    max_items: int = 4,
    seed: int = 0,
) -> SceneLayout:
    """Draw the items and non-overlapping positions of `num_scenes` scenes, deterministically from `seed`.

    Each scene gets `k` items, `k` uniform in `1..max_items`. Items are taken in the order of a random permutation of
    `range(num_items)`, so no item repeats until all have been used (then a fresh permutation follows). The `j`-th item
    of a scene draws `MAX_PLACEMENT_TRIES` uniform positions where its box fits and takes the first whose box overlaps
    none of the boxes already placed; if none is free the item is dropped (19 of about 50,000 items for 20,000 scenes
    of up to 4 items on 96x96). The tries are drawn for all scenes at once, so 20,000 layouts take about 0.1 s.
    """
    height, width = item_size
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, got {max_items}.")
    if num_scenes < 0:
        raise ValueError(f"num_scenes must be non-negative, got {num_scenes}.")
    if height > canvas_size or width > canvas_size:
        raise ValueError(f"Items of {height}x{width} px do not fit on a {canvas_size}x{canvas_size} canvas.")
    if num_scenes and num_items < 1:
        raise ValueError("Cannot compose scenes without items.")
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, max_items + 1, size=num_scenes)
    total = int(counts.sum())
    num_permutations = -(-total // num_items) if total else 0
    order = np.concatenate([rng.permutation(num_items) for _ in range(num_permutations)] or [np.zeros(0, np.int64)])
    first_item = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)

    tops = np.zeros((num_scenes, max_items), dtype=np.int64)
    lefts = np.zeros((num_scenes, max_items), dtype=np.int64)
    placed = np.zeros((num_scenes, max_items), dtype=bool)
    rows = np.arange(num_scenes)
    for slot in range(max_items):
        candidate_tops = rng.integers(0, canvas_size - height + 1, size=(num_scenes, MAX_PLACEMENT_TRIES))
        candidate_lefts = rng.integers(0, canvas_size - width + 1, size=(num_scenes, MAX_PLACEMENT_TRIES))
        free = np.ones((num_scenes, MAX_PLACEMENT_TRIES), dtype=bool)
        for other in range(slot):  # two equal-size boxes overlap iff both corner offsets are below the box size
            overlaps = (np.abs(candidate_tops - tops[:, other, None]) < height) & (
                np.abs(candidate_lefts - lefts[:, other, None]) < width
            )
            free &= ~(overlaps & placed[:, other, None])
        first_free = free.argmax(axis=1)
        placed[:, slot] = free[rows, first_free] & (counts > slot)
        tops[:, slot] = candidate_tops[rows, first_free]
        lefts[:, slot] = candidate_lefts[rows, first_free]

    scene, slot = np.nonzero(placed)
    return SceneLayout(
        scene=scene,
        item=order[first_item[scene] + slot],
        top=tops[scene, slot],
        left=lefts[scene, slot],
        num_dropped=total - len(scene),
    )


def _check_items(items: np.ndarray, labels: np.ndarray) -> None:
    if items.ndim != 3 or items.dtype != np.uint8:
        raise ValueError(
            f"items must be a (N, height, width) uint8 array of grayscale images, got {items.dtype} {items.shape}; "
            "convert with `.astype(np.uint8)` after scaling to 0..255."
        )
    if labels.shape != (len(items),):
        raise ValueError(f"labels must have shape ({len(items)},) (one class per item), got {labels.shape}.")
    if labels.size and (labels.min() < 0 or labels.max() + 1 >= IGNORE_INDEX):
        raise ValueError(
            f"Item classes must be in 0..{IGNORE_INDEX - 2} (the mask stores class + 1, and {IGNORE_INDEX} is the "
            f"ignore index), got {labels.min()}..{labels.max()}."
        )


def _ignore_boundaries(masks: np.ndarray) -> None:
    """Set `IGNORE_INDEX` in place on every pixel whose 3x3 neighbourhood holds more than one label.

    For one item on background this is dilate(fg) XOR erode(fg) with a 3x3 square: the last foreground pixel and the
    first background pixel on each side of the edge. Max and min filters over a square are separable, so the test
    costs two maxima and two minima per axis. The canvas edge is not a boundary (edge-replicate padding).
    """
    for start in range(0, len(masks), _RENDER_CHUNK):
        chunk = masks[start : start + _RENDER_CHUNK]
        padded = np.pad(chunk, ((0, 0), (1, 1), (1, 1)), mode="edge")
        row_max = np.maximum(np.maximum(padded[:, :, :-2], padded[:, :, 1:-1]), padded[:, :, 2:])
        row_min = np.minimum(np.minimum(padded[:, :, :-2], padded[:, :, 1:-1]), padded[:, :, 2:])
        window_max = np.maximum(np.maximum(row_max[:, :-2], row_max[:, 1:-1]), row_max[:, 2:])
        window_min = np.minimum(np.minimum(row_min[:, :-2], row_min[:, 1:-1]), row_min[:, 2:])
        chunk[window_max != window_min] = IGNORE_INDEX


def _render_scenes(
    items: np.ndarray, labels: np.ndarray, layout: SceneLayout, images: np.ndarray, masks: np.ndarray
) -> None:
    """Paste the layout's items into the black `images` `(S, H, W)` and write their masks into `masks`, in place."""
    height, width = items.shape[1:]
    images[:] = 0
    masks[:] = 0
    codes = (labels[layout.item] + 1).astype(np.uint8)  # uint8 throughout: int64 patches would cost 8x the memory
    patches = (items[layout.item] > FOREGROUND_THRESHOLD).view(np.uint8) * codes[:, None, None]
    for index, (scene, item, top, left) in enumerate(
        zip(layout.scene.tolist(), layout.item.tolist(), layout.top.tolist(), layout.left.tolist())
    ):
        images[scene, top : top + height, left : left + width] = items[item]
        masks[scene, top : top + height, left : left + width] = patches[index]
    _ignore_boundaries(masks)


def compose_scenes(
    items: np.ndarray,
    labels: np.ndarray,
    num_scenes: int,
    *,
    canvas_size: int = 96,
    max_items: int = 4,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Compose `num_scenes` scenes of grayscale items on a black canvas, with their segmentation masks.

    `items` is `(N, height, width)` uint8 (e.g. Fashion-MNIST's `(N, 28, 28)`), `labels` `(N,)` their classes. The
    layout (which items, where) is `scene_layout(N, num_scenes, ..., seed=seed)`. Returns `images` and `masks`, both
    `(num_scenes, canvas_size, canvas_size)` uint8: each mask pixel is 0 (background), `1 + label` where the pasted
    item's intensity exceeds `FOREGROUND_THRESHOLD`, or `IGNORE_INDEX` on the band either side of a label boundary.
    Deterministic for a given seed; about a second for 20,000 96x96 scenes.
    """
    items = np.asarray(items)
    labels = np.asarray(labels)
    _check_items(items, labels)
    layout = scene_layout(
        len(items), num_scenes, item_size=items.shape[1:], canvas_size=canvas_size, max_items=max_items, seed=seed
    )
    images = np.empty((num_scenes, canvas_size, canvas_size), dtype=np.uint8)
    masks = np.empty_like(images)
    _render_scenes(items, labels, layout, images, masks)
    return images, masks


def scene_label_maps() -> tuple[dict[int, str], dict[str, int]]:
    """`(id2label, label2id)` of the scene masks: 0 = background, 1..10 = the Fashion-MNIST classes."""
    id2label = dict(enumerate(SCENE_CLASSES))
    return id2label, {name: index for index, name in id2label.items()}


# ----------------------------------------------------------------------------------------------------------------
# Splits


def scene_item_split(labels: np.ndarray, validation_items: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training images whose items go to train scenes and to validation scenes (disjoint, sorted).

    The validation items are exactly the validation split of `msvit.train.data.train_validation_split` for the same
    labels, size and seed (stratified by class), i.e. the images that the classification scripts hold out.
    """
    features = datasets.Features(
        {"index": datasets.Value("int64"), "label": datasets.ClassLabel(names=list(FASHION_MNIST_CLASSES))}
    )
    indexed = datasets.Dataset.from_dict({"index": np.arange(len(labels)), "label": labels}, features=features)
    parts = train_validation_split(indexed, validation_items, seed)
    train = parts["train"].with_format("numpy")["index"][:]
    validation = parts["validation"].with_format("numpy")["index"][:]
    return np.asarray(train, dtype=np.int64), np.asarray(validation, dtype=np.int64)


def _scenes_dataset(
    items: np.ndarray,
    labels: np.ndarray,
    num_scenes: int,
    *,
    canvas_size: int,
    max_items: int,
    seed: int,
    split: str,
    fingerprint_parts: tuple,
) -> datasets.Dataset:
    """Scenes rendered straight into raw PGM records (no per-image encoding), wrapped as an in-memory data set."""
    _check_items(items, labels)
    layout = scene_layout(
        len(items), num_scenes, item_size=items.shape[1:], canvas_size=canvas_size, max_items=max_items, seed=seed
    )
    image_records, images = _pnm_records(num_scenes, (canvas_size, canvas_size))
    mask_records, masks = _pnm_records(num_scenes, (canvas_size, canvas_size))
    _render_scenes(items, labels, layout, images, masks)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return _in_memory_dataset(
        {"image": _image_column(image_records), "label": _image_column(mask_records)},
        features,
        split,
        (*fingerprint_parts, split, num_scenes, canvas_size, max_items, seed),
    )


def _fashion_mnist_scenes(
    *,
    seed: int,
    data_dir: str | Path | None,
    canvas_size: int,
    max_items: int,
    num_scenes: dict[str, int],
    validation_items: int | float,
) -> dict[str, datasets.Dataset]:
    train_images, train_labels = load_fashion_mnist_arrays("train", data_dir)
    test_images, test_labels = load_fashion_mnist_arrays("test", data_dir)
    train_indices, validation_indices = scene_item_split(train_labels, validation_items, seed)
    content_hash = hashlib.sha256(
        b"".join(array.tobytes() for array in (train_images, train_labels, test_images, test_labels))
    ).hexdigest()
    pools = {
        "train": (train_images[train_indices], train_labels[train_indices]),
        "validation": (train_images[validation_indices], train_labels[validation_indices]),
        "test": (test_images, test_labels),
    }
    fingerprint_parts = (SCENES_NAME, content_hash, validation_items, seed)
    return {
        split: _scenes_dataset(
            items,
            labels,
            num_scenes[split],
            canvas_size=canvas_size,
            max_items=max_items,
            seed=SCENE_SEEDS[split],
            split=split,
            fingerprint_parts=fingerprint_parts,
        )
        for split, (items, labels) in pools.items()
    }


def _standardize_segmentation_columns(dataset: datasets.Dataset, name: str) -> datasets.Dataset:
    """Keep only the image and mask columns, renamed to `image` and `label`."""
    features = dataset.features
    image_features = [column for column, feature in features.items() if isinstance(feature, datasets.Image)]
    mask_column = next((column for column in MASK_COLUMN_NAMES if column in image_features), None)
    if mask_column is None:
        raise ValueError(
            f"Segmentation data set {name!r} has no mask column: expected a `datasets.Image` feature named one of "
            f"{', '.join(MASK_COLUMN_NAMES)}; columns: {dict(features)}. Rename the mask column to `label`."
        )
    image_column = image_column_of(features, name, exclude=mask_column)
    dataset = dataset.select_columns([image_column, mask_column])
    return dataset.rename_columns(
        {old: new for old, new in ((image_column, "image"), (mask_column, "label")) if old != new}
    )


def _hub_segmentation_splits(
    name: str, *, seed: int, num_validation: int, num_test: int, cache_dir: str | Path | None
) -> dict[str, datasets.Dataset]:
    try:
        raw = datasets.load_dataset(name, cache_dir=None if cache_dir is None else str(cache_dir))
    except (ConnectionError, FileNotFoundError) as error:
        raise ValueError(
            f"Unknown segmentation data set {name!r}: it is not {SCENES_NAME!r} and `datasets.load_dataset` could not "
            f"load it ({type(error).__name__}: {error}). Offline, use {SCENES_NAME!r} (Debian package "
            "`dataset-fashion-mnist`); online, a Hub id with an image and a mask column, e.g. 'scene_parse_150'."
        ) from error
    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({"train": raw})
    if "train" not in raw:
        raise ValueError(f"Segmentation data set {name!r} has no train split (splits: {list(raw)}).")
    splits = {split: _standardize_segmentation_columns(dataset, name) for split, dataset in raw.items()}
    train, test = splits["train"], splits.get("test")
    validation = next((splits[split] for split in VALIDATION_SPLIT_NAMES if split in splits), None)
    if test is None:
        parts = train_validation_split(train, num_test, seed, stratify=False)
        train, test = parts["train"], parts["validation"]
    if validation is None:
        parts = train_validation_split(train, num_validation, seed, stratify=False)
        train, validation = parts["train"], parts["validation"]
    return {"train": train, "validation": validation, "test": test}


def load_segmentation_splits(
    name: str = SCENES_NAME,
    *,
    seed: int = 0,
    data_dir: str | Path | None = None,
    canvas_size: int = 96,
    max_items: int = 4,
    num_train: int = 20000,
    num_validation: int = 1000,
    num_test: int = 2000,
    validation_items: int | float = SCENE_VALIDATION_ITEMS,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    cache_dir: str | Path | None = None,
) -> datasets.DatasetDict:
    """Splits `train`, `validation`, `test` with columns `image` (PIL) and `label` (PIL mask, class id per pixel).

    `name`: `"fashion_mnist_scenes"` or a Hub id / local data set folder (see the module docstring). For the scenes,
    `num_train` / `num_validation` / `num_test` scenes of `canvas_size` px with up to `max_items` items are composed;
    `validation_items` training images (or that fraction) are held out, with `seed`, as the validation scenes' items;
    `data_dir` is the Fashion-MNIST IDX folder. For a Hub data set without a test or validation split, `num_test` /
    `num_validation` rows are carved out of train with `seed`; `cache_dir` goes to `datasets.load_dataset`.
    `max_train_samples` / `max_eval_samples` keep a fixed random subset (seeded by `seed`) of train / of validation
    and test, taken after composition so that a subset's scenes are those of the full split.
    """
    if name == SCENES_NAME:
        splits = _fashion_mnist_scenes(
            seed=seed,
            data_dir=data_dir,
            canvas_size=canvas_size,
            max_items=max_items,
            num_scenes={"train": num_train, "validation": num_validation, "test": num_test},
            validation_items=validation_items,
        )
    elif name.startswith("imagefolder:"):
        raise ValueError(
            "imagefolder data sets hold class labels, not masks; for segmentation pass "
            f"{SCENES_NAME!r} or a data set with an image and a mask column."
        )
    else:
        splits = _hub_segmentation_splits(
            name, seed=seed, num_validation=num_validation, num_test=num_test, cache_dir=cache_dir
        )
    splits["train"] = subsample(splits["train"], max_train_samples, seed)
    splits["validation"] = subsample(splits["validation"], max_eval_samples, seed)
    splits["test"] = subsample(splits["test"], max_eval_samples, seed)
    return datasets.DatasetDict(splits)


# ----------------------------------------------------------------------------------------------------------------
# Transforms


def _mask_array(mask: Any, index: int) -> np.ndarray:
    """A mask as a 2-D uint8 array of class ids. "P" masks give their palette indices (the class ids), not colours."""
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(
            f"Mask {index} has shape {array.shape} (PIL mode {getattr(mask, 'mode', None)!r}): a semantic mask must "
            "be single-channel class ids (PIL mode 'L', 'P' or 'I'), not a colour image."
        )
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"Mask {index} holds class ids {array.min()}..{array.max()}; the image processor resizes masks as "
                "8-bit images, so ids must be in 0..255."
            )
        array = array.astype(np.uint8)
    return array


def make_segmentation_transforms(
    image_processor: Any, *, num_channels: int
) -> Callable[[dict[str, list]], dict[str, torch.Tensor]]:
    """The function to pass to `dataset.with_transform`: a batch `{"image": [PIL], "label": [PIL mask]}` becomes
    `{"pixel_values": float (batch, num_channels, height, width), "labels": int64 (batch, height, width)}`.

    Images are converted to "L" (`num_channels == 1`) or "RGB" (3; a grayscale scene is replicated to three
    channels, so a model trained on scenes takes any photo). Images and masks then go through `image_processor`, a
    `SegformerImageProcessorPil` with `do_reduce_labels=False` (resize to its `size` — nearest for masks, so the
    ignore index 255 stays 255 —, rescale, normalise; for 1 channel a 3-value mean/std is averaged). A batch without
    masks gives no `labels`.
    """
    if getattr(image_processor, "do_reduce_labels", False):
        raise ValueError(
            "The image processor has do_reduce_labels=True, which would shift every class id and turn background "
            "into the ignore index; scene masks already use 0 = background. Create it with do_reduce_labels=False."
        )
    mode, processor_kwargs = image_mode_and_processor_kwargs(image_processor, num_channels)

    def transform(batch: dict[str, list]) -> dict[str, torch.Tensor]:
        images = [image if image.mode == mode else image.convert(mode) for image in batch["image"]]
        if "label" not in batch:
            return {"pixel_values": image_processor(images, return_tensors="pt", **processor_kwargs)["pixel_values"]}
        masks = [_mask_array(mask, index) for index, mask in enumerate(batch["label"])]
        for index, (image, mask) in enumerate(zip(images, masks)):
            if mask.shape != (image.height, image.width):
                raise ValueError(
                    f"Image {index} is {image.width}x{image.height} px but its mask is "
                    f"{mask.shape[1]}x{mask.shape[0]}: a mask labels its image's pixels one to one."
                )
        processed = image_processor(images, segmentation_maps=masks, return_tensors="pt", **processor_kwargs)
        return {"pixel_values": processed["pixel_values"], "labels": processed["labels"].long()}

    return transform


def segmentation_collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack transformed examples into `{"pixel_values": (batch, C, H, W), "labels": (batch, H, W) int64}`."""
    batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}
    if "labels" in examples[0]:
        batch["labels"] = torch.stack([torch.as_tensor(example["labels"]) for example in examples]).long()
    return batch
