"""Image sources: the built-in digits, image folders, MNIST-style IDX files and local torchvision datasets.

Every source is an `ImageDataset`: item i is (uint8 image [C, H, W], label) after the model's recorded
preprocessing (resize, centre crop) and, where asked, binarization, with label -1 where the source has none. Decoding
and preprocessing happen in `__getitem__`, so DataLoader workers do them in parallel.

A source can be a window of a whole one (`DataConfig.offset` and `limit`): it then holds only those images, and its
image i is image `first + i` of the whole source, which is what error messages name and what a binarization is
keyed by.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vqtok.config import DataConfig, PreprocessConfig
from vqtok.images import pil_to_array, resize_and_crop
from vqtok.seeds import keyed_seed

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
TORCHVISION_NAMES = ("MNIST", "FashionMNIST", "KMNIST", "EMNIST", "QMNIST", "CIFAR10", "CIFAR100")


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded; the message names its path and ends with SKIP_HINT (which the command
    line replaces with its flag)."""


SKIP_HINT = "set data.skip_unreadable: true to skip and count such files"


BINARIZE_STREAM = 0x62696E  # "bin": keys a binarization's generators apart from other per-image draws (flips)


class Source:
    """Random access to the raw images of a source: `load(i)`, `describe(i)` (for error messages), `labels`."""

    labels: list[int]
    skipped: int = 0  # unreadable images left out (skip_unreadable)
    first: int = 0  # image 0 here is image `first` of the whole source (a window: DataConfig.offset)

    def load(self, index: int) -> Image.Image | np.ndarray:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        raise NotImplementedError

    def window(self, start: int, stop: int) -> None:
        """Keep images start .. stop - 1 only: image i becomes what image start + i was."""
        self.labels = self.labels[start:stop]
        self.first += start
        self._keep(slice(start, stop))

    def _keep(self, images: slice) -> None:
        """Keep the `images` slice of whatever holds the images (the labels are already kept)."""
        raise NotImplementedError


