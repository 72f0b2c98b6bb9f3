"""The Hub format: a folder of `config.json` + `model.safetensors` + a model card, on top of huggingface_hub.

`HubModel` builds on `huggingface_hub.ModelHubMixin` (save_pretrained, push_to_hub, model cards) and replaces its
loading: the class comes from `config.json`'s `model_type`, the config is parsed strictly, weights are read only
from safetensors (a folder or repo with only `pytorch_model.bin` is refused, never unpickled), and every tensor of
the model must be in the file and nothing else. `vqtok.load` is `HubModel.from_pretrained`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from huggingface_hub import ModelHubMixin, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from packaging.version import InvalidVersion, Version
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vqtok.config import ConfigError, from_dict, to_dict
from vqtok.files import staged
from vqtok.version import __version__

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLED_WEIGHTS = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "model.ckpt",
                   "diffusion_pytorch_model.bin")
RESERVED_KEYS = ("model_type", "vqtok_version")

MODEL_TYPES: dict[str, type["HubModel"]] = {}


@dataclass(frozen=True)
class LoadedFrom:
    """Where a loaded model came from: a resolved local folder (commit None) or a Hub repo id at a commit."""

    source: str
    commit: str | None = None
    subfolder: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.commit is not None
M = TypeVar("M", bound="HubModel")

MODEL_CARD = """---
{{ card_data }}
---

# {{ title }}

{{ intro }}

```python
import vqtok
model = vqtok.load("{{ repo_id }}")
```

