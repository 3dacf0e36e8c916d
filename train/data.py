"""Image-classification data for the training scripts: loading, splits, translated canvases and transforms.

`load_classification_splits(name)` returns a `datasets.DatasetDict` with splits `train`, `validation` and `test`,
each with an `image` column (PIL image) and a `label` column (`datasets.ClassLabel`). `name` is one of:

- `"fashion_mnist"`: Fashion-MNIST (Xiao et al. 2017) read from the IDX files of the Debian package
  `dataset-fashion-mnist` (no network): 28x28 grayscale, 10 classes, 60,000 train + 10,000 test images. The
  validation split (5,000 by default, stratified) is carved out of the 60,000 training images.
- `"translated_fashion_mnist"`: Translated Fashion-MNIST, the translated-MNIST protocol of the spatial-transformer
  (Jaderberg et al. 2015) and recurrent-attention (Mnih et al. 2014) papers applied to Fashion-MNIST: each 28x28 item
  is pasted at a uniformly random position where it fits on a black 64x64 canvas, with placements drawn from a fixed
  seed per split (`PLACEMENT_SEEDS`), so every model sees the same test set. Extra columns `top` and `left` hold the
  placement.
- `"cluttered_translated_fashion_mnist"`: Cluttered Translated Fashion-MNIST, a data set composed here after the
  cluttered translated MNIST of the recurrent-attention paper (Mnih et al. 2014): the translated canvases above (same
  items, same placements), each also carrying `CLUTTER_FRAGMENTS` fragments of `CLUTTER_FRAGMENT_SIZE` px cut from
  other items of the same split and dropped at random positions (`add_clutter`; fragments and positions drawn from a
  fixed seed per split, `CLUTTER_SEEDS`). Clutter looks like item texture, so a region's pixel statistics no longer
  say whether it holds the item.
- `"textured_translated_fashion_mnist"`: Textured Translated Fashion-MNIST, a data set composed here after the
  MNIST-back-image protocol of Larochelle et al. (ICML 2007): the translated canvases above (same items, same
  placements), each on a random crop of a grey photo or texture that ships inside scikit-image instead of black
  (`add_texture_background`). Training and validation backgrounds come from `TRAIN_BACKGROUNDS`, test backgrounds
  from `TEST_BACKGROUNDS` (photos never seen in training); crops are drawn from a fixed seed per split
  (`TEXTURE_SEEDS`), and `background_contrast` scales the backgrounds to `[0, contrast]` of the pixel range. Here a
  region's pixel statistics mislead: texture is as busy as cloth. Needs scikit-image (a dependency of `make test`).
- `"sparse_translated_fashion_mnist"`: Sparse Translated Fashion-MNIST, the sparse high-resolution bench composed
  here: each 28x28 item is upscaled `SPARSE_ITEM_SCALE` = 2 times (nearest neighbour, to 56x56) and pasted at a
  uniformly random position where it fits on a black 192x192 canvas, with placements drawn from their own fixed seed
  per split (`SPARSE_SEEDS`); extra columns `top` and `left` as above. It is
  the case where detail covers a small share of a large image, where more than two token scales pay: an item covers
  about 8.5 % of the canvas (56^2 / 192^2), so most regions are empty at every scale. Canvases are stored raw (37 KB
  each): about 2.0 GB for the 55,000 training canvases, 2.6 GB for the three splits.
- `"imagefolder:<dir>"`: a local folder read by `datasets`' `imagefolder` builder (one sub-folder per class,
  optionally under `train/`, `validation/`, `test/`); missing validation/test splits are carved out of train.
- any other string: a Hub data set id (or a local data set folder) loaded with `datasets.load_dataset`, e.g.
  `"zalando-datasets/fashion_mnist"` when online. The image column (a `datasets.Image` feature) and the label column
  (`label` or `labels`) are detected and renamed to `image` / `label`.

`make_transforms(image_processor, train=...)` gives the function to pass to `dataset.with_transform`; it returns
`pixel_values` (float tensor, `(batch, num_channels, height, width)`) and `labels` (int64), which `collate_fn`
stacks into a batch for a `DataLoader` or `Trainer`.
"""

