"""The token store: a dataset encoded once by a tokenizer, for priors trained on it many times.

Layout of a store folder:

    manifest.json                 what was encoded with what (tokenizer identity and weight hash, config,
                                  preprocessing, data source and the identity of its inputs, grid, vocabulary,
                                  dtype), and every shard's record
    shards/codes-00000.npy        [n, A, h, w] codes in the smallest integer dtype holding the vocabulary
                                  (uint8/uint16/int32; a residual VQ's [n, A, h, w, R], its R levels last), or
                                  [n, A, C, h, w] float16 latents (posterior mode) for Gaussian tokenizers; A is the
                                  augmentation axis ('none', 'hflip'). The manifest gives the items' shape [A, h, w],
                                  [A, h, w, R] or [A, C, h, w] (`item_shape`) and `grid`, one view's code shape [h, w]
                                  or [h, w, R] (the tokenizer's `code_shape`; for latents [h, w])
    shards/latents-g0-00000.npy   in place of codes-*, for a hierarchical VAE: one file per latent group g (top
    shards/latents-g1-00000.npy   first), [n, A, C_g, h_g, w_g] float16 posterior means (each group's given the means
    ...                           of the groups above, as `encode` gives them); the manifest gives `groups`, every
                                  group's [C_g, h_g, w_g], in place of item_shape and grid
    shards/labels-00000.npy       [n] int64 labels (-1 where the source has none); a class-conditional tokenizer
                                  encodes each image with its label, so its store has every image's
    shards/00000.json             the shard's record (index, start, count, the hash of its inputs, its codes' range,
                                  each file's bytes and sha256, and a hash of the record itself); written last, so its
                                  presence means the shard is complete

Shard s holds the fixed global range [s * shard_size, (s + 1) * shard_size), encoded in fixed batches of
`batch_size` from the shard's start, whatever the world size or resume point: every rank writes its own shards
(s mod W), each through a temporary file and a rename, and re-running with the same arguments on the same inputs
skips complete shards and yields a byte-identical store. Different arguments or changed inputs against an existing
store are an error.

Speed (a GPU): `compile=True` compiles an autoencoder's encoder and quant_conv in place (`nn.Module.compile`; the VQ
search is not compiled), and on CUDA the encoder runs channels_last and the DataLoader pins its batches. Neither
changes what is computed, only the order of float operations: like the device or the thread count, they are not
recorded, and a store may be resumed with or without them (a code can differ only where two codes are equally near
to within float rounding). `precision="bf16"` runs the encoder under bfloat16 autocast: its features, and so its
codes or latents, are not float32's, so the store records it (`args.precision`, absent for float32, the default, as
in stores of older vqtok) and a resume with another precision is refused.

Opening a store checks, without reading the codes: the manifest's structure (shard records 0..S-1 in order, each
starting where the previous ended, each bound to its own file names by the record's hash), the declared kind, dtype,
vocabulary, grid (or groups) and augmentations against one another, the recorded tokenizer and every shard's .npy
headers, and the code range recorded per shard against the vocabulary. Each shard's codes are compared with its
recorded range (latents: checked finite) once, before their first read (or all at once: `check_codes`,
`verify=True`), so no code outside the vocabulary, and no NaN, leaves the store. `verify=True` also checks every
file's sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from tqdm.auto import tqdm

from vqtok.config import DataConfig, to_dict
from vqtok.data.labels import check_batch_labels, check_dataset_labels
from vqtok.data.sources import (
    ArraySource,
    FolderSource,
    ImageDataset,
    TorchvisionSource,
    WithIndex,
    build_dataset,
)
from vqtok.files import staged, write_text_atomically
from vqtok.hub import load, split_revision, weights_sha256
from vqtok.images import uint8_to_range
from vqtok.models import Autoencoder, HierarchicalVAE
from vqtok.version import __version__

Tokenizer = Autoencoder | HierarchicalVAE

FORMAT = "vqtok-token-store"
FORMAT_VERSION = 2  # 2: input identity, per-shard code range and record hash
GROUPS_FORMAT_VERSION = 3  # 3: a hierarchical VAE's latent groups (older vqtok refuses them as a newer format)
AUGMENTATIONS = ("none", "hflip")
PRECISIONS = ("float32", "bf16")  # the encoder's arithmetic: float32, or bfloat16 autocast (recorded: codes differ)


class TokenStoreError(ValueError):
    """A token store that is missing, corrupt, inconsistent, or does not match what it is used with."""


def code_dtype(vocab_size: int) -> np.dtype:
    """The smallest integer dtype that holds codes 0 .. vocab_size - 1."""
    for dtype in (np.uint8, np.uint16):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.int32)


def _array_names(num_groups: int | None) -> list[str]:
    """The names of a shard's arrays (each stored as shards/NAME-SSSSS.npy, before the labels): 'codes' for a store
    of one grid (num_groups None), 'latents-g0', 'latents-g1', ... for a hierarchical VAE's groups, top first."""
    return ["codes"] if num_groups is None else [f"latents-g{g}" for g in range(num_groups)]


def _num_groups(tokenizer: Tokenizer) -> int | None:
    return len(tokenizer.latent_shapes) if isinstance(tokenizer, HierarchicalVAE) else None


# ----------------------------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class EncodeArgs:
    """Everything that determines a store's bytes; a re-run must give the same, or it is refused."""

    tokenizer: dict[str, Any]
    data: dict[str, Any]
    augmentations: tuple[str, ...]
    shard_size: int
    batch_size: int
    precision: str = "float32"

    def as_json(self) -> dict[str, Any]:
        """The manifest's `args`; `precision` only where it is not float32, so that float32 stores keep the bytes (and
        the resume) of stores written before it was recorded."""
        args = {"tokenizer": self.tokenizer, "data": self.data, "augmentations": list(self.augmentations),
                "shard_size": self.shard_size, "batch_size": self.batch_size}
        return args if self.precision == "float32" else {**args, "precision": self.precision}