## Model
| | |
|---|---|
{% for key, value in facts.items() -%}
| {{ key }} | {{ value }} |
{% endfor %}
{% if metrics %}
## Measured
| metric | value |
|---|---|
{% for key, value in metrics.items() -%}
| {{ key }} | {{ value }} |
{% endfor %}
{% endif %}
The full configuration is in `config.json`; weights are in `model.safetensors` (no pickles).
"""


class HubModel(
    nn.Module,
    ModelHubMixin,
    library_name="vqtok",
    tags=["vqtok"],
    repo_url="https://github.com/vqtok/vqtok",
    model_card_template=MODEL_CARD,
):
    """Base of every saved vqtok model. Subclasses declare `model_type=...` and a `config_class` dataclass."""

    model_type: ClassVar[str]
    config_class: ClassVar[type]
    derived_keys: ClassVar[tuple[str, ...]] = ()  # the keys `derived_config` writes
    config: Any
    loaded_from: LoadedFrom | None = None  # set by from_pretrained

    def __init_subclass__(cls, model_type: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if model_type is not None:
            if model_type in MODEL_TYPES:
                raise TypeError(f"model_type {model_type!r} is registered twice")
            cls.model_type = model_type
            MODEL_TYPES[model_type] = cls

    def derived_config(self) -> dict[str, Any]:
        """Facts implied by the config (downsampling factor, grid, vocabulary...), written to config.json for the
        reader and checked against the config on load."""
        return {}

    # ------------------------------------------------------------------------------------------------------------
    # Saving

    def config_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "vqtok_version": __version__,
            **self.derived_config(),
            **to_dict(self.config),
        }

    def save_pretrained(  # type: ignore[override]
        self,
        save_directory: str | Path,
        *,
        config: None = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Write config.json, model.safetensors and (if absent) a model card README.md into `save_directory`.

        Both files are written to temporaries first and renamed into place only when both are complete, so a
        failed save leaves an existing folder as it was. `model_card_kwargs` (e.g. `metrics={...}`) fill the card.
        """
        if config is not None:
            raise ValueError("the config of a vqtok model is its own `config`; do not pass another to save_pretrained")
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self._save_pretrained(save_directory)
        card_path = save_directory / "README.md"
        # A card vqtok wrote is rewritten (its metrics would go stale); one a person wrote is kept.
        if not card_path.exists() or "library_name: vqtok" in card_path.read_text(errors="replace"):
            self.generate_model_card(**(model_card_kwargs or {})).save(card_path)
        if push_to_hub:
            return self.push_to_hub(repo_id or save_directory.name, model_card_kwargs=model_card_kwargs,
                                    **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        text = json.dumps(self.config_dict(), indent=2) + "\n"
        # Both files are written before either is renamed; the weights are renamed first, the config last (the
        # commit of the pair).
        with staged(save_directory / CONFIG_NAME) as config, staged(save_directory / WEIGHTS_NAME) as weights:
            save_file(tensors, weights, metadata={"format": "pt"})
            Path(config).write_text(text)

    def generate_model_card(self, *args: Any, **kwargs: Any):
        facts = {"model type": self.model_type, "parameters": f"{sum(p.numel() for p in self.parameters()):,}"}
        facts.update({k.replace("_", " "): v for k, v in self.derived_config().items() if v is not None})
        kwargs.setdefault("title", f"vqtok {self.model_type}")
        kwargs.setdefault("description", self.model_type)
        kwargs.setdefault("repo_id", "ORG/NAME")
        kwargs.setdefault("metrics", {})
        kwargs.setdefault("intro", f"A {kwargs['description']} made with [vqtok](https://github.com/vqtok/vqtok).")
        return super().generate_model_card(*args, facts=facts, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls: type[M],
        pretrained_model_name_or_path: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        token: str | bool | None = None,
        local_files_only: bool = False,
        map_location: str | torch.device = "cpu",
        subfolder: str | None = None,
    ) -> M:
        """Load from a local folder or a Hub repo id (`revision`: branch, tag or commit), strictly and pickle-free.

        `subfolder` loads a model saved inside another's folder (a prior's `tokenizer/`). The model remembers where
        it came from in `loaded_from` (the folder or repo id, the commit when it came from the Hub, the subfolder).
        """
        source = str(pretrained_model_name_or_path)
        fetch = dict(revision=revision, cache_dir=cache_dir, force_download=force_download, token=token,
                     local_files_only=local_files_only)
        prefix = f"{subfolder.strip('/')}/" if subfolder else ""
        config_path = _resolve(source, prefix + CONFIG_NAME, **fetch)
        # A Hub download's commit (a local folder that happens to be a snapshot is still a local folder)
        commit = None if os.path.isdir(source) else _snapshot_commit(config_path, depth=prefix.count("/"))
        if commit is not None:  # fetch the weights from the same commit, even if the branch moves meanwhile
            fetch["revision"] = commit
        raw = _read_config_json(config_path)
        if "model_type" not in raw:
            from vqtok.pretrained import convert, foreign_format

            if foreign_format(raw) is not None:  # diffusers or LlamaGen: converted as it loads
                model = convert(source, revision=revision, subfolder=subfolder, map_location=map_location, **{
                    k: v for k, v in fetch.items() if k != "revision"})
                if cls is not HubModel and not isinstance(model, cls):
                    raise ConfigError(f"{config_path}: holds an image tokenizer, not a {cls.model_type!r}")
                return model  # type: ignore[return-value]
        model_cls = _model_class(raw, config_path)
        if cls is not HubModel and not issubclass(model_cls, cls):
            raise ConfigError(f"{config_path}: holds a {raw['model_type']!r} model, not a {cls.model_type!r}")
        config = parse_config(model_cls, raw, source=str(config_path))
        model = model_cls(config)
        model.check_derived(raw, source=str(config_path))
        weights_path = _resolve(source, prefix + WEIGHTS_NAME, **fetch)
        model.to(map_location)
        load_weights_strict(model, weights_path, map_location=map_location)
        model.eval()
        model.loaded_from = LoadedFrom(source=source if commit else str(Path(source).resolve()),
                                       commit=commit, subfolder=subfolder)
        return model

    def check_derived(self, raw: dict[str, Any], *, source: str) -> None:
        for key, expected in self.derived_config().items():
            if key in raw and raw[key] != expected:
                raise ConfigError(f"{source}: '{key}' is {raw[key]!r} but the config implies {expected!r}")


def load(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    map_location: str | torch.device = "cpu",
    **hub_kwargs: Any,
) -> HubModel:
    """Load any vqtok model (tokenizer or prior) from a folder or a Hub repo id, e.g. `load("org/name")`.

    A repo id may carry its revision as `org/name@revision`. The class is picked from config.json.
    """
    name = str(name_or_path)
    if "@" in name and not os.path.exists(name):
        name, at_revision = name.rsplit("@", 1)
        if revision is not None and revision != at_revision:
            raise ValueError(f"two revisions given: '@{at_revision}' and revision={revision!r}")
        revision = at_revision
    return HubModel.from_pretrained(name, revision=revision, map_location=map_location, **hub_kwargs)


def weights_sha256(model: nn.Module) -> str:
    """A hash of every tensor of the model (name, dtype, shape, bytes, in name order): identifies a tokenizer's
    weights whatever file they came from, so token stores and priors can refuse a different one."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def parse_config(model_cls: type[HubModel], raw: dict[str, Any], *, source: str) -> Any:
    """The config dataclass from config.json content, without the reserved and derived keys."""
    skip = set(RESERVED_KEYS) | set(model_cls.derived_keys)
    fields = {k: v for k, v in raw.items() if k not in skip}
    return from_dict(model_cls.config_class, fields, source=source)


def load_weights_strict(model: nn.Module, path: str | Path, *, map_location: str | torch.device = "cpu") -> None:
    """Load a safetensors file into `model`; a missing, unexpected or mis-shaped tensor is an error naming it."""
    try:
        tensors = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {_some(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {_some(unexpected)}")
        raise ValueError(f"{path}: weights do not match the model's config ({'; '.join(parts)})")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}"
            )
        if tensor.dtype != expected[name].dtype and not (tensor.is_floating_point() and expected[name].is_floating_point()):
            raise ValueError(f"{path}: tensor '{name}' is {tensor.dtype}, the model expects {expected[name].dtype}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor '{name}' contains NaN or infinite values")
    model.load_state_dict(tensors, strict=True)


# ----------------------------------------------------------------------------------------------------------------


def _resolve(source: str, filename: str, **fetch: Any) -> str:
    """Path of `filename` in a local folder or a (cached) Hub repo; refuses pickled weights with a clear error."""
    if os.path.isdir(source):
        path = os.path.join(source, filename)
        if os.path.isfile(path):
            return path
        _missing_file(source, filename, present=set(os.listdir(source)))
    if os.path.exists(source):
        raise ValueError(f"{source} is a file; vqtok models are folders with {CONFIG_NAME} and {WEIGHTS_NAME} (another "
                         "library's checkpoint file: `vqtok convert FILE OUT` or vqtok.pretrained.convert)")
    reason = _local_path_reason(source, fetch.get("revision"))
    if reason is not None:
        raise FileNotFoundError(f"no local folder {source} (not looked up on the Hub: {reason})")
    try:
        return hf_hub_download(repo_id=source, filename=filename, **fetch)
    except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: first)
        raise FileNotFoundError(
            f"{source}: no local folder of that name, and the Hub repo's {filename} is not in the local Hub cache and "
            "the Hub cannot be reached (offline, or HF_HUB_OFFLINE=1?)"
        ) from None
    except EntryNotFoundError as e:
        _missing_file(source, filename, present=set(), cause=e)
    except GatedRepoError:
        raise PermissionError(f"{source}: a gated repository; accept its terms on the Hub and log in") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{source}: revision {fetch.get('revision')!r} not found") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{source}: neither a local folder nor a Hub repository you can access (private? log in)"
        ) from None
    except HFValidationError as e:
        raise FileNotFoundError(f"{source}: not a local folder, and not a valid Hub repo id ({e})") from None


FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".yaml", ".yml", ".npy", ".npz", ".png",
                 ".jpg", ".txt", ".md")


def _local_path_reason(source: str, revision: str | None) -> str | None:
    """Why `source`, which names no local file or folder, is taken for a mistyped local path rather than a Hub repo
    id (None: it may be a repo id, and the Hub is asked). A Hub repo id is exactly `org/name` in the Hub's characters,
    so a name that starts with '.', '~' or '/', has no '/' or several, contains a backslash, or ends in a file
    suffix is a path; so is `org/name` where `org` is a local folder (`runs/mytokenizer`), unless a revision is
    given (`runs/mytokenizer@main` means the Hub repo). Deciding this at once spares the Hub's retries (seconds
    to minutes offline) for what is only a typo."""
    if source.startswith((".", "~", "/")) or os.path.isabs(source) or "\\" in source:
        return "it is written as a path"
    if source.count("/") != 1:
        return "a Hub repo id has the form org/name"
    if source.lower().endswith(FILE_SUFFIXES):
        return "it ends in a file suffix"
    try:
        validate_repo_id(source)
    except HFValidationError:
        return "not a valid Hub repo id"
    org = source.split("/")[0]
    if revision is None and os.path.isdir(org):
        return f"{org}/ is a local folder; for the Hub repo of that name give a revision, {source}@main"
    return None


def _snapshot_commit(path: str, depth: int = 0) -> str | None:
    """The commit of a file in the Hub cache (.../snapshots/<commit>/[depth sub-folders/]file), None for a local
    folder."""
    parts = Path(path).parts
    if len(parts) >= 3 + depth and parts[-3 - depth] == "snapshots" and len(parts[-2 - depth]) == 40:
        return parts[-2 - depth]
    return None


def _missing_file(source: str, filename: str, *, present: set[str], cause: Exception | None = None) -> None:
    pickled = sorted(present & set(PICKLED_WEIGHTS))
    if filename.endswith(".safetensors") and pickled:
        raise ValueError(
            f"{source}: has {', '.join(pickled)} but no {filename.rsplit('/', 1)[-1]}; vqtok loads weights only from "
            "safetensors and never unpickles files (a pickle can run arbitrary code). Convert the checkpoint with a "
            "trusted script and save_pretrained() (or `vqtok convert FILE OUT`, which reads it weights-only)."
        )
    hint = f" ({type(cause).__name__})" if cause is not None else ""
    if filename == CONFIG_NAME and "model_index.json" in present:
        hint += "; it is a diffusers pipeline: its VAE is in a sub-folder, load it with subfolder='vae'"
    raise FileNotFoundError(f"{source}: no {filename}{hint}")


def _read_config_json(path: str) -> dict[str, Any]:
    """config.json as a dict, strictly: a key given twice in one object is an error (JSON parsers keep the last)."""
    try:
        raw = json.loads(Path(path).read_text(), object_pairs_hook=_refuse_duplicate_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except _DuplicateJSONKey as e:
        raise ConfigError(f"{path}: key {e.args[0]!r} is given twice in one object") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must hold a JSON object, got {type(raw).__name__}")
    return raw


class _DuplicateJSONKey(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateJSONKey(key)
        obj[key] = value
    return obj


def _model_class(raw: dict[str, Any], path: str) -> type[HubModel]:
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise ConfigError(f"{path}: unknown model_type {model_type!r}; this vqtok knows {sorted(MODEL_TYPES)}")
    saved = raw.get("vqtok_version")
    try:
        saved_version = Version(str(saved))
    except InvalidVersion:
        raise ConfigError(f"{path}: 'vqtok_version' is missing or invalid: {saved!r}") from None
    if saved_version > Version(__version__):
        raise ConfigError(
            f"{path}: saved by vqtok {saved_version}, newer than the installed {__version__}; upgrade vqtok to load it"
        )
    return MODEL_TYPES[model_type]


def _some(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")
