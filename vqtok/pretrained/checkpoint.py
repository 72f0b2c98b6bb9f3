"""Reading another library's weights without running its code: safetensors, or pickles under weights_only.

A `.ckpt`/`.pt`/`.pth`/`.bin` file is a pickle, which can run arbitrary code when loaded. vqtok reads one only with
`torch.load(weights_only=True)`, whose unpickler builds tensors and plain containers and nothing else; a file that
needs any other global (a Lightning callback, an argparse Namespace, an OmegaConf config, or worse) is refused with the
globals it asked for named. The weights are then found where the libraries put them: Lightning's `state_dict`,
LlamaGen's `model`, or the top level, with LDM's `first_stage_model.` prefix taken off a whole diffusion checkpoint.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
FIRST_STAGE_PREFIX = "first_stage_model."


@dataclass
class Checkpoint:
    """The tensors of one weights file, by name, and what was set aside on the way (name or prefix -> why)."""

    path: Path
    tensors: dict[str, torch.Tensor]
    set_aside: dict[str, str] = field(default_factory=dict)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.tensors.items()}


def read_checkpoint(path: str | Path, *, shapes_only: bool = False) -> Checkpoint:
    """The weights in a .safetensors file or a weights-only pickle (see the module docstring). `shapes_only`: a
    safetensors file's tensors are meta tensors (shape and dtype from its header, no data read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _strip_first_stage(Checkpoint(path, _read_safetensors(path, shapes_only)))
    if suffix in PICKLE_SUFFIXES:
        return _strip_first_stage(_unwrap(path, _read_pickle(path)))
    raise ValueError(f"{path}: not a weights file vqtok reads (.safetensors, or {', '.join(PICKLE_SUFFIXES)} "
                     "read with torch.load(weights_only=True))")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes: which checkpoint a converted tokenizer came from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def _read_safetensors(path: Path, shapes_only: bool) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            if not shapes_only:
                return {name: f.get_tensor(name) for name in f.keys()}
            slices = {name: f.get_slice(name) for name in f.keys()}
            return {name: torch.empty(s.get_shape(), dtype=SAFETENSORS_DTYPES.get(s.get_dtype(), torch.float32),
                                      device="meta") for name, s in slices.items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _read_pickle(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as e:
        globals_ = _unsafe_globals(path, e)
        raise ValueError(
            f"{path}: the pickle needs {', '.join(globals_) or 'a global'}, which is not a tensor or plain data; "
            "vqtok reads pickles only with torch.load(weights_only=True) and will not run it. In an environment you "
            "trust, load it and save its state_dict with safetensors.torch.save_file, then convert that file"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None


def _is_zip(path: Path) -> bool:
    """torch.save's zip format (memory-mappable) rather than the legacy one."""
    return zipfile.is_zipfile(path)


def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    """The globals a pickle asks for that weights_only refuses, named without loading it."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a legacy-format file: take the name from the error message
        return re.findall(r"GLOBAL ([\w.]+)", str(error))[:1]


def _unwrap(path: Path, obj: Any) -> Checkpoint:
    """The state dict inside what torch.load returned: obj['state_dict'] (Lightning: taming, LDM), obj['model']
    (LlamaGen) or obj itself; the wrapper's other entries (optimizer states, step counters) are set aside."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    set_aside = {}
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), dict):
            set_aside = {str(k): "the checkpoint's training state, not weights" for k in obj if k != key}
            obj = obj[key]
            break
    tensors, other = {}, []
    for name, value in obj.items():
        if torch.is_tensor(value):
            tensors[str(name)] = value
        else:
            other.append(str(name))
    if other:
        raise ValueError(f"{path}: entries that are not tensors where the weights should be: {', '.join(other[:5])}")
    return Checkpoint(path, tensors, set_aside)


def _strip_first_stage(checkpoint: Checkpoint) -> Checkpoint:
    """A whole LDM / Stable Diffusion checkpoint: keep its first stage (the autoencoder), set the rest aside."""
    names = checkpoint.tensors
    if not any(n.startswith(FIRST_STAGE_PREFIX) for n in names):
        return checkpoint
    kept = {n[len(FIRST_STAGE_PREFIX):]: t for n, t in names.items() if n.startswith(FIRST_STAGE_PREFIX)}
    rest = len(names) - len(kept)
    set_aside = dict(checkpoint.set_aside)
    if rest:
        set_aside[f"{rest} tensors outside {FIRST_STAGE_PREFIX}"] = (
            "the rest of a latent diffusion checkpoint (diffusion model, conditioning, EMA)")
    return Checkpoint(checkpoint.path, kept, set_aside)
