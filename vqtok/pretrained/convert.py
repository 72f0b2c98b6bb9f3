"""Tokenizers of other libraries as vqtok `Autoencoder`s: find the weights, translate the config, load strictly.

    tok = vqtok.load("stabilityai/sd-vae-ft-mse")                    # a diffusers repo: converted as it loads
    tok = vqtok.pretrained.convert("vqgan_imagenet_f16_16384.ckpt", config="model.yaml")   # a taming checkpoint
    tok.save_pretrained("vqgan-f16")                                  # a vqtok folder (what `vqtok convert` writes)

Sources: a diffusers folder or Hub repo (config.json with `_class_name` AutoencoderKL or VQModel, and
diffusion_pytorch_model.safetensors), a LlamaGen Hub-style folder (config.json of its ModelArgs, model.safetensors), or
a single file in any of the three layouts (`layouts.py`: safetensors, or a pickle read with weights_only). The
config comes from the folder, from the user (`config`: a taming/LDM YAML or LlamaGen's ModelArgs), or from the
tensors' shapes (`configs.config_from_shapes`). Loading is strict: each tensor the model needs must be in the file
with its shape, and every other tensor of the file is an error unless the layout names it as deliberately left out
(taming's `loss.*`, LlamaGen's `codebook_used`, the diffusion model around an LDM first stage). Converting twice
gives the same weights, so a token store or prior that records a converted tokenizer's weight hash finds it again.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from vqtok.config import AutoencoderConfig, ConfigError, ConvertedFrom
from vqtok.hub import CONFIG_NAME, WEIGHTS_NAME, LoadedFrom, _read_config_json, _resolve, _snapshot_commit, _some
from vqtok.models.autoencoder import Autoencoder
from vqtok.pretrained.checkpoint import Checkpoint, file_sha256, read_checkpoint
from vqtok.pretrained.configs import (
    DEFAULT_RESOLUTION,
    config_from_shapes,
    diffusers_config,
    ldm_config,
    llamagen_config,
)
from vqtok.pretrained.layouts import LAYOUTS, Layout, detect_layout, is_1x1_of, layout_for

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
FORMATS = tuple(LAYOUTS)


def foreign_format(raw: Mapping[str, Any]) -> str | None:
    """The format a config.json that is not vqtok's belongs to: 'diffusers' (it has `_class_name`), 'llamagen' (its
    ModelArgs), or None."""
    if "model_type" in raw:
        return None
    if "_class_name" in raw:
        return "diffusers"
    if "codebook_embed_dim" in raw or "encoder_ch_mult" in raw:
        return "llamagen"
    return None


@dataclass
class Located:
    """A source's weights file, its config.json (None for a single file) and where it came from."""

    checkpoint: Checkpoint
    raw_config: dict[str, Any] | None
    loaded_from: LoadedFrom
    card_license: str | None = None

    @property
    def where(self) -> str:
        return str(self.checkpoint.path)


@dataclass
class Conversion:
    """A converted config with the layout its weights are named in, and what the file holds besides."""

    config: AutoencoderConfig
    layout: Layout
    located: Located

    @property
    def set_aside(self) -> dict[str, str]:
        """Tensors (or groups of them) of the file that are deliberately not part of the tokenizer -> why."""
        ignored = {name: reason for name in self.located.checkpoint.tensors
                   if (reason := self.layout.why_ignored(name)) is not None}
        return {**self.located.checkpoint.set_aside, **ignored}