import gzip
import hashlib
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
import pyarrow as pa
import torch


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (count, rows, columns)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (count)
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# Placement seeds of the translated canvases, one per split and independent of the validation-split seed, so the
# test canvases are the same for every model and run.
PLACEMENT_SEEDS = {"train": 0, "validation": 1, "test": 2}
CLUTTER_SEEDS = {"train": 10, "validation": 11, "test": 12}
CLUTTER_FRAGMENTS = 6
CLUTTER_FRAGMENT_SIZE = 12
# Textured canvases: backgrounds are grey crops of photos and textures shipped in scikit-image (`skimage.data`);
# the test split's photos are never used in training or validation.
TRAIN_BACKGROUNDS = ("brick", "grass", "gravel", "camera", "astronaut", "coffee", "page")
TEST_BACKGROUNDS = ("chelsea", "rocket", "text", "coins", "moon")
TEXTURE_SEEDS = {"train": 20, "validation": 21, "test": 22}
TEXTURE_CROP_SCALE = (0.25, 1.0)
# Sparse high-resolution canvases: items upscaled by an integer factor (nearest neighbour), on their own placements.
SPARSE_ITEM_SCALE = 2
SPARSE_SEEDS = {"train": 30, "validation": 31, "test": 32}
TRANSLATED_DATASETS = (
    "translated_fashion_mnist",
    "cluttered_translated_fashion_mnist",
    "textured_translated_fashion_mnist",
    "sparse_translated_fashion_mnist",
)
# Each translated data set's canvas side in px (the default of `load_classification_splits`).
CANVAS_SIZES = {name: 64 for name in TRANSLATED_DATASETS} | {"sparse_translated_fashion_mnist": 192}
# Translated data sets composed on the canvases of another (same items, same placements, plus clutter or a
# background): the data set of their clean canvases, whose regions with content are the item's.
CLEAN_CANVASES = {
    "cluttered_translated_fashion_mnist": "translated_fashion_mnist",
    "textured_translated_fashion_mnist": "translated_fashion_mnist",
}
VALIDATION_SPLIT_NAMES = ("validation", "valid", "val")
LABEL_COLUMN_NAMES = ("label", "labels")


class FashionMNISTNotFoundError(FileNotFoundError):
    """The Fashion-MNIST IDX files are missing; the message says how to get them."""


# ----------------------------------------------------------------------------------------------------------------
# Fashion-MNIST from IDX files


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Parse an IDX file (gzip-compressed or not) into a read-only numpy array of the shape its header gives.

    The header is a big-endian magic number `0x0000TTDD` (`TT` the element type, `DD` the number of dimensions)
    followed by one big-endian int32 per dimension. Raises `ValueError` on a bad magic number, on a magic number other
    than `expected_magic`, or on a payload whose size does not match the header.
    """
    path = Path(path)
    with path.open("rb") as file:
        data = file.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4:
        raise ValueError(f"{path} is not an IDX file: only {len(data)} bytes.")
    magic = int.from_bytes(data[:4], "big")
    type_code, ndim = data[2], data[3]
    if data[:2] != b"\x00\x00" or type_code not in IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path} is not an IDX file: bad magic number 0x{magic:08x}.")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"{path}: IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}.")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"{path}: truncated IDX header.")
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[type_code])
    expected_bytes = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header_size != expected_bytes:
        raise ValueError(
            f"{path}: the header gives shape {shape} ({expected_bytes} bytes of data) but the file holds "
            f"{len(data) - header_size} bytes after the header."
        )
    return np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)


def _fashion_mnist_paths(split: str, data_dir: str | Path | None) -> tuple[Path, Path]:
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(FASHION_MNIST_FILES)}, got {split!r}.")
    folder = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    paths = tuple(folder / name for name in FASHION_MNIST_FILES[split])
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FashionMNISTNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with "
            "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; the files go to "
            f"{FASHION_MNIST_DIR}), or pass `data_dir` pointing at a folder with the four *-ubyte.gz IDX files, or, "
            f"when online, pass `--dataset {FASHION_MNIST_HUB_ID}` to load the same data from the Hugging Face Hub."
        )
    return paths


def load_fashion_mnist_arrays(split: str, data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as numpy arrays: images `(N, 28, 28)` uint8 and labels `(N,)` int64 (N = 60,000 or 10,000).

    `split` is `"train"` or `"test"`; `data_dir` defaults to `FASHION_MNIST_DIR` (the Debian package's folder).
    """
    images_path, labels_path = _fashion_mnist_paths(split, data_dir)
    images = read_idx(images_path, expected_magic=IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, expected_magic=IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels.")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{labels_path}: label {labels.max()} out of range for {len(FASHION_MNIST_CLASSES)} classes.")
    return images, labels.astype(np.int64)


def _pnm_header(shape: tuple[int, ...]) -> bytes:
    """The header of a raw binary PGM (`(H, W)`) or PPM (`(H, W, 3)`) image of 8-bit values."""
    if len(shape) == 2:
        magic = b"P5"
    elif len(shape) == 3 and shape[2] == 3:
        magic = b"P6"
    else:
        raise ValueError(f"Cannot encode an array of shape {shape} as PGM/PPM.")
    return b"%s\n%d %d\n255\n" % (magic, shape[1], shape[0])