class ImageDataset(Dataset):
    """(uint8 [C, H, W], label) pairs from a `Source`, each checked against the size the model trains at.

    `binarize_seed` (not None) binarizes each image once, after preprocessing: a Bernoulli(pixel / 255) draw per
    pixel from a generator keyed by the seed and the image's index in the whole source, the same at every read."""

    def __init__(self, source: Source, *, channels: int, preprocess: PreprocessConfig, size: int | None,
                 binarize_seed: int | None = None, multiple: int = 1):
        self.source = source
        self.channels = channels
        self.preprocess = _resolved(preprocess, size)
        self.size = size
        self.binarize_seed = binarize_seed
        self.multiple = multiple

    @property
    def labels(self) -> list[int]:
        return self.source.labels

    @property
    def skipped(self) -> int:
        return self.source.skipped

    def __len__(self) -> int:
        return len(self.source.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = to_chw(self.source.load(index), self.channels)
        try:
            image = resize_and_crop(image, self.preprocess.resize, self.preprocess.crop, self.multiple)
        except ValueError as e:
            raise ValueError(f"{self.source.describe(index)}: {e}") from None
        if self.size is not None and tuple(image.shape[-2:]) != (self.size, self.size):
            p = self.preprocess
            raise ValueError(
                f"{self.source.describe(index)} is {image.shape[-2]}x{image.shape[-1]} after preprocessing (resize "
                f"{p.resize}, crop {p.crop}), the model trains on {self.size}x{self.size}: leave model.preprocess's "
                "resize and crop out (both then are the model's resolution) or set them to give that size"
            )
        if self.binarize_seed is not None:
            seed = keyed_seed(BINARIZE_STREAM, self.binarize_seed, self.source.first + index)
            image = binarize(image[None], [seed])[0]
        return image, self.source.labels[index]


class WithIndex(Dataset):
    """Items of `dataset` as (image, label, index): for a batch to key per-image randomness by the global index
    (training's flips), or to name the files it came from (the token store's checks)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.dataset[index]
        return image, label, index


def to_chw(image: Image.Image | np.ndarray, channels: int) -> torch.Tensor:
    """PIL image or uint8 HW/HWC array -> uint8 tensor [channels, H, W] (grey <-> RGB converted)."""
    if isinstance(image, Image.Image):
        array = pil_to_array(image, channels)
    else:
        array = image[..., None] if image.ndim == 2 else image
        if array.shape[-1] != channels:
            array = pil_to_array(Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array), channels)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def _resolved(preprocess: PreprocessConfig, size: int | None) -> PreprocessConfig:
    """A model config's preprocessing is resolved; one built alone (sizes left at MODEL_RESOLUTION) takes `size`."""
    if preprocess.resolved:
        return preprocess
    if size is None:
        raise ValueError(f"{preprocess} leaves a size at the model's resolution, which is not known here: pass the "
                         "model config's preprocess (config.preprocess), or give size")
    return preprocess.resolve(size)


def build_dataset(config: DataConfig, *, channels: int, preprocess: PreprocessConfig, size: int | None,
                  multiple: int = 1) -> ImageDataset:
    """The dataset a `DataConfig` describes, ready for a model with `channels` inputs trained at `size` (None: any
    size) whose sides must be multiples of `multiple` (`PixelModel.size_multiple`): the window `offset`, `limit` of
    the source, binarized once where `binarize` is 'once' ('dynamic' is the training loop's: `dynamic_binarize`).
    Images are preprocessed as a model's `preprocess` does (`resize_and_crop`)."""
    builders = {"digits": ArraySource.digits, "folder": FolderSource, "idx": ArraySource.idx,
                "amat": ArraySource.amat, "torchvision": TorchvisionSource}
    source = builders[config.source](config)
    where = f"data source '{config.source}' ({config.path or 'built in'})"
    if not source.labels:
        raise ValueError(f"{where} holds no images")
    if config.offset >= len(source.labels):
        raise ValueError(f"data.offset {config.offset} is beyond the end of {where}, which holds "
                         f"{len(source.labels)} images")
    if config.offset or config.limit is not None:
        stop = None if config.limit is None else config.offset + config.limit
        source.window(config.offset, stop)
    return ImageDataset(source, channels=channels, preprocess=preprocess, size=size, multiple=multiple,
                        binarize_seed=config.binarize_seed if config.binarize == "once" else None)


# ----------------------------------------------------------------------------------------------------------------
# Binarization


def binarize(images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """uint8 images [B, C, H, W] -> binary uint8 images (0 or 255), each pixel 255 with probability pixel / 255.

    Image b's pixels are independent draws from a CPU generator seeded with `seeds[b]` (so an image's draw depends
    on its seed only, not on the batch it is in or on the device); the result is on the images' device."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"binarize takes uint8 images [B, C, H, W], got {images.dtype} {list(images.shape)}")
    if len(seeds) != images.shape[0]:
        raise ValueError(f"binarize: {len(seeds)} seeds for {images.shape[0]} images")
    uniform = torch.empty(images.shape)
    for row, seed in zip(uniform, seeds):
        row.uniform_(generator=torch.Generator().manual_seed(seed))
    ones = uniform.to(images.device) < images.float() / 255  # pixel 0: never; pixel 255: always (uniform < 1)
    return ones.to(torch.uint8) * 255


def dynamic_binarize(images: torch.Tensor, seed: int, step: int, indices: Sequence[int]) -> torch.Tensor:
    """A training batch's binarization (DataConfig.binarize 'dynamic'): image b, the dataset's image `indices[b]`,
    drawn afresh at every step from a generator keyed by (seed, step, index) - the data's `binarize_seed`, the
    optimizer step - so that a run and its resumption draw alike, whatever the batch composition or world size."""
    return binarize(images, [keyed_seed(BINARIZE_STREAM, seed, step, int(index)) for index in indices])


# ----------------------------------------------------------------------------------------------------------------


class ArraySource(Source):
    """Images held in one uint8 array [N, H, W] (or [N, H, W, C])."""

    def __init__(self, images: np.ndarray, labels: list[int], name: str):
        self.images, self.labels, self.name = images, labels, name

    def load(self, index: int) -> np.ndarray:
        return self.images[index]

    def describe(self, index: int) -> str:
        return f"{self.name} image {self.first + index}"

    def _keep(self, images: slice) -> None:
        self.images = self.images[images]

    @classmethod
    def digits(cls, config: DataConfig) -> "ArraySource":
        """scikit-learn's bundled digits (UCI optdigits): 1,797 8x8 images with 17 grey levels, read straight from
        the installed package's data file (scikit-learn itself is not imported). The first 1,500 are 'train', the
        last 297 'test'."""
        spec = importlib.util.find_spec("sklearn")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                "the built-in 'digits' data ships with scikit-learn: pip install 'vqtok[quickstart]' (or scikit-learn)"
            )
        path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        images = np.rint(table[:, :64] * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8)
        labels = table[:, 64].astype(int)
        keep = slice(0, 1500) if config.split == "train" else slice(1500, None)
        return cls(images[keep], labels[keep].tolist(), "digits")

    @classmethod
    def idx(cls, config: DataConfig) -> "ArraySource":
        images = read_idx(config.path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"{config.path}: IDX images must be uint8 [count, rows, cols], got {images.dtype} {images.shape}")
        if config.labels:
            labels = read_idx(config.labels)
            if labels.shape != (images.shape[0],):
                raise ValueError(f"{config.labels}: {labels.shape[0]} labels for {images.shape[0]} images")
            labels = labels.astype(int).tolist()
        else:
            labels = [-1] * images.shape[0]
        return cls(images, labels, str(config.path))

    @classmethod
    def amat(cls, config: DataConfig) -> "ArraySource":
        """Binarized MNIST's .amat files (no labels): pixels 0 or 255, so a Bernoulli likelihood is a code length."""
        images = read_amat(config.path)
        return cls(images, [-1] * len(images), str(config.path))


class FolderSource(Source):
    """An image folder: class sub-folders (sorted names) give labels 0..C-1; images at the top level have -1."""

    def __init__(self, config: DataConfig):
        root = Path(config.path)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        relative = sorted(_image_files(root))
        depth = [len(parts) for parts in relative]
        classes = sorted({parts[0] for parts in relative if len(parts) > 1})
        if classes and 1 in depth:
            raise ValueError(f"{root}: images both at the top level and in class sub-folders; use one layout")
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[parts[0]] if classes else -1 for parts in relative]
        files = [root.joinpath(*parts) for parts in relative]
        if config.skip_unreadable:
            readable = [_readable(p) for p in tqdm(files, desc=f"checking {root.name}", unit="img", leave=False)]
            self.skipped = readable.count(False)
            files = [p for p, ok in zip(files, readable) if ok]
            labels = [lab for lab, ok in zip(labels, readable) if ok]
        self.root, self.files, self.labels, self.classes = root, files, labels, classes

    def load(self, index: int) -> Image.Image:
        return _open_image(self.files[index])

    def describe(self, index: int) -> str:
        return str(self.files[index])

    def _keep(self, images: slice) -> None:
        self.files = self.files[images]


def _image_files(root: Path) -> list[tuple[str, ...]]:
    """Relative paths (as parts) of the image files under root, found with os.scandir (no stat per file).

    A broken symbolic link with an image file's name is listed too: it is an image that cannot be read, reported
    (or skipped and counted) as such rather than left out unseen."""
    found, stack = [], [()]
    while stack:
        prefix = stack.pop()
        with os.scandir(root.joinpath(*prefix)) as entries:
            for entry in entries:
                if entry.is_dir():
                    stack.append((*prefix, entry.name))
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and (
                    entry.is_file() or _is_broken_link(entry.path)
                ):
                    found.append((*prefix, entry.name))
    return found


def _is_broken_link(path: str | Path) -> bool:
    return os.path.islink(path) and not os.path.exists(path)


def _open_image(path: Path) -> Image.Image:
    """The decoded image; any file PIL cannot decode - corrupt, truncated, a broken link, or too many pixels for
    PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) - is an UnreadableImageError naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = f"a broken symbolic link (to {os.readlink(path)})" if _is_broken_link(path) else str(e)
        raise UnreadableImageError(f"cannot read image {path}: {reason} ({SKIP_HINT})") from None


def _readable(path: Path) -> bool:
    try:
        _open_image(path)
        return True
    except UnreadableImageError:
        return False


IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
             0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzip-compressed or not; a malformed file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_TYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(f"{path}: IDX header promises {expected} bytes of data for shape {shape}, found {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(shape).copy()  # writable, native byte order kept by numpy


def read_amat(path: str | Path) -> np.ndarray:
    """Binary images from the .amat text format of Larochelle and Murray's fixed binarization of MNIST (plain or
    .gz): one image a line, its pixels as 0/1 values separated by spaces, square. Returns uint8 [N, side, side] in
    {0, 255}; anything else is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f".amat file not found: {path}")
    with open(path, "rb") as f:
        opener = gzip.open if f.read(2) == b"\x1f\x8b" else open
    try:
        with opener(path, "rt") as f:
            rows = [line.split() for line in f if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable .amat file ({e})") from None
    side = int(round(len(rows[0]) ** 0.5)) if rows else 0
    for number, row in enumerate(rows, 1):
        if len(row) != side * side or side == 0 or any(v not in ("0", "1") for v in row):
            raise ValueError(f"{path}: line {number} is not {side}x{side} binary pixels (0 or 1)")
    return (np.array(rows, dtype=np.uint8).reshape(-1, side, side) * 255).astype(np.uint8)


class TorchvisionSource(Source):
    """A torchvision dataset class read from a local root; never downloaded."""

    def __init__(self, config: DataConfig):
        import torchvision

        if config.name not in TORCHVISION_NAMES:
            raise ValueError(f"data.name must be one of {list(TORCHVISION_NAMES)}, got {config.name!r}")
        kwargs: dict[str, Any] = {"train": config.split == "train", "download": False}
        if config.name == "EMNIST":
            kwargs["split"] = "balanced"
        try:
            self.dataset = getattr(torchvision.datasets, config.name)(config.path, **kwargs)
        except RuntimeError as e:
            raise FileNotFoundError(
                f"torchvision {config.name} not found under {config.path} ({e}); vqtok never downloads data"
            ) from None
        self.name = config.name
        self.labels = [int(t) for t in self.dataset.targets]

    def load(self, index: int) -> Image.Image:
        return self.dataset[index][0]

    def describe(self, index: int) -> str:
        return f"{self.name} image {self.first + index}"

    def _keep(self, images: slice) -> None:
        """The torchvision dataset's own arrays are cut (a view where they are arrays), so that its item i, and
        `data` as the token store hashes it, are the window's."""
        self.dataset.data = self.dataset.data[images]
        self.dataset.targets = self.dataset.targets[images]