def tokenizer_identity(tokenizer: Tokenizer, source: str | None, revision: str | None,
                       store: str | Path | None = None) -> dict[str, Any]:
    """How a store names its tokenizer: the Hub id at the commit it was loaded from (a branch such as 'main' moves,
    a commit does not: `loaded_from`, what a prior records too) or a resolved folder, with - for a folder and the
    `store` folder given - its path relative to the store (`source_relative`, what a reader tries first, so that a
    store moved together with its tokenizer still finds it); the weight hash; the config. `source` None is an
    in-memory tokenizer."""
    origin = tokenizer.loaded_from
    relative = None
    if source is not None and origin is not None and origin.is_hub and origin.subfolder is None:
        source, revision = origin.source, origin.commit
    elif source is not None and os.path.isdir(source):
        source = str(Path(source).resolve())
        relative = _relative_path(source, store)
    identity = {"source": source, "revision": revision, "weights_sha256": weights_sha256(tokenizer),
                "config": tokenizer.config_dict()}
    return identity if relative is None else {"source": source, "source_relative": relative, **identity}


def _relative_path(folder: str, store: str | Path | None) -> str | None:
    """`folder` relative to the store folder (POSIX separators), or None where there is none (no store, or another
    drive)."""
    if store is None:
        return None
    try:
        return Path(os.path.relpath(folder, Path(store).resolve())).as_posix()
    except ValueError:
        return None


def input_identity(dataset: Dataset, ranges: Sequence[tuple[int, int]]) -> tuple[dict[str, Any], list[str | None]]:
    """What a store is encoded from: a sha256 of the inputs of each shard range (start, count), and for the store
    their count, what was hashed, and the sha256 of the shards' hashes. A re-run on other inputs is refused.

    Image folders hash their images' relative paths (in the source's sorted order) and labels: no image is read,
    so an image replaced in place under the same name goes unnoticed. Array sources (digits, IDX, .amat) and
    torchvision datasets hash the images' bytes and labels as loaded: exact, at the cost of one pass over memory.
    Any other dataset is identified by its length alone."""
    hasher = _range_hasher(dataset)
    if hasher is None:
        return {"count": len(dataset), "hashed": None}, [None] * len(ranges)
    hashed, hash_range = hasher
    per_shard = [hash_range(start, count) for start, count in ranges]
    return {"count": len(dataset), "hashed": hashed,
            "sha256": hashlib.sha256("\n".join(per_shard).encode()).hexdigest()}, per_shard


def _range_hasher(dataset: Dataset) -> tuple[str, Callable[[int, int], str]] | None:
    """(what is hashed, (start, count) -> sha256 of those items' inputs) for the sources that can say it cheaply."""
    if not isinstance(dataset, ImageDataset):
        return None
    source, labels = dataset.source, np.asarray(dataset.labels, dtype=np.int64)
    if isinstance(source, FolderSource):
        paths = [p.relative_to(source.root).as_posix() for p in source.files]
        return "relative paths and labels", lambda start, count: _digest(
            "\n".join(paths[start : start + count]).encode(), labels[start : start + count])
    if isinstance(source, ArraySource):
        images = source.images
    elif isinstance(source, TorchvisionSource) and hasattr(source.dataset, "data"):
        images = source.dataset.data
    else:
        return None
    images = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    layout = f"{images.dtype}{list(images.shape[1:])}".encode()
    return "image bytes and labels", lambda start, count: _digest(
        layout, images[start : start + count], labels[start : start + count])