def _encode_pnm(array: np.ndarray) -> bytes:
    """Raw binary PGM (2-D uint8) or PPM (`(H, W, 3)` uint8) bytes: no compression, so encoding costs nothing."""
    return _pnm_header(array.shape) + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _pnm_records(num: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A `(num, record_size)` uint8 buffer of `num` black PGM/PPM images of `shape` (header included) and the
    `(num, *shape)` view of their pixels, to be filled in place."""
    header = np.frombuffer(_pnm_header(shape), dtype=np.uint8)
    records = np.zeros((num, len(header) + int(np.prod(shape))), dtype=np.uint8)
    records[:, : len(header)] = header
    return records, records[:, len(header) :].reshape(num, *shape)


def _image_column(records: np.ndarray) -> pa.ChunkedArray:
    """`datasets.Image` storage over a `_pnm_records` buffer, without copying it (chunks stay under Arrow's 2 GiB
    limit for a binary array)."""
    num, record_size = records.shape
    rows_per_chunk = max(1, (2**31 - 1) // record_size)
    chunks = []
    for start in range(0, num, rows_per_chunk):
        part = records[start : start + rows_per_chunk]
        offsets = (np.arange(len(part) + 1, dtype=np.int64) * record_size).astype(np.int32)
        data = pa.Array.from_buffers(pa.binary(), len(part), [None, pa.py_buffer(offsets), pa.py_buffer(part)])
        chunks.append(
            pa.StructArray.from_arrays([data, pa.nulls(len(part), type=pa.string())], names=["bytes", "path"])
        )
    return pa.chunked_array(chunks, type=datasets.Image().pa_type)


def _decode_image(data: bytes | None, path: str | None) -> np.ndarray:
    """A stored `datasets.Image` as a uint8 array (`(H, W)` for "L", `(H, W, 3)` otherwise).

    The raw PGM/PPM bytes written by `_encode_pnm` are read with numpy (about 1 us); anything else goes through PIL.
    """
    if data is not None and data[:3] in (b"P5\n", b"P6\n"):
        parts = data.split(b"\n", 3)
        if len(parts) == 4 and parts[2] == b"255":
            width, height = (int(value) for value in parts[1].split())
            channels = 1 if parts[0] == b"P5" else 3
            if len(parts[3]) == width * height * channels:
                array = np.frombuffer(parts[3], dtype=np.uint8)
                return array.reshape((height, width) if channels == 1 else (height, width, 3))
    image = PIL.Image.open(io.BytesIO(data) if data is not None else path)
    return np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"))


def _image_array(arrays: Sequence[bytes]) -> pa.StructArray:
    """Arrow storage of a `datasets.Image` column holding the given encoded images (`{"bytes", "path"}` structs)."""
    return pa.StructArray.from_arrays(
        [pa.array(arrays, type=pa.binary()), pa.nulls(len(arrays), type=pa.string())], names=["bytes", "path"]
    )


def _in_memory_dataset(
    columns: dict[str, pa.Array], features: datasets.Features, split: str | None, fingerprint_parts: Sequence[Any]
) -> datasets.Dataset:
    """A `datasets.Dataset` over Arrow columns, with a fingerprint hashed from `fingerprint_parts` instead of from
    the data (hashing hundreds of MB of canvases would cost seconds)."""
    fingerprint = hashlib.sha256(repr(tuple(fingerprint_parts)).encode()).hexdigest()[:16]
    table = pa.table(columns).cast(features.arrow_schema)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features), split=split, fingerprint=fingerprint)


def load_fashion_mnist(split: str, data_dir: str | Path | None = None) -> datasets.Dataset:
    """Fashion-MNIST from the IDX files of the Debian package `dataset-fashion-mnist`.

    Columns: `image` (PIL image, mode "L", 28x28) and `label` (`ClassLabel` with `FASHION_MNIST_CLASSES`).
    `split` is `"train"` (60,000 rows) or `"test"` (10,000 rows). Images are stored as raw PGM bytes, so building the
    60,000-row data set takes about half a second and needs no cache.
    """
    images, labels = load_fashion_mnist_arrays(split, data_dir)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(FASHION_MNIST_CLASSES))}
    )
    content_hash = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    records, pixels = _pnm_records(len(images), images.shape[1:])
    pixels[:] = images
    return _in_memory_dataset(
        {"image": _image_column(records), "label": pa.array(labels)},
        features,
        split,
        ("fashion_mnist", split, content_hash),
    )


# ----------------------------------------------------------------------------------------------------------------
# Translated canvases and splits


def translate_to_canvas(
    dataset: datasets.Dataset,
    canvas_size: int = 64,
    seed: int = 0,
    *,
    image_column: str = "image",
    item_scale: int = 1,
) -> datasets.Dataset:
    """Paste every image at a uniformly random position where it fits on a black `canvas_size` square canvas.

    This is the translated-MNIST protocol (Jaderberg et al. 2015; Mnih et al. 2014). Placements come from
    `numpy.random.default_rng(seed)`: item `i` gets `top[i]` in `0 .. canvas_size - height` and `left[i]` in
    `0 .. canvas_size - width` (0..36 for 28x28 items on 64x64), so the same data set and seed give identical canvases.
    `item_scale` > 1 first upscales every item by that integer factor, nearest neighbour (height, width and the
    placement ranges are then the upscaled item's: 0..136 for 28x28 items scaled 2x on 192x192).

    Returns a new in-memory data set with the same columns, `image` replaced by the canvas (PIL, same mode: "L" stays
    "L", anything else becomes "RGB") and two int32 columns `top`, `left` (the item's top-left corner on the canvas).
    Canvases are built eagerly with numpy and stored as raw PGM/PPM bytes (under a second and 226 MB for 55,000 28x28
    items on 64x64; 2.0 GB for 55,000 56x56 items on 192x192), so the result composes with any later `with_transform`.
    """
    if not (isinstance(item_scale, int) and item_scale >= 1):
        raise ValueError(f"item_scale must be a positive integer, got {item_scale!r}.")
    stored = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    stored = stored.with_format("arrow")[:][image_column].combine_chunks()
    items = [
        _decode_image(data, path)
        for data, path in zip(stored.field("bytes").to_pylist(), stored.field("path").to_pylist())
    ]
    if item_scale > 1:
        # nearest neighbour: every pixel becomes an `item_scale` square block, so pixel values stay exact (no
        # interpolated values) and a region's content is the item's
        items = [item.repeat(item_scale, axis=0).repeat(item_scale, axis=1) for item in items]
    heights = np.array([item.shape[0] for item in items], dtype=np.int64)
    widths = np.array([item.shape[1] for item in items], dtype=np.int64)
    if len(items) and (heights.max() > canvas_size or widths.max() > canvas_size):
        raise ValueError(
            f"Items up to {heights.max()}x{widths.max()} px do not fit on a {canvas_size}x{canvas_size} canvas."
        )
    rng = np.random.default_rng(seed)
    tops = rng.integers(0, canvas_size - heights + 1) if len(items) else heights
    lefts = rng.integers(0, canvas_size - widths + 1) if len(items) else widths

    shapes = {item.shape for item in items}
    if len(shapes) == 1:  # the usual case: one buffer for all canvases, filled in place
        item_shape = shapes.pop()
        records, canvases = _pnm_records(len(items), (canvas_size, canvas_size, *item_shape[2:]))
        height, width = item_shape[:2]
        for canvas, item, top, left in zip(canvases, items, tops.tolist(), lefts.tolist()):
            canvas[top : top + height, left : left + width] = item
        image_storage = _image_column(records)
    else:
        encoded = []
        for item, top, left in zip(items, tops.tolist(), lefts.tolist()):
            canvas = np.zeros((canvas_size, canvas_size, *item.shape[2:]), dtype=np.uint8)
            canvas[top : top + item.shape[0], left : left + item.shape[1]] = item
            encoded.append(_encode_pnm(canvas))
        image_storage = _image_array(encoded)

    rest = dataset.remove_columns([image_column, *(name for name in ("top", "left") if name in dataset.features)])
    rest_table = rest.with_format("arrow")[:]
    columns = {
        image_column: image_storage,
        **{name: rest_table.column(name) for name in rest_table.column_names},
        "top": pa.array(tops.astype(np.int32)),
        "left": pa.array(lefts.astype(np.int32)),
    }
    features = datasets.Features(
        {
            image_column: datasets.Image(),
            **rest.features,
            "top": datasets.Value("int32"),
            "left": datasets.Value("int32"),
        }
    )
    scale = () if item_scale == 1 else (item_scale,)  # unscaled canvases keep the fingerprint they always had
    return _in_memory_dataset(
        columns, features, dataset.split, ("translate_to_canvas", dataset._fingerprint, canvas_size, seed, *scale)
    )


def _decoded_canvases(dataset: datasets.Dataset) -> np.ndarray:
    """The `image` column of a data set of equal-sized images as one uint8 array `(N, H, W[, 3])`."""
    stored = dataset.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
    stored = stored.with_format("arrow")[:]["image"].combine_chunks()
    return np.stack([_decode_image(data, None) for data in stored.field("bytes").to_pylist()])


def _with_new_images(dataset: datasets.Dataset, records: np.ndarray, transform: tuple) -> datasets.Dataset:
    """`dataset` with its `image` column replaced by the `_pnm_records` buffer `records`, every other column kept;
    fingerprinted from the source's fingerprint and `transform` (the function's name and arguments)."""
    rest = dataset.remove_columns(["image"])
    rest_table = rest.with_format("arrow")[:]
    columns = {"image": _image_column(records), **{name: rest_table.column(name) for name in rest_table.column_names}}
    features = datasets.Features({"image": datasets.Image(), **rest.features})
    name, *arguments = transform
    return _in_memory_dataset(columns, features, dataset.split, (name, dataset._fingerprint, *arguments))


def add_clutter(
    dataset: datasets.Dataset,
    seed: int,
    num_fragments: int = CLUTTER_FRAGMENTS,
    fragment_size: int = CLUTTER_FRAGMENT_SIZE,
    item_size: int = 28,
) -> datasets.Dataset:
    """Translated canvases (`translate_to_canvas` output, grayscale) with `num_fragments` square fragments of
    `fragment_size` px each, cut from the items of other canvases of the same data set and pasted at uniformly random
    positions (pixel-wise maximum, so a fragment over the item brightens it and never darkens it).

    The clutter protocol of Mnih et al. (2014). Every draw comes from `numpy.random.default_rng(seed)`: for each
    fragment the source canvas (never the canvas itself), the crop inside the source item (kept `(item_size -
    fragment_size) // 4` px off its edges, where an item is mostly cloth) and the destination. Other columns, `top`
    and `left` included (the clean item's placement), are kept.
    """
    num = len(dataset)
    if num < 2:
        raise ValueError(f"Clutter is cut from other canvases: need at least 2 images, got {num}.")
    canvases = _decoded_canvases(dataset)
    if canvases.ndim != 3:
        raise ValueError(f"add_clutter expects grayscale canvases, got arrays of shape {canvases.shape[1:]}.")
    positions = dataset.with_format("numpy").select_columns(["top", "left"])[:]
    canvas_size = canvases.shape[1]
    rng = np.random.default_rng(seed)
    sources = (np.arange(num)[:, None] + rng.integers(1, num, size=(num, num_fragments))) % num
    margin = (item_size - fragment_size) // 4
    crops = rng.integers(margin, item_size - fragment_size - margin + 1, size=(num, num_fragments, 2))
    destinations = rng.integers(0, canvas_size - fragment_size + 1, size=(num, num_fragments, 2))
    records, cluttered = _pnm_records(num, canvases.shape[1:])
    cluttered[:] = canvases
    images = np.arange(num)[:, None, None]
    offsets = np.arange(fragment_size)
    for fragment in range(num_fragments):  # one fragment per canvas at a time: vectorised over canvases
        source = sources[:, fragment, None, None]
        rows = (positions["top"][sources[:, fragment]] + crops[:, fragment, 0])[:, None, None] + offsets[:, None]
        cols = (positions["left"][sources[:, fragment]] + crops[:, fragment, 1])[:, None, None] + offsets
        to_rows = destinations[:, fragment, 0, None, None] + offsets[:, None]
        to_cols = destinations[:, fragment, 1, None, None] + offsets
        window = cluttered[images, to_rows, to_cols]
        cluttered[images, to_rows, to_cols] = np.maximum(window, canvases[source, rows, cols])
    return _with_new_images(dataset, records, ("add_clutter", seed, num_fragments, fragment_size))


def background_photos(names: Sequence[str]) -> list[np.ndarray]:
    """The scikit-image photos `names` (e.g. `"brick"`) as grey float arrays in [0, 1] (min-max scaled per photo).

    Raises `ImportError` saying how to install scikit-image, which ships them, when it is missing."""
    try:
        from skimage import data as skimage_data
    except ImportError as error:
        raise ImportError(
            "The textured canvases' backgrounds are photos shipped inside scikit-image: `pip install scikit-image` "
            "(pinned in requirements.txt)."
        ) from error
    photos = []
    for name in names:
        photo = np.asarray(getattr(skimage_data, name)(), dtype=np.float64)
        if photo.ndim == 3:  # RGB(A): ITU-R 601 luma, as PIL's "L" conversion
            photo = photo[..., :3] @ np.array([0.299, 0.587, 0.114])
        low, high = photo.min(), photo.max()
        photos.append((photo - low) / (high - low))
    return photos


def add_texture_background(
    dataset: datasets.Dataset,
    seed: int,
    photos: Sequence[np.ndarray],
    contrast: float = 1.0,
    crop_scale: tuple[float, float] = TEXTURE_CROP_SCALE,
) -> datasets.Dataset:
    """Translated canvases (`translate_to_canvas` output, grayscale) on photo backgrounds instead of black: the
    MNIST-back-image protocol (Larochelle et al. 2007).

    For every canvas, drawn from `numpy.random.default_rng(seed)`: a photo of `photos` (grey, values in [0, 1]), a
    square crop whose side is a uniform fraction in `crop_scale` of the photo's shorter side (and never shorter than
    the canvas), at a uniformly random position, resized to the canvas (area average). The crop is scaled to
    `[0, contrast]` of the pixel range, and every item pixel above 0 replaces it (the item keeps its exact values).
    Other columns, `top` and `left` included, are kept, so the item's regions are those of the clean canvas; a
    `background` column holds the index in `photos` of each canvas's photo.
    """
    if not 0.0 < contrast <= 1.0:
        raise ValueError(f"background_contrast must lie in (0, 1], got {contrast}.")
    low_scale, high_scale = crop_scale
    if not 0.0 < low_scale <= high_scale <= 1.0:
        raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {crop_scale}.")
    if not photos:
        raise ValueError("add_texture_background needs at least one background photo.")
    canvases = _decoded_canvases(dataset)
    if canvases.ndim != 3 or canvases.shape[1] != canvases.shape[2]:
        raise ValueError(f"add_texture_background expects square grayscale canvases, got {canvases.shape[1:]}.")
    num, canvas_size = len(canvases), canvases.shape[1]
    rng = np.random.default_rng(seed)
    choices = rng.integers(0, len(photos), size=num)
    scales = rng.uniform(low_scale, high_scale, size=num)
    corners = rng.uniform(0.0, 1.0, size=(num, 2))
    pil_photos = [PIL.Image.fromarray(photo.astype(np.float32), mode="F") for photo in photos]
    records, textured = _pnm_records(num, canvases.shape[1:])
    for index in range(num):
        photo = photos[choices[index]]
        side = max(canvas_size, round(scales[index] * min(photo.shape)))
        side = min(side, min(photo.shape))
        top = int(corners[index, 0] * (photo.shape[0] - side + 1))
        left = int(corners[index, 1] * (photo.shape[1] - side + 1))
        crop = pil_photos[choices[index]].resize(
            (canvas_size, canvas_size), PIL.Image.Resampling.BOX, box=(left, top, left + side, top + side)
        )
        background = np.rint(np.asarray(crop) * (255 * contrast)).clip(0, 255).astype(np.uint8)
        textured[index] = np.where(canvases[index] > 0, canvases[index], background)
    photo_hash = hashlib.sha256(b"".join(photo.tobytes() for photo in photos)).hexdigest()[:16]
    composed = _with_new_images(
        dataset, records, ("add_texture_background", seed, photo_hash, contrast, tuple(crop_scale))
    )
    return composed.add_column("background", choices.tolist())


def train_validation_split(
    dataset: datasets.Dataset,
    validation_size: int | float = 5000,
    seed: int = 0,
    *,
    label_column: str = "label",
    stratify: bool = True,
) -> datasets.DatasetDict:
    """Split `dataset` into `train` and `validation` (`validation_size` rows, or that fraction if a float).

    Deterministic for a given seed; both parts keep the original row order. Stratified by `label_column` when it is
    a `ClassLabel` (each class gets its share of the validation rows, rounded by largest remainder), plain random
    otherwise.
    """
    num_rows = len(dataset)
    if isinstance(validation_size, float):
        if not 0.0 < validation_size < 1.0:
            raise ValueError(f"A fractional validation_size must be in (0, 1), got {validation_size}.")
        validation_size = max(1, round(validation_size * num_rows))
    if not 0 < validation_size < num_rows:
        raise ValueError(
            f"validation_size must be between 1 and {num_rows - 1} (the split's size), got {validation_size}."
        )
    rng = np.random.default_rng(seed)
    if stratify and isinstance(dataset.features.get(label_column), datasets.ClassLabel):
        labels = dataset.with_format("arrow")[:][label_column].to_numpy()
        classes, counts = np.unique(labels, return_counts=True)
        shares = counts * validation_size / num_rows
        quotas = np.floor(shares).astype(np.int64)
        remainder_order = np.argsort(-(shares - quotas), kind="stable")
        quotas[remainder_order[: validation_size - quotas.sum()]] += 1
        validation_indices = np.concatenate(
            [rng.permutation(np.flatnonzero(labels == label))[:quota] for label, quota in zip(classes, quotas)]
        )
    else:
        validation_indices = rng.permutation(num_rows)[:validation_size]
    is_validation = np.zeros(num_rows, dtype=bool)
    is_validation[validation_indices] = True
    return datasets.DatasetDict(
        {
            "train": dataset.select(np.flatnonzero(~is_validation), keep_in_memory=True),
            "validation": dataset.select(np.flatnonzero(is_validation), keep_in_memory=True),
        }
    )


def subsample(dataset: datasets.Dataset, max_samples: int | None, seed: int = 0) -> datasets.Dataset:
    """A fixed random subset of `max_samples` rows (in their original order), or `dataset` itself if it is smaller."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    if max_samples <= 0:
        raise ValueError(f"max_samples must be positive, got {max_samples}.")
    indices = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:max_samples])
    return dataset.select(indices, keep_in_memory=True)