def convert(
    source: str | Path,
    *,
    format: str | None = None,
    config: Mapping[str, Any] | str | Path | None = None,
    resolution: int | None = None,
    norm_groups: int | None = None,
    l2_normalize: bool | None = None,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    license: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    map_location: str | torch.device = "cpu",
    **fetch: Any,
) -> Autoencoder:
    """An `Autoencoder` holding the weights of another library's tokenizer (see the module docstring).

    `format` ('diffusers', 'ldm', 'llamagen') is detected from config.json or the tensor names when not given.
    `config`: a taming/LDM model YAML (path or mapping) or LlamaGen ModelArgs; without one, a single file's config is
    read off its tensors, at `resolution` (default 256; it only places attention) with `norm_groups` (default 32)
    and, for VQ, `l2_normalize` (default: LlamaGen's codes are, others' not). `scaling_factor` / `shift_factor` record
    the latent normalisation of a file that does not carry it (FLUX's ae.safetensors: 0.3611 and 0.1159). `license`
    is recorded in the config and the model card. `fetch`: huggingface_hub download options (cache_dir, token,
    force_download, local_files_only)."""
    conversion = plan(source, format=format, config=config, resolution=resolution, norm_groups=norm_groups,
                      l2_normalize=l2_normalize, scaling_factor=scaling_factor, shift_factor=shift_factor,
                      license=license, revision=revision, subfolder=subfolder, **fetch)
    with torch.random.fork_rng(devices=[]):  # the vqtok-only buffers (a quantizer's RNG seed) the same every time
        torch.manual_seed(0)
        model = Autoencoder(conversion.config)
    load_mapped(model, conversion.located.checkpoint, conversion.layout)
    model.to(map_location).eval()
    model.loaded_from = conversion.located.loaded_from
    return model


def plan(source: str | Path, *, format: str | None = None, config: Mapping[str, Any] | str | Path | None = None,
         resolution: int | None = None, norm_groups: int | None = None, l2_normalize: bool | None = None,
         scaling_factor: float | None = None, shift_factor: float | None = None, license: str | None = None,
         revision: str | None = None, subfolder: str | None = None, shapes_only: bool = False,
         **fetch: Any) -> Conversion:
    """What `convert` would build, without building it (`shapes_only`: the weights are not read, only their shapes:
    `vqtok info`)."""
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    located = locate(str(source), revision=revision, subfolder=subfolder, shapes_only=shapes_only, **fetch)
    names = located.checkpoint.tensors.keys()
    detected = detect_layout(names)
    raw = located.raw_config
    fmt = format or (foreign_format(raw) if raw is not None else None) or (detected.format if detected else None)
    if fmt is None:
        raise ValueError(f"{located.where}: tensor names of no layout vqtok knows (diffusers, LDM/taming, LlamaGen); "
                         f"it has e.g. {', '.join(sorted(names)[:3])}")
    if detected is not None and detected.format != fmt:
        raise ValueError(f"{located.where}: its tensor names are {detected.format}'s, not {fmt}'s; drop --format or "
                         f"give --format {detected.format}")
    layout = layout_for(fmt, names)
    from_file = raw is not None and foreign_format(raw) == fmt
    if from_file and config is not None:
        raise ValueError(f"{located.where}: the source carries its config ({CONFIG_NAME}); do not give another")
    user = _read_user_config(config) if config is not None else (raw if from_file else None)
    guessed = user is None
    if not guessed and (resolution is not None or norm_groups is not None or l2_normalize is not None):
        raise ValueError("resolution, norm_groups and l2_normalize describe a checkpoint that has no config; this one "
                         "has a config, which sets them")
    where = f"{located.where} ({fmt} config)"
    if guessed:
        c = config_from_shapes(located.checkpoint.shapes(), layout, where=where,
                               resolution=resolution or DEFAULT_RESOLUTION, norm_groups=norm_groups or 32,
                               l2_normalize=l2_normalize)
    elif fmt == "diffusers":
        c = diffusers_config(user, where=where)
    elif fmt == "ldm":
        c = ldm_config(user, where=where)
    else:
        c = llamagen_config(user, where=where)
    if fmt == "diffusers" and not guessed and (scaling_factor is not None or shift_factor is not None):
        raise ValueError(f"{where}: sets scaling_factor and shift_factor itself; do not give them")
    origin = located.loaded_from
    provenance = ConvertedFrom(
        format=fmt, source=origin.source, revision=origin.commit,
        weights_sha256=None if shapes_only else file_sha256(located.checkpoint.path),
        class_name=(raw or {}).get("_class_name") if from_file else None, license=license or located.card_license)
    c = dataclasses.replace(
        c, converted_from=provenance,
        **({"scaling_factor": scaling_factor} if scaling_factor is not None else {}),
        **({"shift_factor": shift_factor} if shift_factor is not None else {}))
    return Conversion(c, layout, located)


