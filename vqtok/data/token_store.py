"""The token store: a dataset encoded once by a tokenizer, for priors trained on it many times.

Layout of a store folder:

    manifest.json                 what was encoded with what (tokenizer identity and weight hash, config,
                                  preprocessing, data source, grid, vocabulary, dtype), and every shard's count/sha256
    shards/codes-00000.npy        [n, A, h, w] codes in the smallest integer dtype holding the vocabulary
                                  (uint8/uint16/int32), or [n, A, C, h, w] float16 latents (posterior mode) for
                                  Gaussian tokenizers; A is the augmentation axis ('none', 'hflip')
    shards/labels-00000.npy       [n] int64 labels (-1 where the source has none)
    shards/00000.json             the shard's record; written last, so its presence means the shard is complete

Shard s holds the fixed global range [s * shard_size, (s + 1) * shard_size), encoded in fixed batches of
`batch_size` from the shard's start, whatever the world size or resume point: every rank writes its own shards
(s mod W), each through a temporary file and a rename, and re-running with the same arguments skips complete shards
and yields a byte-identical store. Different arguments against an existing store are an error.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from vqtok.config import DataConfig, to_dict
from vqtok.data.sources import build_dataset
from vqtok.files import staged
from vqtok.hub import load, weights_sha256
from vqtok.images import uint8_to_range
from vqtok.models import Autoencoder
from vqtok.version import __version__

FORMAT = "vqtok-token-store"
FORMAT_VERSION = 1
AUGMENTATIONS = ("none", "hflip")


class TokenStoreError(ValueError):
    """A token store that is missing, corrupt, inconsistent, or does not match what it is used with."""


def code_dtype(vocab_size: int) -> np.dtype:
    """The smallest integer dtype that holds codes 0 .. vocab_size - 1."""
    for dtype in (np.uint8, np.uint16):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.int32)


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

    def as_json(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer, "data": self.data, "augmentations": list(self.augmentations),
                "shard_size": self.shard_size, "batch_size": self.batch_size}


def tokenizer_identity(tokenizer: Autoencoder, source: str | None, revision: str | None) -> dict[str, Any]:
    """How a store (or a prior) names its tokenizer: Hub id and revision or a folder, the weight hash, the config."""
    if source is not None and os.path.isdir(source):
        source = str(Path(source).resolve())
    return {"source": source, "revision": revision, "weights_sha256": weights_sha256(tokenizer),
            "config": tokenizer.config_dict()}


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


def encode_dataset(
    tokenizer: Autoencoder | str,
    data: DataConfig | Dataset,
    out_dir: str | Path,
    *,
    revision: str | None = None,
    batch_size: int = 256,
    shard_size: int = 10_000,
    augmentations: tuple[str, ...] = ("none",),
    num_workers: int = 4,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Path:
    """Encode a dataset into a token store at `out_dir` (resumable; several processes under torchrun/accelerate).

    `tokenizer` is a loaded model or a folder / Hub id (`org/name@revision` works). `data` is a DataConfig or an
    `ImageDataset`-like dataset of (uint8 [C, H, W], label). Returns the store folder.
    """
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    source = None
    if isinstance(tokenizer, (str, Path)):
        source = str(tokenizer)
        if "@" in source and not os.path.exists(source):
            source, revision = source.rsplit("@", 1)
        tokenizer = load(source, revision=revision)
    if not isinstance(tokenizer, Autoencoder):
        raise TypeError(f"a token store needs an image tokenizer (Autoencoder), got {type(tokenizer).__name__}")
    for aug in augmentations:
        if aug not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {aug!r}; choose from {AUGMENTATIONS}")
    if not augmentations or augmentations[0] != "none" or len(set(augmentations)) != len(augmentations):
        raise ValueError(f"augmentations must start with 'none' and not repeat, got {augmentations}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    c = tokenizer.config
    if isinstance(data, DataConfig):
        data_record = to_dict(data)
        dataset = build_dataset(data, channels=c.in_channels, preprocess=c.preprocess, size=None)
    else:
        data_record = {"dataset": type(data).__name__, "length": len(data)}
        dataset = data
    args = EncodeArgs(tokenizer_identity(tokenizer, source, revision), data_record, tuple(augmentations),
                      shard_size, batch_size)
    out = Path(out_dir)
    device = torch.device(device) if device is not None else state.device
    tokenizer = tokenizer.to(device).eval()

    n = len(dataset)
    shards = [(s, min(shard_size, n - s * shard_size)) for s in range(-(-n // shard_size))]
    if state.is_main_process:
        _start_store(out, args, n)
    state.wait_for_everyone()
    todo = [(s, count) for s, count in shards if s % world == rank and not _shard_complete(out, s)]
    loader = DataLoader(dataset, batch_sampler=_ShardBatches([(s * shard_size, cnt) for s, cnt in todo], batch_size),
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    batches = iter(loader)
    bar = tqdm(total=sum(cnt for _, cnt in todo), unit="img", desc=f"encode[{rank}]", disable=not progress)
    for s, count in todo:
        codes, labels = [], []
        for _ in range(-(-count // batch_size)):
            images, label = next(batches)
            codes.append(_encode_batch(tokenizer, images.to(device, non_blocking=True), augmentations))
            labels.append(label.numpy().astype(np.int64))
            bar.update(len(label))
        _write_shard(out, s, s * shard_size, np.concatenate(codes), np.concatenate(labels))
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        _finish_store(out, args, n, len(shards), tokenizer)
    state.wait_for_everyone()
    return out


@torch.inference_mode()
def _encode_batch(tokenizer: Autoencoder, images: torch.Tensor, augmentations: tuple[str, ...]) -> np.ndarray:
    """uint8 [B, C, H, W] -> codes [B, A, h, w] (or float16 latents [B, A, C, h, w])."""
    x = uint8_to_range(images, tokenizer.config.value_range)
    views = [x if aug == "none" else x.flip(-1) for aug in augmentations]
    outputs = []
    for view in views:
        rep = tokenizer.encode(view)
        if tokenizer.is_gaussian:
            outputs.append(rep.mode().to(torch.float16))
        else:
            outputs.append(rep)
    stacked = torch.stack(outputs, dim=1).cpu().numpy()
    return stacked if tokenizer.is_gaussian else stacked.astype(code_dtype(tokenizer.vocab_size))


def _start_store(out: Path, args: EncodeArgs, n: int) -> None:
    """Create the store, or check that an existing one was started with the same arguments."""
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        existing = _read_manifest(out)
        if existing.get("args") != args.as_json():
            differing = [k for k in args.as_json() if existing.get("args", {}).get(k) != args.as_json()[k]]
            raise TokenStoreError(
                f"{out} holds a token store made with different arguments ({', '.join(differing) or 'format'}); "
                "use another --out folder or delete this one"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise TokenStoreError(f"{out} exists and is not empty, and holds no token store manifest")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    _write_json(manifest_path, {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": False,
                                "num_items": n, "args": args.as_json()})


def _shard_complete(out: Path, s: int) -> bool:
    record_path = out / "shards" / f"{s:05d}.json"
    if not record_path.is_file():
        return False
    record = json.loads(record_path.read_text())
    return all((out / f["path"]).is_file() and (out / f["path"]).stat().st_size == f["bytes"] for f in record["files"])


def _write_shard(out: Path, s: int, start: int, codes: np.ndarray, labels: np.ndarray) -> None:
    files = []
    for kind, array in (("codes", codes), ("labels", labels)):
        rel = f"shards/{kind}-{s:05d}.npy"
        with staged(out / rel) as tmp, open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
        files.append({"kind": kind, "path": rel, "bytes": (out / rel).stat().st_size, "sha256": _sha256(out / rel)})
    _write_json(out / "shards" / f"{s:05d}.json", {"index": s, "start": start, "count": int(len(labels)),
                                                    "files": files})


def _finish_store(out: Path, args: EncodeArgs, n: int, num_shards: int, tokenizer: Autoencoder) -> None:
    records = []
    for s in range(num_shards):
        path = out / "shards" / f"{s:05d}.json"
        if not path.is_file():
            raise TokenStoreError(f"{out}: shard {s} was not written (a rank failed?); re-run to complete the store")
        records.append(json.loads(path.read_text()))
    first = np.load(out / records[0]["files"][0]["path"], mmap_mode="r")
    gaussian = tokenizer.is_gaussian
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": True,
        "vqtok_version": __version__,
        "num_items": n,
        "kind": "continuous" if gaussian else "discrete",
        "vocab_size": None if gaussian else tokenizer.vocab_size,
        "dtype": str(first.dtype),
        "item_shape": list(first.shape[1:]),
        "grid": list(first.shape[-2:]),
        "augmentations": list(args.augmentations),
        "has_labels": any(bool((np.load(out / r["files"][1]["path"], mmap_mode="r") >= 0).any()) for r in records),
        "preprocess": to_dict(tokenizer.config.preprocess),
        "tokenizer": args.tokenizer,
        "args": args.as_json(),
        "shards": records,
    }
    _write_json(out / "manifest.json", manifest)


# ----------------------------------------------------------------------------------------------------------------
# Reading


class TokenDataset(Dataset):
    """Memory-mapped (codes, label) pairs of a token store, one item per (image, augmentation).

    `TokenDataset(path)` checks that the store is complete and every shard has its recorded size (`verify=True`
    also checks sha256); `tokenizer=` refuses a tokenizer whose weights differ from the store's. Item i is image
    i // A under augmentation i % A: (LongTensor [h, w] codes, or float16 latents [C, h, w]; int label).
    """

    def __init__(self, path: str | Path, *, tokenizer: Autoencoder | None = None, verify: bool = False):
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        if not self.manifest.get("complete"):
            raise TokenStoreError(f"{self.path}: the store is incomplete (encoding was interrupted); re-run the encode")
        self.kind = self.manifest["kind"]
        self.augmentations = self.manifest["augmentations"]
        self.vocab_size = self.manifest["vocab_size"]
        self.grid = tuple(self.manifest["grid"])
        self._codes, self._labels, self._starts = [], [], []
        for record in self.manifest["shards"]:
            codes_file, labels_file = (self.path / f["path"] for f in record["files"])
            for f in record["files"]:
                actual = (self.path / f["path"]).stat().st_size if (self.path / f["path"]).is_file() else None
                if actual != f["bytes"]:
                    raise TokenStoreError(
                        f"{self.path / f['path']}: {'missing' if actual is None else f'{actual} bytes'}, the manifest "
                        f"records {f['bytes']} (truncated or replaced shard)"
                    )
            try:
                codes = np.load(codes_file, mmap_mode="r", allow_pickle=False)
                labels = np.load(labels_file, mmap_mode="r", allow_pickle=False)
            except ValueError as e:
                raise TokenStoreError(f"{codes_file}: unreadable shard ({e})") from None
            if len(codes) != record["count"] or len(labels) != record["count"]:
                raise TokenStoreError(f"{codes_file}: {len(codes)} items, the manifest records {record['count']}")
            self._codes.append(codes)
            self._labels.append(labels)
            self._starts.append(record["start"])
        self._ends = np.cumsum([len(c) for c in self._codes])
        if verify:
            self.verify()
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)

    def __len__(self) -> int:
        return self.num_images * len(self.augmentations)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a store of {len(self)} items")
        codes, labels = self.gather([index])
        return codes[0], int(labels[0])

    def gather(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Items `indices` at once: (codes [n, h, w] LongTensor, or float16 latents [n, C, h, w]; labels [n])."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"indices out of range for a store of {len(self)} items")
        image, aug = np.divmod(index, len(self.augmentations))
        shard = np.searchsorted(self._ends, image, side="right")
        local = image - np.concatenate([[0], self._ends[:-1]])[shard]
        codes = np.empty((len(index), *self._codes[0].shape[2:]), dtype=self._codes[0].dtype)
        labels = np.empty(len(index), dtype=np.int64)
        for s in np.unique(shard):
            rows = shard == s
            codes[rows] = self._codes[s][local[rows], aug[rows]]
            labels[rows] = self._labels[s][local[rows]]
        codes_t = torch.from_numpy(codes)
        return (codes_t if self.kind == "continuous" else codes_t.long()), torch.from_numpy(labels)

    @property
    def num_images(self) -> int:
        return int(self._ends[-1])

    def label_range(self) -> tuple[int, int]:
        """The smallest and largest label in the store (-1 marks images without one)."""
        return (min(int(labels.min()) for labels in self._labels), max(int(labels.max()) for labels in self._labels))

    @property
    def tokenizer_identity(self) -> dict[str, Any]:
        """The tokenizer that made the store: source (Hub id or folder), revision, weights_sha256, config."""
        return self.manifest["tokenizer"]

    def load_tokenizer(self) -> Autoencoder:
        """Load the recorded tokenizer and check that its weights are the ones that made the store."""
        identity = self.tokenizer_identity
        if identity["source"] is None:
            raise TokenStoreError(f"{self.path}: made from an in-memory tokenizer; pass it with tokenizer=")
        tokenizer = load(identity["source"], revision=identity["revision"])
        self.check_tokenizer(tokenizer)
        return tokenizer

    def check_tokenizer(self, tokenizer: Autoencoder) -> None:
        expected = self.tokenizer_identity["weights_sha256"]
        actual = weights_sha256(tokenizer)
        if actual != expected:
            raise TokenStoreError(
                f"{self.path}: encoded by a tokenizer with weights {expected[:12]}..., not this one ({actual[:12]}...)"
            )

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest."""
        for record in self.manifest["shards"]:
            for f in record["files"]:
                if _sha256(self.path / f["path"]) != f["sha256"]:
                    raise TokenStoreError(f"{self.path / f['path']}: sha256 does not match the manifest (corrupted)")


# ----------------------------------------------------------------------------------------------------------------


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise TokenStoreError(f"{path}: no manifest.json; not a token store")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenStoreError(f"{manifest_path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TokenStoreError(f"{manifest_path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TokenStoreError(f"{manifest_path}: format version {manifest.get('format_version')}, this vqtok reads {FORMAT_VERSION}")
    if manifest.get("complete"):
        required = ("kind", "augmentations", "vocab_size", "grid", "shards", "tokenizer", "num_items")
        missing = [k for k in required if k not in manifest]
        if missing or not isinstance(manifest["shards"], list) or not manifest["shards"]:
            raise TokenStoreError(f"{manifest_path}: malformed manifest (missing or empty: {missing or ['shards']})")
        if sum(r.get("count", 0) for r in manifest["shards"]) != manifest["num_items"]:
            raise TokenStoreError(f"{manifest_path}: shard counts do not add up to num_items {manifest['num_items']}")
    return manifest


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with staged(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