def image_column_of(features: datasets.Features, name: str, exclude: str | None = None) -> str:
    """The data set's image column: `image`, else its only `datasets.Image` feature (other than `exclude`, e.g. a
    segmentation mask); a `ValueError` that lists the columns otherwise."""
    image_columns = [
        column for column, feature in features.items() if isinstance(feature, datasets.Image) and column != exclude
    ]
    if "image" in image_columns:
        return "image"
    if len(image_columns) == 1:
        return image_columns[0]
    found = f"several ({', '.join(image_columns)})" if image_columns else "none"
    besides = f" besides {exclude!r}" if exclude else ""
    raise ValueError(
        f"Data set {name!r} needs exactly one image column{besides} (a `datasets.Image` feature), found {found}; "
        f"columns: {list(features)}."
    )


def _standardize_columns(dataset: datasets.Dataset, name: str) -> datasets.Dataset:
    """Keep only the image and label columns, renamed to `image` and `label`."""
    features = dataset.features
    image_column = image_column_of(features, name)
    label_column = next((column for column in LABEL_COLUMN_NAMES if column in features), None)
    if label_column is None:
        raise ValueError(
            f"Data set {name!r} has no label column (one of {', '.join(LABEL_COLUMN_NAMES)}); "
            f"columns: {list(features)}."
        )
    label_feature = features[label_column]
    if not (
        isinstance(label_feature, datasets.ClassLabel)
        or (isinstance(label_feature, datasets.Value) and "int" in label_feature.dtype)
    ):
        raise ValueError(
            f"Data set {name!r}: label column {label_column!r} must hold integer class ids, got {label_feature}."
        )
    dataset = dataset.select_columns([image_column, label_column])
    return dataset.rename_columns(
        {old: new for old, new in ((image_column, "image"), (label_column, "label")) if old != new}
    )