class _ShardBatches(Sampler[list[int]]):
    """Index lists of the fixed batches of the given shards, in order."""

    def __init__(self, shards: list[tuple[int, int]], batch_size: int):
        self.shards, self.batch_size = shards, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start, count in self.shards:
            for offset in range(0, count, self.batch_size):
                yield list(range(start + offset, start + min(offset + self.batch_size, count)))

    def __len__(self) -> int:
        return sum(-(-count // self.batch_size) for _, count in self.shards)


def _collate(items: list[tuple[Any, Any, int]]) -> tuple[list[int], torch.Tensor | list[torch.Tensor], torch.Tensor]:
    """`WithIndex` items -> (indices, images stacked - or a list where their shapes or dtypes differ, for
    `_check_images` -, labels)."""
    indices = [index for _, _, index in items]
    images = [torch.as_tensor(image) for image, _, _ in items]
    alike = all(image.shape == images[0].shape and image.dtype == images[0].dtype for image in images)
    return indices, torch.stack(images) if alike else images, default_collate([label for _, label, _ in items])


def encode_dataset(
    tokenizer: Tokenizer | str,
    data: DataConfig | Dataset,
    out_dir: str | Path,
    *,
    revision: str | None = None,
    batch_size: int = 256,
    shard_size: int = 10_000,
    augmentations: tuple[str, ...] = ("none",),
    num_workers: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    compile: bool = False,
    precision: str = "float32",
) -> Path:
    """Encode a dataset into a token store at `out_dir` (resumable; several processes under torchrun/accelerate).

    `tokenizer` is a loaded model (an autoencoder, or a hierarchical VAE: one latent array per group) or a folder /
    Hub id (`org/name@revision` works; the commit it resolves to is recorded). `data` is a DataConfig or an
    `ImageDataset`-like dataset of (uint8 [C, H, W], label); every image must have the size of the first after
    preprocessing (one store, one code grid). A class-conditional tokenizer (config.num_classes > 0) encodes each
    image with its label (`tokenizer.encode(x, labels=y)`), so every image needs one in [0, num_classes): a dataset
    that lists its labels is checked before anything is written, others batch by batch. Returns the store folder.

    `num_workers` DataLoader processes read the images (None: `default_num_workers`, enough to keep a GPU busy; 0:
    the main process). `compile=True` compiles an autoencoder's encoder and quant_conv in place for the run (undone
    before returning; the first batches wait for the compilation) - worth it for large datasets on a GPU; it does not
    change the codes beyond float rounding and is not recorded. `precision="bf16"` encodes under bfloat16 autocast
    (faster on GPUs with bf16 units): the codes (latents) differ from float32's, so the store records it and resuming
    needs the same; refused for a tokenizer with `force_upcast` (it runs in float32 under autocast).
    """
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    source = None
    if isinstance(tokenizer, (str, Path)):
        source, at_revision = split_revision(str(tokenizer))
        revision = at_revision if at_revision is not None else revision
        tokenizer = load(source, revision=revision)
    if not isinstance(tokenizer, (Autoencoder, HierarchicalVAE)):
        raise TypeError("a token store needs an image tokenizer (Autoencoder or HierarchicalVAE), got "
                        f"{type(tokenizer).__name__}")
    for aug in augmentations:
        if aug not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {aug!r}; choose from {AUGMENTATIONS}")
    if not augmentations or augmentations[0] != "none" or len(set(augmentations)) != len(augmentations):
        raise ValueError(f"augmentations must start with 'none' and not repeat, got {augmentations}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    _check_speed_options(tokenizer, compile, precision, num_workers)
    c = tokenizer.config
    if isinstance(data, DataConfig):
        if data.binarize == "dynamic":
            raise TokenStoreError("data.binarize 'dynamic' draws images afresh in training; a store encodes a fixed "
                                  "set: use binarize 'once'")
        data_record = to_dict(data)
        dataset = build_dataset(data, channels=c.in_channels, preprocess=c.preprocess, size=None,
                                multiple=tokenizer.size_multiple())  # the images `tokenizer.preprocess` would give
    else:
        data_record = {"dataset": type(data).__name__, "length": len(data)}
        dataset = data
    if len(dataset) == 0:
        raise TokenStoreError("the dataset holds no images")
    num_classes = getattr(c, "num_classes", 0)
    if num_classes:
        check_dataset_labels(dataset, num_classes, "data")
    out = Path(out_dir)
    args = EncodeArgs(tokenizer_identity(tokenizer, source, revision, out), data_record, tuple(augmentations),
                      shard_size, batch_size, precision)
    device = torch.device(device) if device is not None else state.device
    if num_workers is None:
        num_workers = default_num_workers(device)
    tokenizer = tokenizer.to(device).eval()

    n = len(dataset)
    ranges = [(s * shard_size, min(shard_size, n - s * shard_size)) for s in range(-(-n // shard_size))]
    inputs, shard_inputs = input_identity(dataset, ranges)
    image_shape = tuple(torch.as_tensor(dataset[0][0]).shape)  # every image must have the first one's
    if state.is_main_process:
        _start_store(out, args, inputs, _format_version(tokenizer))
    state.wait_for_everyone()
    todo = [s for s in range(len(ranges)) if s % world == rank and not _shard_complete(out, s, shard_inputs[s])]
    loader = DataLoader(WithIndex(dataset), batch_sampler=_ShardBatches([ranges[s] for s in todo], batch_size),
                        collate_fn=_collate, num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    batches = iter(loader)
    bar = tqdm(total=sum(ranges[s][1] for s in todo), unit="img", desc=f"encode[{rank}]", disable=not progress)
    names = _array_names(_num_groups(tokenizer))
    channels_last = device.type == "cuda" and isinstance(tokenizer, Autoencoder)
    with _encoder_prepared(tokenizer, compile=compile, channels_last=channels_last):
        for s in todo:
            _encode_shard(out, s, ranges[s], shard_inputs[s], tokenizer, dataset, batches, names, bar, device=device,
                          augmentations=tuple(augmentations), batch_size=batch_size, image_shape=image_shape,
                          precision=precision, channels_last=channels_last)
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        _finish_store(out, args, inputs, image_shape, len(ranges), tokenizer)
    state.wait_for_everyone()
    return out


def _encode_shard(out: Path, s: int, shard_range: tuple[int, int], inputs_sha256: str | None, tokenizer: Tokenizer,
                  dataset: Dataset, batches: Iterator[Any], names: list[str], bar: Any, *, device: torch.device,
                  augmentations: tuple[str, ...], batch_size: int, image_shape: tuple[int, ...], precision: str,
                  channels_last: bool) -> None:
    """Encode shard s from the loader's next batches (its fixed batches, in order) and write it."""
    num_classes = getattr(tokenizer.config, "num_classes", 0)
    start, count = shard_range
    arrays: list[list[np.ndarray]] = [[] for _ in names]
    labels = []
    for _ in range(-(-count // batch_size)):
        indices, images, label = next(batches)
        _check_images(dataset, indices, images, image_shape)
        given = None  # a conditional tokenizer's labels
        if num_classes:
            check_batch_labels(label, num_classes, lambda j: _describe(dataset, indices[j]))
            given = label.to(device, non_blocking=True)
        encoded = _encode_batch(tokenizer, images.to(device, non_blocking=True), augmentations, given,
                                precision=precision, channels_last=channels_last)
        _check_finite(dataset, indices, encoded)
        for parts, array in zip(arrays, encoded):
            parts.append(array)
        labels.append(label.numpy().astype(np.int64))
        bar.update(len(label))
    _write_shard(out, s, start, inputs_sha256, dict(zip(names, map(np.concatenate, arrays))),
                 np.concatenate(labels))


def default_num_workers(device: torch.device | str) -> int:
    """DataLoader workers per process when none are given: enough that decoding images keeps up with a GPU - min(8,
    the CPUs this process may use, shared among the node's processes under torchrun) - and on a CPU, where the
    encoder needs the cores itself, at most 4 (vqtok's earlier default)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return min(8 if torch.device(device).type == "cuda" else 4, per_process)


def _check_speed_options(tokenizer: Tokenizer, compile: Any, precision: Any, num_workers: Any) -> None:
    """One-line errors for `compile`, `precision` and `num_workers` values that cannot be honoured."""
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    if num_workers is not None and (not isinstance(num_workers, int) or isinstance(num_workers, bool)
                                    or num_workers < 0):
        raise ValueError(f"num_workers must be an integer >= 0 (or None for the default), got {num_workers!r}")
    if compile and isinstance(tokenizer, HierarchicalVAE):
        raise ValueError("compile=True compiles an autoencoder's encoder; a hierarchical VAE's encoding is not "
                         "compiled: use compile=False")
    if precision == "bf16" and getattr(tokenizer.config, "force_upcast", False):
        raise ValueError("precision 'bf16': this tokenizer sets force_upcast (it overflows in half precision) and "
                         "runs in float32 under autocast; use precision 'float32'")


@contextlib.contextmanager
def _encoder_prepared(tokenizer: Tokenizer, *, compile: bool, channels_last: bool) -> Iterator[None]:
    """An autoencoder's encoder and quant_conv compiled in place (`nn.Module.compile`: the state_dict keys stay) and/or
    in channels_last memory format (the convolutions' fast layout on CUDA) for the block; both undone after, so the
    caller's model is left as it was (weights_sha256 does not depend on the memory format either)."""
    if not isinstance(tokenizer, Autoencoder) or not (compile or channels_last):
        yield
        return
    modules = [tokenizer.encoder, tokenizer.quant_conv]
    if channels_last:
        for module in modules:
            module.to(memory_format=torch.channels_last)
    compiled = [m for m in modules if compile and getattr(m, "_compiled_call_impl", None) is None]
    for module in compiled:
        module.compile()
    try:
        yield
    finally:
        for module in compiled:
            module._compiled_call_impl = None  # what nn.Module.compile set; there is no public way back
        if channels_last:
            for module in modules:
                module.to(memory_format=torch.contiguous_format)


def manifest_precision(manifest: dict[str, Any]) -> str:
    """The precision a store's manifest records (`args.precision`; absent: float32, as in stores of older vqtok)."""
    args = manifest["args"]
    return args.get("precision", "float32") if isinstance(args, dict) else "float32"


def encode_autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The autocast an encode runs under: bfloat16 for precision 'bf16', none for 'float32'."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def _check_images(dataset: Dataset, indices: list[int], images: torch.Tensor | list[torch.Tensor],
                  expected: tuple[int, ...]) -> None:
    """Every image of a store has the first one's shape (so its codes have the store's grid: the grid is a function of
    the image size) and uint8 pixels; the first that does not is named."""
    for index, image in zip(indices, images):
        if tuple(image.shape) != expected or image.dtype != torch.uint8:
            raise TokenStoreError(
                f"{_describe(dataset, index)}: {_shape_text(image.shape)} {image.dtype} after the tokenizer's "
                f"preprocessing, but this store's images are {_shape_text(expected)} torch.uint8 (as "
                f"{_describe(dataset, 0)}); one store holds one code grid: give every image one size (the "
                "tokenizer's preprocess resize and crop)"
            )


def _check_finite(dataset: Dataset, indices: list[int], arrays: list[np.ndarray]) -> None:
    """Latents are finite in float16 (a diverged tokenizer, or a mean beyond float16's 65504, is named here rather
    than written into a store its reader refuses)."""
    for g, array in enumerate(arrays):
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            row = int(np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))[0])
            where = "" if len(arrays) == 1 else f" of group {g}"
            raise TokenStoreError(f"{_describe(dataset, indices[row])}: its latents{where} hold NaN or infinite values "
                                  "in float16; this tokenizer cannot be stored")


def _describe(dataset: Dataset, index: int) -> str:
    return dataset.source.describe(index) if isinstance(dataset, ImageDataset) else f"item {index} of the dataset"


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


@torch.inference_mode()
def _encode_batch(tokenizer: Tokenizer, images: torch.Tensor, augmentations: tuple[str, ...],
                  labels: torch.Tensor | None = None, *, precision: str = "float32",
                  channels_last: bool = False) -> list[np.ndarray]:
    """uint8 [B, C, H, W] -> [codes [B, A, h, w]] ([B, A, h, w, depth] a residual VQ's; or [float16 latents
    [B, A, C, h, w]], or a hierarchical VAE's float16 latents of every group, top first); `labels` [B]: a conditional tokenizer's, the same for every view.
    `precision`: see `encode_autocast`; `channels_last`: the views in that memory format (for an encoder in it)."""
    x = uint8_to_range(images, tokenizer.config.value_range)
    views = [x if aug == "none" else x.flip(-1) for aug in augmentations]
    if channels_last:
        views = [view.contiguous(memory_format=torch.channels_last) for view in views]
    given = {} if labels is None else {"labels": labels}
    outputs = []  # per view, per array
    for view in views:
        with encode_autocast(images.device, precision):
            rep = tokenizer.encode(view, **given)
        if isinstance(tokenizer, HierarchicalVAE):
            outputs.append([q.mode().to(torch.float16) for q in rep])
        elif tokenizer.is_gaussian:
            outputs.append([rep.mode().to(torch.float16)])
        else:
            outputs.append([rep])
    stacked = [torch.stack(per_view, dim=1).cpu().numpy() for per_view in zip(*outputs)]
    return stacked if tokenizer.is_gaussian else [stacked[0].astype(code_dtype(tokenizer.vocab_size))]


def _start_store(out: Path, args: EncodeArgs, inputs: dict[str, Any], version: int) -> None:
    """Create the store, or check that an existing one was started with the same arguments on the same inputs."""
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        existing = _read_manifest(out)
        then, now = _comparable_args(existing.get("args")), _comparable_args(args.as_json())
        if then != now:
            differing = [k for k in [*now, *(k for k in then if k not in now)] if then.get(k) != now.get(k)]
            precision = ""
            if "precision" in differing:
                precision = (f" - it was encoded in precision {then.get('precision', 'float32')}, this run is "
                             f"{now.get('precision', 'float32')}: give the store's to resume -")
            raise TokenStoreError(
                f"{out} holds a token store made with different arguments ({', '.join(differing) or 'format'})"
                f"{precision}; use another --out folder or delete this one"
            )
        if existing.get("inputs") != inputs:
            then, now = _inputs_text(existing.get("inputs")), _inputs_text(inputs)
            raise TokenStoreError(
                f"{out}: the input data changed since this store was started (then {then}, now {now}); its shards "
                "would mix two datasets: use another --out folder or delete this one"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise TokenStoreError(f"{out} exists and is not empty, and holds no token store manifest")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    _write_json(manifest_path, {"format": FORMAT, "format_version": version, "complete": False,
                                "num_items": inputs["count"], "args": args.as_json(), "inputs": inputs})


def _comparable_args(args: Any) -> dict[str, Any]:
    """A store's arguments as a re-run compares them: without the tokenizer's path relative to the store (derived
    from its absolute path, which is compared, and absent from stores of older vqtok)."""
    if not isinstance(args, dict):
        return {}
    tokenizer = args.get("tokenizer")
    if isinstance(tokenizer, dict):
        args = {**args, "tokenizer": {k: v for k, v in tokenizer.items() if k != "source_relative"}}
    return args


def _inputs_text(inputs: Any) -> str:
    if not isinstance(inputs, dict):
        return "not recorded"
    text = f"{inputs.get('count')} images"
    return text + (f" with {inputs['hashed']} of sha256 {str(inputs.get('sha256'))[:12]}..." if inputs.get("hashed")
                   else "")


def _shard_complete(out: Path, s: int, inputs_sha256: str | None) -> bool:
    """Whether shard s was written (its record, and files of the recorded sizes), from these inputs."""
    record_path = out / "shards" / f"{s:05d}.json"
    if not record_path.is_file():
        return False
    record = _read_json(record_path)
    if record.get("record_sha256") != _record_sha256(record):
        raise TokenStoreError(f"{record_path}: does not match its record_sha256 (edited?); use another --out folder "
                              "or delete this one")
    if record.get("inputs_sha256") != inputs_sha256:
        raise TokenStoreError(f"{record_path}: shard {s} was encoded from other inputs than this data's (a record from "
                              "another store?); use another --out folder or delete this one")
    return all((out / f["path"]).is_file() and (out / f["path"]).stat().st_size == f["bytes"] for f in record["files"])


def _write_shard(out: Path, s: int, start: int, inputs_sha256: str | None, arrays: dict[str, np.ndarray],
                 labels: np.ndarray) -> None:
    """The shard's files (its arrays by name, see `_array_names`, then the labels), then its record: index, start,
    count, inputs' hash, the codes' [min, max] (integer codes), each file's bytes and sha256, and the record's own
    hash (binding all of these together)."""
    files = []
    for kind, array in (*arrays.items(), ("labels", labels)):
        rel = f"shards/{kind}-{s:05d}.npy"
        with staged(out / rel) as tmp, open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
        files.append({"kind": kind, "path": rel, "bytes": (out / rel).stat().st_size, "sha256": _sha256(out / rel)})
    record: dict[str, Any] = {"index": s, "start": start, "count": int(len(labels)), "inputs_sha256": inputs_sha256}
    codes = arrays.get("codes")
    if codes is not None and codes.dtype.kind in "ui":
        record["code_range"] = [int(codes.min()), int(codes.max())]
    record["files"] = files
    record["record_sha256"] = _record_sha256(record)
    _write_json(out / "shards" / f"{s:05d}.json", record)


def _finish_store(out: Path, args: EncodeArgs, inputs: dict[str, Any], image_shape: tuple[int, ...],
                  num_shards: int, tokenizer: Tokenizer) -> None:
    """Gather the shard records into the manifest, check it as a reader will, and only then mark it complete."""
    records = []
    for s in range(num_shards):
        path = out / "shards" / f"{s:05d}.json"
        if not path.is_file():
            raise TokenStoreError(f"{out}: shard {s} was not written (a rank failed?); re-run to complete the store")
        records.append(_read_json(path))
    first = [np.load(out / f["path"], mmap_mode="r", allow_pickle=False) for f in records[0]["files"][:-1]]
    gaussian = tokenizer.is_gaussian
    layout = ({"groups": [list(array.shape[2:]) for array in first]} if isinstance(tokenizer, HierarchicalVAE)
              else {"item_shape": list(first[0].shape[1:]),
                    "grid": list(first[0].shape[-2:] if gaussian else first[0].shape[2:])})
    manifest = {
        "format": FORMAT,
        "format_version": _format_version(tokenizer),
        "complete": True,
        "vqtok_version": __version__,
        "num_items": inputs["count"],
        "kind": "continuous" if gaussian else "discrete",
        "vocab_size": None if gaussian else tokenizer.vocab_size,
        "dtype": str(first[0].dtype),
        **layout,
        "image_shape": list(image_shape),
        "augmentations": list(args.augmentations),
        "has_labels": False,
        "preprocess": to_dict(tokenizer.config.preprocess),
        "tokenizer": args.tokenizer,
        "args": args.as_json(),
        "inputs": inputs,
        "shards": records,
    }
    _validate_manifest(manifest, out / "manifest.json")
    shards = [_open_shard(out, manifest, record) for record in records]
    manifest["has_labels"] = any(bool((labels >= 0).any()) for _, labels in shards)
    _write_json(out / "manifest.json", manifest)


# ----------------------------------------------------------------------------------------------------------------
# Reading


class TokenDataset(Dataset):
    """Memory-mapped (codes, label) pairs of a token store, one item per (image, augmentation).

    `TokenDataset(path)` checks, without reading the codes, that the store is complete and consistent (see the module
    docstring) and that every shard has its recorded size and shape; each shard's codes are checked against the
    vocabulary (latents: checked finite) before their first read. `verify=True` also checks every file's sha256 and
    every shard's codes now. `tokenizer=` refuses a tokenizer whose weights differ from the store's. Item i is image
    i // A under augmentation i % A: (LongTensor [h, w] codes ([h, w, R] a residual VQ's), or float16 latents
    [C, h, w], or for a hierarchical VAE's store a tuple of every group's float16 latents [C_g, h_g, w_g], top first;
    int label). `grid` is one item's code shape ([h, w] or [h, w, R]; latents: [h, w]; None for a hierarchical
    store), `group_shapes` every group's [C_g, h_g, w_g] (None for a single grid).
    """

    def __init__(self, path: str | Path, *, tokenizer: Tokenizer | None = None, verify: bool = False):
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        if not self.manifest.get("complete"):
            raise TokenStoreError(f"{self.path}: the store is incomplete (encoding was interrupted); re-run the encode")
        self.kind = self.manifest["kind"]
        self.augmentations = self.manifest["augmentations"]
        self.vocab_size = self.manifest["vocab_size"]
        groups = self.manifest.get("groups")
        self.grid = None if groups is not None else tuple(self.manifest["grid"])
        self.group_shapes = None if groups is None else tuple(tuple(shape) for shape in groups)
        shards = [_open_shard(self.path, self.manifest, record) for record in self.manifest["shards"]]
        self._arrays = [arrays for arrays, _ in shards]  # per shard: its arrays (codes, or each group's latents)
        self._labels = [labels for _, labels in shards]
        self._ends = np.cumsum([len(labels) for labels in self._labels])
        self._checked: set[int] = set()
        if verify:
            self.verify()
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)

    def __len__(self) -> int:
        return self.num_images * len(self.augmentations)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a store of {len(self)} items")
        codes, labels = self.gather([index])
        return (tuple(group[0] for group in codes) if isinstance(codes, tuple) else codes[0]), int(labels[0])

    def gather(self, indices: Sequence[int] | np.ndarray | torch.Tensor
               ) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]:
        """Items `indices` at once: (codes [n, *grid] LongTensor, or float16 latents [n, C, h, w], or a hierarchical
        store's tuple of every group's float16 latents [n, C_g, h_g, w_g]; labels [n])."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"indices out of range for a store of {len(self)} items")
        image, aug = np.divmod(index, len(self.augmentations))
        shard = np.searchsorted(self._ends, image, side="right")
        local = image - np.concatenate([[0], self._ends[:-1]])[shard]
        arrays = [np.empty((len(index), *a.shape[2:]), dtype=a.dtype) for a in self._arrays[0]]
        labels = np.empty(len(index), dtype=np.int64)
        for s in np.unique(shard):
            self._check_values(int(s))
            rows = shard == s
            for out, stored in zip(arrays, self._arrays[s]):
                out[rows] = stored[local[rows], aug[rows]]
            labels[rows] = self._labels[s][local[rows]]
        tensors = tuple(torch.from_numpy(a) for a in arrays)
        if self.group_shapes is not None:
            return tensors, torch.from_numpy(labels)
        return (tensors[0] if self.kind == "continuous" else tensors[0].long()), torch.from_numpy(labels)

    @property
    def num_images(self) -> int:
        return int(self._ends[-1])

    @property
    def precision(self) -> str:
        """The encoder's arithmetic that made the store: 'float32' or 'bf16' (autocast; see `encode_dataset`)."""
        return manifest_precision(self.manifest)

    def label_range(self) -> tuple[int, int]:
        """The smallest and largest label in the store (-1 marks images without one)."""
        return (min(int(labels.min()) for labels in self._labels), max(int(labels.max()) for labels in self._labels))

    @property
    def tokenizer_identity(self) -> dict[str, Any]:
        """The tokenizer that made the store: source (Hub id or absolute folder path), for a folder its path
        relative to the store (source_relative; stores of older vqtok lack it), revision (a commit for Hub ids),
        weights_sha256, config."""
        return self.manifest["tokenizer"]

    def load_tokenizer(self, source: str | Path | None = None) -> Tokenizer:
        """Load the tokenizer that made the store and check that its weights are the recorded ones (weights_sha256).

        `source` - a folder, or a Hub id[@revision] - says where it is now, when it moved (its weights must still be
        the recorded ones). Otherwise a recorded folder is looked for relative to the store first (a store moved
        together with its tokenizer still finds it), then at its absolute path; a Hub id is loaded at its commit."""
        identity = self.tokenizer_identity
        if source is not None:
            tokenizer = load(source)
            self.check_tokenizer(tokenizer, name=str(source))
            return tokenizer
        if identity["source"] is None:
            raise TokenStoreError(f"{self.path}: made from an in-memory tokenizer; pass it with tokenizer= (or its "
                                  "saved folder to load_tokenizer)")
        tokenizer = load(self.tokenizer_location(), revision=identity["revision"])
        self.check_tokenizer(tokenizer)
        return tokenizer

    def tokenizer_location(self) -> str:
        """Where the recorded tokenizer is: its Hub id, or the first of its recorded folders that exists (relative to
        the store, then absolute); a clear error naming them and its weight hash when none does."""
        identity = self.tokenizer_identity
        source, relative = identity["source"], identity.get("source_relative")
        folders = []
        if isinstance(relative, str):
            folders.append(os.path.normpath(os.path.join(self.path.resolve(), relative)))
        if os.path.isabs(source):
            folders.append(source)
        if not folders:
            return source  # a Hub id
        for folder in folders:
            if os.path.isdir(folder):
                return folder
        where = (f"{relative} from the store ({folders[0]})" if isinstance(relative, str) else "") + (
            f"{' nor at ' if len(folders) > 1 else ''}{source}" if os.path.isabs(source) else "")
        raise TokenStoreError(
            f"{self.path}: the tokenizer that made this store (weights sha256 {identity['weights_sha256']}) is not at "
            f"{where}; if its folder moved, say where: `tokenizer: PATH` in the prior's config (vqtok train-prior "
            "--tokenizer PATH), vqtok decode --tokenizer PATH, or TokenDataset.load_tokenizer(PATH)")

    def check_tokenizer(self, tokenizer: Tokenizer, *, name: str | None = None) -> None:
        """Refuse a tokenizer (`name`: where it came from, for the message) whose weights are not the store's."""
        expected = self.tokenizer_identity["weights_sha256"]
        actual = weights_sha256(tokenizer)
        if actual != expected:
            raise TokenStoreError(
                f"{self.path}: encoded by a tokenizer with weights sha256 {expected}, not {name or 'this one'} "
                f"(weights sha256 {actual})"
            )

    def verify(self) -> None:
        """Check every shard file's sha256 against its record, then every shard's codes (`check_codes`)."""
        for record in self.manifest["shards"]:
            for f in record["files"]:
                if _sha256(self.path / f["path"]) != f["sha256"]:
                    raise TokenStoreError(f"{self.path / f['path']}: sha256 does not match the manifest (corrupted)")
        self.check_codes()

    def check_codes(self) -> None:
        """Check that every shard's codes lie in the vocabulary and span the range its record gives (latents: that
        they are finite): one pass over the codes, done once per shard (`gather` does it for each shard before its
        first read)."""
        for s in range(len(self._arrays)):
            self._check_values(s)

    def _check_values(self, s: int) -> None:
        if s in self._checked:
            return
        record = self.manifest["shards"][s]
        if self.kind == "continuous":
            for latents, f in zip(self._arrays[s], record["files"]):
                if not np.isfinite(latents).all():
                    raise TokenStoreError(f"{self.path / f['path']}: holds NaN or infinite latents (a corrupted shard)")
            self._checked.add(s)
            return
        (codes,), file = self._arrays[s], self.path / record["files"][0]["path"]
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= self.vocab_size:
            raise TokenStoreError(f"{file}: holds code {low if low < 0 else high}, outside the vocabulary "
                                  f"0..{self.vocab_size - 1} (a corrupted shard)")
        if [low, high] != record["code_range"]:
            raise TokenStoreError(f"{file}: codes span [{low}, {high}], its record says {record['code_range']} (a "
                                  "corrupted or replaced shard)")
        self._checked.add(s)


# ----------------------------------------------------------------------------------------------------------------
# Checks shared by the reader and the writer's last step


def _format_version(tokenizer: Any) -> int:
    """Single-grid stores keep format 2 byte for byte; a hierarchical VAE's stores are format 3."""
    return GROUPS_FORMAT_VERSION if isinstance(tokenizer, HierarchicalVAE) else FORMAT_VERSION


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise TokenStoreError(f"{path}: no manifest.json; not a token store")
    manifest = _read_json(manifest_path)
    if manifest.get("format") != FORMAT:
        raise TokenStoreError(f"{manifest_path}: not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if version not in (FORMAT_VERSION, GROUPS_FORMAT_VERSION):
        raise TokenStoreError(f"{manifest_path}: format version {version}, this vqtok reads {FORMAT_VERSION} and "
                              f"{GROUPS_FORMAT_VERSION}; re-encode the store")
    if manifest.get("complete") and (version == GROUPS_FORMAT_VERSION) != ("groups" in manifest):
        raise TokenStoreError(f"{manifest_path}: format version {version} with"
                              f"{'' if 'groups' in manifest else 'out'} latent groups: a malformed manifest")
    if manifest.get("complete"):
        _validate_manifest(manifest, manifest_path)
    return manifest


def _validate_manifest(manifest: dict[str, Any], where: Path) -> None:
    """The declared fields agree with one another, and the shard records cover items 0..num_items-1 once, in order
    (no file is read)."""
    layout = ("groups",) if "groups" in manifest else ("grid", "item_shape")
    required = ("kind", "augmentations", "vocab_size", "dtype", *layout, "num_items", "args", "tokenizer", "shards")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise TokenStoreError(f"{where}: malformed manifest (missing: {', '.join(missing)})")
    _check_declared_fields(manifest, where)
    _check_shard_records(manifest, where)


def _check_declared_fields(m: dict[str, Any], where: Path) -> None:
    kind, augmentations, vocab, dtype = m["kind"], m["augmentations"], m["vocab_size"], m["dtype"]
    if kind not in ("discrete", "continuous"):
        raise TokenStoreError(f"{where}: kind is {kind!r}; expected 'discrete' or 'continuous'")
    if not (isinstance(augmentations, list) and augmentations and augmentations[0] == "none"
            and len(set(augmentations)) == len(augmentations) and set(augmentations) <= set(AUGMENTATIONS)):
        raise TokenStoreError(f"{where}: augmentations {augmentations!r} must start with 'none' and list each of "
                              f"{AUGMENTATIONS} at most once")
    precision = manifest_precision(m)
    if precision not in PRECISIONS:
        raise TokenStoreError(f"{where}: args.precision {precision!r} is not one of {PRECISIONS}")
    if "groups" in m:
        _check_groups(m, where)
    else:
        _check_item_shape(m, where)
    if kind == "continuous":
        if vocab is not None or dtype != "float16":
            raise TokenStoreError(f"{where}: a continuous store holds float16 latents and no vocabulary, not dtype "
                                  f"{dtype} with vocab_size {vocab}")
        return
    if not (_is_int(vocab) and vocab >= 1):
        raise TokenStoreError(f"{where}: vocab_size {vocab!r} must be a positive integer in a discrete store")
    if dtype != str(code_dtype(vocab)):
        raise TokenStoreError(f"{where}: dtype {dtype}, but codes of a {vocab}-code vocabulary are stored as "
                              f"{code_dtype(vocab)}")
    recorded = _recorded_config(m, "vocab_size")
    if recorded != vocab:
        raise TokenStoreError(f"{where}: vocab_size {vocab}, but the recorded tokenizer has {recorded} codes")


def _check_item_shape(m: dict[str, Any], where: Path) -> None:
    """A store of one grid: item_shape [A, h, w] (codes; [A, h, w, R] a residual VQ's, with the recorded tokenizer's
    depth R) or [A, C, h, w] (latents), grid one view's codes' shape (item_shape without A) or the latents' [h, w],
    from a tokenizer of one grid."""
    kind, augmentations, shape = m["kind"], m["augmentations"], m["item_shape"]
    bottleneck = _recorded_config(m, "bottleneck")
    depth = bottleneck.get("depth") if isinstance(bottleneck, dict) and bottleneck.get("kind") == "rvq" else None
    axes = ["A", "C", "h", "w"] if kind != "discrete" else ["A", "h", "w"] + (["R"] if depth is not None else [])
    if not (isinstance(shape, list) and len(shape) == len(axes) and all(_is_int(d) and d >= 1 for d in shape)):
        raise TokenStoreError(f"{where}: item_shape {shape!r} is not a {kind} store's [{', '.join(axes)}]")
    if shape[0] != len(augmentations):
        raise TokenStoreError(f"{where}: items hold {shape[0]} view(s) (item_shape {shape}) but augmentations lists "
                              f"{len(augmentations)}: {augmentations}")
    if kind == "discrete" and m["grid"] != shape[1:]:
        raise TokenStoreError(f"{where}: grid {m['grid']} is not one view's code shape (item_shape {shape})")
    if kind != "discrete" and m["grid"] != shape[-2:]:
        raise TokenStoreError(f"{where}: grid {m['grid']} is not the items' last two sizes (item_shape {shape})")
    if depth is not None and shape[-1] != depth:
        raise TokenStoreError(f"{where}: items hold {shape[-1]} residual levels (item_shape {shape}), but the "
                              f"recorded tokenizer has {depth}")
    if _recorded_config(m, "latent_shapes") is not None:
        raise TokenStoreError(f"{where}: one grid (item_shape {shape}), but the recorded tokenizer has latent groups "
                              "(a hierarchical VAE's store lists its groups)")


def _check_groups(m: dict[str, Any], where: Path) -> None:
    """A hierarchical VAE's store: continuous latents, `groups` every group's [C, h, w] (top first), the recorded
    tokenizer's latent_shapes, and no item_shape or grid."""
    groups, both = m["groups"], [k for k in ("item_shape", "grid") if k in m]
    if m["kind"] != "continuous":
        raise TokenStoreError(f"{where}: a {m['kind']} store with latent groups; groups hold continuous latents")
    if both:
        raise TokenStoreError(f"{where}: declares both groups and {', '.join(both)}; a hierarchical store's items "
                              "are its groups")
    if not (isinstance(groups, list) and groups and all(
            isinstance(g, list) and len(g) == 3 and all(_is_int(d) and d >= 1 for d in g) for g in groups)):
        raise TokenStoreError(f"{where}: groups {groups!r} is not a list of every latent group's [C, h, w]")
    recorded = _recorded_config(m, "latent_shapes")
    if recorded != groups:
        raise TokenStoreError(f"{where}: groups {groups}, but the recorded tokenizer's latent_shapes are {recorded}")


def _recorded_config(m: dict[str, Any], key: str) -> Any:
    """A field of the recorded tokenizer's config (None where it has none)."""
    tokenizer = m["tokenizer"]
    config = tokenizer.get("config") if isinstance(tokenizer, dict) else None
    return config.get(key) if isinstance(config, dict) else None


def _item_shapes(m: dict[str, Any]) -> list[tuple[list[int], str]]:
    """The shape of one item of each of a shard's arrays (`_array_names`' order) and how the manifest declares it."""
    if "groups" not in m:
        return [(m["item_shape"], "item_shape")]
    views = len(m["augmentations"])
    return [([views, *shape], f"augmentations, groups[{g}]") for g, shape in enumerate(m["groups"])]


def _check_shard_records(m: dict[str, Any], where: Path) -> None:
    records, size = m["shards"], m["args"].get("shard_size") if isinstance(m["args"], dict) else None
    if not isinstance(records, list) or not records or not (_is_int(size) and size >= 1):
        raise TokenStoreError(f"{where}: malformed manifest (no shard records, or no args.shard_size)")
    start = 0
    for i, record in enumerate(records):
        if not isinstance(record, dict) or record.get("index") != i:
            found = record.get("index") if isinstance(record, dict) else record
            raise TokenStoreError(f"{where}: shard record {i} is for shard {found!r}; the records must be shards "
                                  f"0..{len(records) - 1}, each once, in order (reordered or duplicated records)")
        if record.get("start") != start:
            raise TokenStoreError(f"{where}: shard {i} starts at item {record.get('start')!r}, but the shards before "
                                  f"it end at item {start} (overlapping or missing items)")
        count, last = record.get("count"), i == len(records) - 1
        if not (_is_int(count) and 1 <= count <= size and (count == size or last)):
            raise TokenStoreError(f"{where}: shard {i} holds {count!r} items; every shard holds shard_size {size}, "
                                  "the last one at most that")
        names = [*_array_names(len(m["groups"]) if "groups" in m else None), "labels"]
        expected = [(name, f"shards/{name}-{i:05d}.npy") for name in names]
        files = record.get("files")
        if not (isinstance(files, list) and all(isinstance(f, dict) for f in files)
                and [(f.get("kind"), f.get("path")) for f in files] == expected
                and all(_is_int(f.get("bytes")) and isinstance(f.get("sha256"), str) for f in files)):
            raise TokenStoreError(f"{where}: shard {i}'s record does not list its files {[p for _, p in expected]} "
                                  "with their bytes and sha256")
        if m["kind"] == "discrete" and not (isinstance(record.get("code_range"), list)
                                            and len(record["code_range"]) == 2
                                            and all(_is_int(v) for v in record["code_range"])):
            raise TokenStoreError(f"{where}: shard {i}'s record has no code_range [min, max]")
        if record.get("record_sha256") != _record_sha256(record):
            raise TokenStoreError(f"{where}: shard {i}'s record does not match its record_sha256 (edited, or mixed "
                                  "with another shard's)")
        start += count
    if start != m["num_items"]:
        raise TokenStoreError(f"{where}: the shards hold {start} items, num_items is {m['num_items']!r}")


def _open_shard(path: Path, m: dict[str, Any], record: dict[str, Any]) -> tuple[list[np.ndarray], np.ndarray]:
    """Memory-map a shard's arrays (codes, or each group's latents) and labels after checking their sizes, dtypes and
    shapes against the manifest, and its recorded code range against the vocabulary (the codes themselves are not
    read)."""
    for f in record["files"]:
        file = path / f["path"]
        actual = file.stat().st_size if file.is_file() else None
        if actual != f["bytes"]:
            raise TokenStoreError(f"{file}: {'missing' if actual is None else f'{actual} bytes'}, the manifest "
                                  f"records {f['bytes']} (truncated or replaced shard)")
    *array_files, labels_file = (path / f["path"] for f in record["files"])
    arrays, labels, count = [_load_npy(file) for file in array_files], _load_npy(labels_file), record["count"]
    for file, array, (shape, declared) in zip(array_files, arrays, _item_shapes(m)):
        expected = (count, *shape)
        if array.dtype != np.dtype(m["dtype"]) or array.shape != expected:
            raise TokenStoreError(f"{file}: {array.dtype} {list(array.shape)}, the manifest declares {m['dtype']} "
                                  f"{list(expected)} (count, {declared})")
    if labels.dtype != np.int64 or labels.shape != (count,):
        raise TokenStoreError(f"{labels_file}: {labels.dtype} {list(labels.shape)}, expected int64 [{count}]")
    if m["kind"] == "discrete":
        low, high = record["code_range"]
        if not 0 <= low <= high < m["vocab_size"]:
            raise TokenStoreError(f"{array_files[0]}: its record gives codes in [{low}, {high}], outside the "
                                  f"vocabulary 0..{m['vocab_size'] - 1} of the manifest")
    return arrays, labels


def _load_npy(file: Path) -> np.ndarray:
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise TokenStoreError(f"{file}: unreadable shard ({e})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenStoreError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenStoreError(f"{path}: holds a JSON {type(data).__name__}, not an object")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")


def _record_sha256(record: dict[str, Any]) -> str:
    """sha256 of a shard record without this field: binds its index, start, inputs, code range and files' names and
    checksums, so that no part of one shard's record can pass for another's."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _digest(*parts: bytes | np.ndarray) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else np.ascontiguousarray(part).data)
    return digest.hexdigest()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