def locate(source: str, *, revision: str | None = None, subfolder: str | None = None, shapes_only: bool = False,
           **fetch: Any) -> Located:
    """The weights file and config of a single file, a local folder, or a Hub repo (downloaded or from the cache)."""
    if os.path.isfile(source):
        if subfolder is not None or revision is not None:
            raise ValueError(f"{source} is a file: subfolder and revision apply to folders and Hub repos")
        path = Path(source).resolve()
        checkpoint = read_checkpoint(path, shapes_only=shapes_only)
        return Located(checkpoint, None, LoadedFrom(source=str(path)))
    hub = dict(fetch, revision=revision)
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    config_path = _resolve(source, prefix + CONFIG_NAME, **hub)
    commit = None if os.path.isdir(source) else _snapshot_commit(config_path, depth=prefix.count("/"))
    if commit is not None:
        hub["revision"] = commit
    raw = _read_config_json(config_path)
    fmt = foreign_format(raw)
    if fmt is None:
        what = "a vqtok model: load it with vqtok.load" if "model_type" in raw else "not a config vqtok can convert"
        raise ValueError(f"{config_path}: {what}")
    weights = _resolve(source, prefix + (DIFFUSERS_WEIGHTS if fmt == "diffusers" else WEIGHTS_NAME), **hub)
    origin = LoadedFrom(source=source if commit else str(Path(source).resolve()), commit=commit, subfolder=subfolder)
    return Located(read_checkpoint(weights, shapes_only=shapes_only), raw, origin, _card_license(source, hub))


def _card_license(source: str, hub: dict[str, Any]) -> str | None:
    """The `license` of the repo's or folder's model card (its top-level README.md metadata: a pipeline's licence
    covers its VAE), if it has one."""
    try:
        readme = _resolve(source, "README.md", **hub)
    except (FileNotFoundError, ValueError, OSError):
        return None
    from huggingface_hub import ModelCard

    try:
        value = ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # a card that does not parse names no licence
        return None
    return str(value) if value else None


def _read_user_config(config: Mapping[str, Any] | str | Path) -> Mapping[str, Any]:
    if isinstance(config, Mapping):
        return config
    path = Path(config)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: must hold a mapping, got {type(data).__name__}")
    return data


def load_mapped(model: Autoencoder, checkpoint: Checkpoint, layout: Layout) -> None:
    """Fill `model` with the checkpoint's tensors through `layout`, strictly (see the module docstring): errors name
    tensors by the checkpoint's own names. The quantizer's vqtok-only state (EMA sums, usage counters) keeps its
    fresh values: only its codebook comes from the file."""
    where = str(checkpoint.path)
    state = model.state_dict()
    levels = len(model.config.channel_mult)
    targets = {name: t for name, t in state.items()
               if not name.startswith("bottleneck.") or name == "bottleneck.codebook"}
    expected = {layout.source_name(name, levels): name for name in targets}
    present = checkpoint.tensors
    missing = sorted(set(expected) - set(present))
    unexpected = sorted(n for n in set(present) - set(expected) if layout.why_ignored(n) is None)
    if missing or unexpected:
        parts = [f"{what} {len(names)} tensor(s): {_some(names)}" for what, names in
                 (("missing", missing), ("unexpected", unexpected)) if names]
        raise ValueError(f"{where}: the {layout.format} weights do not match the config ({'; '.join(parts)})")
    for source_name, name in expected.items():
        tensor, want = present[source_name], tuple(targets[name].shape)
        if tuple(tensor.shape) != want:
            if not is_1x1_of(tuple(tensor.shape), want):
                raise ValueError(f"{where}: tensor '{source_name}' has shape {tuple(tensor.shape)}, the config gives "
                                 f"{want}")
            tensor = tensor.reshape(want)
        if not tensor.is_floating_point():
            raise ValueError(f"{where}: tensor '{source_name}' is {tensor.dtype}, not floating point")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{where}: tensor '{source_name}' contains NaN or infinite values")
        state[name] = tensor.to(targets[name].dtype)
    model.load_state_dict(state, strict=True)