def _three_splits(raw: datasets.DatasetDict, name: str, validation_size: int | float, seed: int) -> dict:
    """train/validation/test from the splits `raw` has; a missing test or validation split is carved from train."""
    if "train" not in raw:
        raise ValueError(f"Data set {name!r} has no train split (splits: {list(raw)}).")
    splits = {split: _standardize_columns(dataset, name) for split, dataset in raw.items()}
    train = splits["train"]
    test = splits.get("test")
    validation = next((splits[split] for split in VALIDATION_SPLIT_NAMES if split in splits), None)
    if test is None:
        parts = train_validation_split(train, validation_size, seed)
        train, test = parts["train"], parts["validation"]
    if validation is None:
        parts = train_validation_split(train, validation_size, seed)
        train, validation = parts["train"], parts["validation"]
    return {"train": train, "validation": validation, "test": test}


def load_classification_splits(
    dataset: str,
    *,
    validation_size: int | float = 5000,
    seed: int = 0,
    canvas_size: int | None = None,
    background_contrast: float = 1.0,
    data_dir: str | Path | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    cache_dir: str | Path | None = None,
) -> datasets.DatasetDict:
    """Splits `train`, `validation`, `test` with columns `image` (PIL) and `label` (`ClassLabel` or int).

    `dataset`: `"fashion_mnist"`, one of `TRANSLATED_DATASETS` (the translated canvases, clean, cluttered, textured
    or sparse; they add `top`, `left`), `"imagefolder:<dir>"` or a Hub id (see the module docstring).
    `validation_size` rows (or that fraction) are carved from train with `seed` when the data set has no validation
    split (and likewise for a missing test split). `canvas_size` applies to the translated data sets (None: each one's
    own, `CANVAS_SIZES`: 64 px, 192 px for the sparse set), `background_contrast` to the textured one, `data_dir` to
    the Fashion-MNIST IDX folder, `cache_dir` to `datasets.load_dataset`.
    `max_train_samples` / `max_eval_samples` keep a fixed random subset (seeded by `seed`) of train / of validation
    and test, taken after translation so that a subset's canvases are those of the full split.
    """
    cache_dir = None if cache_dir is None else str(cache_dir)
    if dataset in ("fashion_mnist", *TRANSLATED_DATASETS):
        parts = train_validation_split(load_fashion_mnist("train", data_dir), validation_size, seed)
        splits = {
            "train": parts["train"],
            "validation": parts["validation"],
            "test": load_fashion_mnist("test", data_dir),
        }
        if canvas_size is None and dataset in TRANSLATED_DATASETS:
            canvas_size = CANVAS_SIZES[dataset]
        if dataset == "sparse_translated_fashion_mnist":
            splits = {
                split: translate_to_canvas(part, canvas_size, seed=SPARSE_SEEDS[split], item_scale=SPARSE_ITEM_SCALE)
                for split, part in splits.items()
            }
        elif dataset in TRANSLATED_DATASETS:
            splits = {
                split: translate_to_canvas(part, canvas_size, seed=PLACEMENT_SEEDS[split])
                for split, part in splits.items()
            }
        if dataset == "cluttered_translated_fashion_mnist":
            splits = {split: add_clutter(part, seed=CLUTTER_SEEDS[split]) for split, part in splits.items()}
        if dataset == "textured_translated_fashion_mnist":
            photos = {"train": background_photos(TRAIN_BACKGROUNDS), "test": background_photos(TEST_BACKGROUNDS)}
            splits = {
                split: add_texture_background(
                    part, TEXTURE_SEEDS[split], photos["test" if split == "test" else "train"], background_contrast
                )
                for split, part in splits.items()
            }
    elif dataset.startswith("imagefolder:"):
        folder = Path(dataset.removeprefix("imagefolder:")).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"imagefolder data set: {folder} is not a folder.")
        raw = datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=cache_dir)
        splits = _three_splits(raw, dataset, validation_size, seed)
    else:
        try:
            raw = datasets.load_dataset(dataset, cache_dir=cache_dir)
        except ConnectionError as error:
            raise ConnectionError(
                f"Could not load {dataset!r} from the Hugging Face Hub ({error}). Offline, use `fashion_mnist` or "
                "`translated_fashion_mnist` (Debian package `dataset-fashion-mnist`) or `imagefolder:<dir>`."
            ) from error
        if isinstance(raw, datasets.Dataset):
            raw = datasets.DatasetDict({"train": raw})
        splits = _three_splits(raw, dataset, validation_size, seed)
    splits["train"] = subsample(splits["train"], max_train_samples, seed)
    splits["validation"] = subsample(splits["validation"], max_eval_samples, seed)
    splits["test"] = subsample(splits["test"], max_eval_samples, seed)
    return datasets.DatasetDict(splits)


def class_names(dataset: datasets.Dataset | datasets.DatasetDict) -> list[str]:
    """The label names of a data set's `label` column (`ClassLabel`), e.g. to build `id2label`."""
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"]
    feature = dataset.features["label"]
    if not isinstance(feature, datasets.ClassLabel):
        raise ValueError(f"The label column is {feature}, not a ClassLabel: it has no class names.")
    return list(feature.names)


# ----------------------------------------------------------------------------------------------------------------
# Transforms


def _single_channel(values: Any) -> Any:
    """A per-channel mean/std for 1 channel: 3 values are averaged, a scalar or 1 value is kept."""
    if values is None or np.isscalar(values) or len(values) == 1:
        return values
    return [float(np.mean(values))]


def image_mode_and_processor_kwargs(image_processor: Any, num_channels: int) -> tuple[str, dict]:
    """The PIL mode images are converted to for a model of `num_channels` (1 or 3), and the processor call's extra
    arguments: for 1 channel, the processor's 3-value mean/std averaged to one."""
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 or 3, got {num_channels}.")
    if num_channels == 3:
        return "RGB", {}
    kwargs = {
        "image_mean": _single_channel(getattr(image_processor, "image_mean", None)),
        "image_std": _single_channel(getattr(image_processor, "image_std", None)),
    }
    return "L", {key: value for key, value in kwargs.items() if value is not None}


def make_transforms(
    image_processor: Any,
    *,
    train: bool,
    hflip: bool = True,
    num_channels: int = 3,
    generator: torch.Generator | None = None,
) -> Callable[[dict[str, list]], dict[str, torch.Tensor]]:
    """The function to pass to `dataset.with_transform`: a batch `{"image": [PIL], "label": [int]}` becomes
    `{"pixel_values": float tensor (batch, num_channels, height, width), "labels": int64 tensor (batch,)}`.

    Images are converted to "RGB" when `num_channels == 3` or to "L" when it is 1 (the model's `config.num_channels`),
    then go through the Transformers `image_processor` (e.g. `ViTImageProcessorPil`: resize to its `size`, rescale,
    normalise; for 1 channel a 3-value mean/std is averaged). With `train=True` and `hflip`, each image is flipped
    left-right with probability 1/2, drawn from `generator` or torch's global RNG (`torch.manual_seed` makes a run
    reproducible). Evaluation transforms are deterministic. A batch without labels gives no `labels`.
    """
    mode, processor_kwargs = image_mode_and_processor_kwargs(image_processor, num_channels)

    def transform(batch: dict[str, list]) -> dict[str, torch.Tensor]:
        images = [image if image.mode == mode else image.convert(mode) for image in batch["image"]]
        pixel_values = image_processor(images, return_tensors="pt", **processor_kwargs)["pixel_values"]
        if train and hflip:
            flip = torch.rand(len(images), generator=generator) < 0.5
            pixel_values[flip] = pixel_values[flip].flip(-1)
        outputs = {"pixel_values": pixel_values}
        label_column = next((column for column in LABEL_COLUMN_NAMES if column in batch), None)
        if label_column is not None:
            outputs["labels"] = torch.as_tensor(batch[label_column], dtype=torch.long)
        return outputs

    return transform


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack transformed examples into `{"pixel_values": (batch, C, H, W), "labels": (batch,)}`."""
    batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}
    if "labels" in examples[0]:
        batch["labels"] = torch.tensor([int(example["labels"]) for example in examples], dtype=torch.long)
    return batch
