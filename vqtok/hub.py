"""The Hub format: a folder of `config.json` + `model.safetensors` + a model card, on top of huggingface_hub.

`HubModel` builds on `huggingface_hub.ModelHubMixin` (save_pretrained, push_to_hub, model cards) and replaces its
loading: the class comes from `config.json`'s `model_type`, the config is parsed strictly, weights are read only
from safetensors (a folder or repo with only `pytorch_model.bin` is refused, never unpickled), and every tensor of
the model must be in the file and nothing else. `vqtok.load` is `HubModel.from_pretrained`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, ModelHubMixin, hf_hub_download
from huggingface_hub.utils import (  # (not huggingface_hub.errors: it holds them only from 0.24 on)
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    validate_repo_id,
)
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

## Usage

```python
{{ usage }}
```
{% if image %}
![{{ image_caption }}]({{ image }})

*{{ image_caption }}*
{% endif %}
## Model
| | |
|---|---|
{% for key, value in facts.items() -%}
| {{ key }} | {{ value }} |
{% endfor %}
{% if metrics %}
## Measured
{% if eval_dataset %}
On {{ eval_dataset }}.
{% endif %}
| metric | value |
|---|---|
{% for key, value in metrics.items() -%}
| {{ key }} | {{ value }} |
{% endfor %}
{% endif %}
## Intended use

{{ intended_use }}

## Limitations

{{ limitations }}

## Files

- `config.json`: the configuration; `model.safetensors`: the weights (safetensors: no pickles)
{% for name, what in files.items() -%}
- `{{ name }}`: {{ what }}
{% endfor %}
<!-- vqtok-card {{ inputs }} -->
"""
# What a card is made from (the keywords of `HubModel.generate_model_card`): recorded in the card's last line, so
# that `vqtok push` can tell a card vqtok wrote from one a person edited, and remake it naming the real repo.
CARD_MARKER = "<!-- vqtok-card "
CARD_KEYS = ("repo_id", "subfolder", "metrics", "license", "datasets", "eval_dataset", "files", "image",
             "image_caption", "title", "intro", "description", "tags", "pipeline_tag")
PLACEHOLDER_REPO = "ORG/NAME"
# Metrics that count what was measured rather than measure the model: in the card's table, not in its model-index.
COUNT_METRICS = frozenset({"images", "held_out_images", "steps", "processes", "iwae_samples"})
TOKENIZER_LIMITATIONS = (
    "Reconstructions are lossy: fine detail, small text and faces are the first to go. The model was trained on the "
    "data named in its training configuration (`training_config.yaml` when it was published from a vqtok run) at the "
    "resolution in the table above; on other kinds of images, or other sizes, its quality is unmeasured and can be "
    "much lower. The measured numbers hold for the data they were measured on, nowhere else. It inherits the biases "
    "and gaps of its training data and has not been evaluated for any use involving people."
)


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
        failed save leaves an existing folder as it was. `model_card_kwargs` fill the card (`generate_model_card`:
        metrics, license, datasets, ...); its usage line loads `repo_id` when given, else this folder.
        """
        if config is not None:
            raise ValueError("the config of a vqtok model is its own `config`; do not pass another to save_pretrained")
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self._save_pretrained(save_directory)
        card_path = save_directory / "README.md"
        # A card vqtok wrote is rewritten (its metrics would go stale); one a person wrote is kept.
        if not card_path.exists() or "library_name: vqtok" in card_path.read_text(errors="replace"):
            card_kwargs = {"repo_id": repo_id or str(save_directory), **(model_card_kwargs or {})}
            self.generate_model_card(**card_kwargs).save(card_path)
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

    def push_to_hub(  # type: ignore[override]
        self,
        repo_id: str,
        *,
        config: None = None,
        commit_message: str = "Upload vqtok model",
        private: bool | None = None,
        token: str | None = None,
        branch: str | None = None,
        create_pr: bool | None = None,
        allow_patterns: list[str] | str | None = None,
        ignore_patterns: list[str] | str | None = None,
        delete_patterns: list[str] | str | None = None,
        model_card_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """Upload the model to the Hub repo `repo_id` (created if needed) in one commit; returns the commit's URL.

        The model card names the repo as the Hub resolved it (a bare name gets your namespace), so its usage line
        is `vqtok.load("org/name")`. Other arguments as huggingface_hub's `ModelHubMixin.push_to_hub`."""
        if config is not None:
            raise ValueError("the config of a vqtok model is its own `config`; do not pass another to push_to_hub")
        card_kwargs = dict(model_card_kwargs or {})
        api = HfApi(token=token)
        resolved = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
        if card_kwargs.get("repo_id", resolved) not in (repo_id, resolved):
            raise ValueError(f"model_card_kwargs names the repo {card_kwargs['repo_id']!r} but the model is pushed to "
                             f"{resolved!r}; leave repo_id out of model_card_kwargs")
        card_kwargs["repo_id"] = resolved
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, model_card_kwargs=card_kwargs)
            for subfolder, model in self.card_submodels().items():  # a prior's tokenizer/ names the repo too
                card_path = Path(tmp) / subfolder / "README.md"
                card_path.write_text(card_for_push(model, card_path, resolved, subfolder=subfolder)[0])
            return api.upload_folder(repo_id=resolved, repo_type="model", folder_path=tmp,
                                     commit_message=commit_message, revision=branch, create_pr=create_pr,
                                     allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
                                     delete_patterns=delete_patterns)

    # ------------------------------------------------------------------------------------------------------------
    # The model card

    card_task: ClassVar[tuple[str, str]] = ("image-to-image", "Image reconstruction")  # model-index's task

    def card_defaults(self, load: str) -> dict[str, Any]:
        """The parts of the model card that depend on the kind of model (subclasses override): description, tags
        (besides 'vqtok'), pipeline_tag, usage (Python that loads the model with `load`, e.g. `vqtok.load("org/name")`),
        intended_use, limitations; optionally title, intro, license and files."""
        return {
            "description": self.model_type.replace("_", " "),
            "tags": [],
            "pipeline_tag": None,
            "usage": f"import vqtok\n\nmodel = {load}",
            "intended_use": "Research on image tokenizers and generative models of images.",
            "limitations": "Not evaluated beyond the numbers on this card.",
        }

    def card_submodels(self) -> dict[str, HubModel]:
        """The models saved in sub-folders of this one's folder, with cards of their own: {subfolder: model}."""
        return {}

    def card_facts(self) -> dict[str, Any]:
        """The rows of the card's "Model" table: type, parameters and the facts the config implies."""
        facts = {"model type": self.model_type, "parameters": f"{sum(p.numel() for p in self.parameters()):,}"}
        if getattr(self.config, "resolution", None) is not None:
            facts["resolution"] = self.config.resolution
        facts.update({k.replace("_", " "): v for k, v in self.derived_config().items() if v is not None})
        return facts

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The model card (README.md), in the Hub's conventions: a YAML header (library_name, license, tags,
        pipeline_tag, datasets, and the metrics as a model-index), usage, the model's facts, the measured metrics,
        intended use, limitations and the files.

        Keywords, all optional: `repo_id` (what the usage line loads: a Hub repo id or a folder; default ORG/NAME),
        `subfolder` (where in it the model lies), `metrics` ({name: value}), `license` (a Hub licence id such as
        apache-2.0 or mit: the licence of these weights, which vqtok's own licence does not decide; a converted
        model's default is the original's), `datasets` (Hub dataset ids of the training data), `eval_dataset` (what
        the metrics were measured on), `files` ({file: what it holds}: files uploaded beside the model), `image` and
        `image_caption` (a picture in the repo), `title`, `intro`, `description`, `tags` (added to vqtok's) and
        `pipeline_tag`. The keywords are recorded in the card's last line (an HTML comment), from which `vqtok push`
        remakes it for the repo it uploads to."""
        if args:
            raise TypeError("generate_model_card takes keyword arguments only")
        unknown = sorted(set(kwargs) - set(CARD_KEYS))
        if unknown:
            raise TypeError(f"unknown model card keyword(s) {', '.join(unknown)}; known: {', '.join(CARD_KEYS)}")
        given = {k: v for k, v in kwargs.items() if v is not None}
        name = given.get("repo_id", PLACEHOLDER_REPO)
        defaults = self.card_defaults(load_call(name, given.get("subfolder")))
        parts = {**defaults, **given}
        parts["tags"] = list(dict.fromkeys(["vqtok", *defaults["tags"], *given.get("tags", [])]))
        parts["files"] = {**defaults.get("files", {}), **given.get("files", {})}
        description = parts["description"]
        metrics = dict(parts.get("metrics") or {})
        datasets = list(parts.get("datasets") or [])
        results = _eval_results(metrics, self.card_task, datasets, parts.get("eval_dataset"))
        data = ModelCardData(
            library_name="vqtok", license=parts.get("license"), tags=parts["tags"],
            pipeline_tag=parts.get("pipeline_tag"), datasets=datasets or None, eval_results=results or None,
            model_name=name.rstrip("/").rsplit("/", 1)[-1] if results else None,  # the model-index's name
        )
        return ModelCard.from_template(
            data,
            template_str=MODEL_CARD,
            title=parts.get("title", f"{description[:1].upper()}{description[1:]} (vqtok)"),
            intro=parts.get("intro", f"{indefinite_article(description).capitalize()} {description} made with "
                                     "[vqtok](https://github.com/vqtok/vqtok)."),
            usage=parts["usage"],
            image=parts.get("image"),
            image_caption=parts.get("image_caption", "An example"),
            facts=self.card_facts(),
            metrics=metrics,
            eval_dataset=parts.get("eval_dataset"),
            intended_use=parts["intended_use"],
            limitations=parts["limitations"],
            files=parts["files"],
            inputs=json.dumps(given, default=str).replace("-->", "--\\u003e"),
        )

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
        map_location: str | torch.device | None = None,
        subfolder: str | None = None,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | str | None = None,
    ) -> M:
        """Load from a local folder or a Hub repo id (`revision`: branch, tag or commit), strictly and pickle-free.

        `device` (or its older name `map_location`; default cpu) is where the weights are loaded. `torch_dtype`
        (e.g. torch.bfloat16 or "bfloat16") casts the floating-point weights after loading; a VQ codebook and its
        statistics stay float32 by design (the nearest-code search runs in float32), as integer buffers stay
        integers. `subfolder` loads a model saved inside another's folder (a prior's `tokenizer/`). The model
        remembers where it came from in `loaded_from` (the folder or repo id, the commit when it came from the Hub,
        the subfolder).
        """
        map_location = _placement(map_location, device)
        dtype = floating_dtype(torch_dtype)
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
                return model if dtype is None else model.to(dtype)  # type: ignore[return-value]
        model_cls = _model_class(raw, config_path)
        if cls is not HubModel and not issubclass(model_cls, cls):
            raise ConfigError(f"{config_path}: holds a {raw['model_type']!r} model, not a {cls.model_type!r}")
        config = parse_config(model_cls, raw, source=str(config_path))
        model = model_cls(config)
        model.check_derived(raw, source=str(config_path))
        weights_path = _resolve(source, prefix + WEIGHTS_NAME, **fetch)
        model.to(map_location)
        load_weights_strict(model, weights_path, map_location=map_location)
        if dtype is not None:
            model.to(dtype)
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
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | str | None = None,
    map_location: str | torch.device | None = None,
    **hub_kwargs: Any,
) -> HubModel:
    """Load any vqtok model (tokenizer or prior) from a folder or a Hub repo id, e.g. `load("org/name")`.

    A repo id may carry its revision as `org/name@revision`. The class is picked from config.json. As in
    diffusers and transformers, `device="cuda"` places the weights and `torch_dtype=torch.bfloat16` casts the
    floating-point ones (a VQ codebook stays float32); `map_location` is `device`'s older name. Other keywords:
    `HubModel.from_pretrained` (subfolder, cache_dir, token, local_files_only, force_download).
    """
    name, at_revision = split_revision(str(name_or_path))
    if at_revision is not None:
        if revision is not None and revision != at_revision:
            raise ValueError(f"two revisions given: '@{at_revision}' and revision={revision!r}")
        revision = at_revision
    return HubModel.from_pretrained(name, revision=revision, map_location=map_location, device=device,
                                    torch_dtype=torch_dtype, **hub_kwargs)


def split_revision(name: str) -> tuple[str, str | None]:
    """`org/name@revision` -> ("org/name", "revision"); a name without '@', or an existing path, -> (name, None)."""
    if "@" in name and not os.path.exists(name):
        name, revision = name.rsplit("@", 1)
        return name, revision
    return name, None


def floating_dtype(torch_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """`torch_dtype` as a floating-point torch.dtype (a name such as "bfloat16" or "torch.float16" is accepted)."""
    if torch_dtype is None:
        return None
    dtype = torch_dtype
    if isinstance(torch_dtype, str):
        dtype = getattr(torch, torch_dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"torch_dtype must be a floating-point dtype (torch.float32, torch.bfloat16, torch.float16, "
                         f"or its name), got {torch_dtype!r}")
    return dtype


def _placement(map_location: str | torch.device | None, device: str | torch.device | None) -> str | torch.device:
    """Where to load: `device`, or `map_location` (its older name), or cpu; both, naming different devices, is an
    error rather than one silently winning."""
    if map_location is not None and device is not None and torch.device(map_location) != torch.device(device):
        raise ValueError(f"device={str(device)!r} and map_location={str(map_location)!r} name different devices; give "
                         "one (map_location is device's older name)")
    return device if device is not None else map_location if map_location is not None else "cpu"


def load_call(name: str, subfolder: str | None = None) -> str:
    """The Python that loads a model, for cards: `vqtok.load("org/name")` (with `subfolder=` when it has one)."""
    return f"vqtok.load({json.dumps(name)}" + (f", subfolder={json.dumps(subfolder)})" if subfolder else ")")


def indefinite_article(phrase: str) -> str:
    """'a' or 'an' for `phrase` as spoken: by its first letter, or for an initialism (VQ, LDM, HVAE) by how its
    first letter is said ('an LDM', 'a VQ')."""
    word = phrase.split()[0] if phrase.split() else ""
    if len(word) > 1 and word.isupper():
        return "an" if word[0] in "AEFHILMNORSX" else "a"
    return "an" if word[:1].lower() in "aeiou" else "a"


def _eval_results(metrics: dict[str, Any], task: tuple[str, str], datasets: list[str],
                  eval_dataset: str | None) -> list[EvalResult]:
    """The card's model-index: every numeric metric (not the counts of what was measured, COUNT_METRICS), on the
    evaluation data (`eval_dataset`, else the first training dataset; 'custom' where no Hub dataset is known)."""
    dataset_type = datasets[0] if datasets else "custom"
    dataset_name = eval_dataset or (datasets[0] if datasets else "held-out images")
    return [
        EvalResult(task_type=task[0], task_name=task[1], dataset_type=dataset_type, dataset_name=dataset_name,
                   metric_type=key, metric_name=key, metric_value=value)
        for key, value in metrics.items()
        if key not in COUNT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value)
    ]


def card_inputs(text: str) -> dict[str, Any] | None:
    """The keywords a card vqtok wrote was made from (its last line), None for a card without them."""
    line = text.rstrip().rsplit("\n", 1)[-1]
    if not (line.startswith(CARD_MARKER) and line.endswith("-->")):
        return None
    try:
        inputs = json.loads(line[len(CARD_MARKER):-3])
    except json.JSONDecodeError:
        return None
    return inputs if isinstance(inputs, dict) and set(inputs) <= set(CARD_KEYS) else None


def card_for_push(model: HubModel, card_path: Path, repo_id: str, *, subfolder: str | None = None,
                  defaults: dict[str, Any] | None = None, license: str | None = None) -> tuple[str, str | None]:
    """The card to upload with a saved model as `repo_id` (text, and a note for the user or None).

    A card as vqtok wrote it (it is exactly what its recorded keywords make) is made again, naming `repo_id`, with
    `license` when given and the `defaults` keywords it does not set itself (the training run's files and data).
    A card a person wrote or edited is uploaded as it is, except that a usage line vqtok wrote (`vqtok.load(...)`
    of the recorded name or of ORG/NAME) is made to name `repo_id`; a `license` cannot be added to such a card,
    which is an error rather than a flag silently dropped. No card: a new one."""
    target = {"repo_id": repo_id, **({"subfolder": subfolder} if subfolder else {})}
    chosen = {"license": license} if license is not None else {}
    if not card_path.is_file():
        card = model.generate_model_card(**{**(defaults or {}), **chosen, **target})
        return str(card), f"{card_path} is missing: a new card is uploaded"
    text = card_path.read_text(encoding="utf-8")
    inputs = card_inputs(text)
    if inputs is not None and str(model.generate_model_card(**inputs)) == text:
        return str(model.generate_model_card(**{**(defaults or {}), **inputs, **chosen, **target})), None
    if license is not None:
        raise ValueError(f"{card_path} was written or edited by a person, so --license cannot be added to it; put "
                         f"'license: {license}' in its YAML header")
    names = {PLACEHOLDER_REPO, *((inputs or {}).get("repo_id", ""),)} - {""}
    edited = text
    for name in names:
        edited = edited.replace(load_call(name, (inputs or {}).get("subfolder")), load_call(repo_id, subfolder))
    what = "was edited since vqtok wrote it" if inputs is not None else "was not written by vqtok"
    return edited, f"{card_path} {what}: uploaded as it is" + (
        f", its usage line now loading {repo_id}" if edited != text else "")


# A saved model's files that `vqtok push` uploads (a prior keeps its tokenizer in tokenizer/); README.md is the card.
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, f"tokenizer/{CONFIG_NAME}", f"tokenizer/{WEIGHTS_NAME}")


def publication(model: HubModel, folder: str | Path, repo_id: str, *,
                license: str | None = None) -> tuple[dict[str, str | bytes], list[str]]:
    """What `vqtok push` uploads from the saved `folder` of `model` to `repo_id`: {path in the repo: a local file
    or the bytes of a model card}, and notes for the user.

    The model's files (MODEL_FILES), its card naming `repo_id` (`card_for_push`, with `license`), the cards of
    the models in its sub-folders (a prior's tokenizer/), and when the folder is a vqtok training run's export,
    the run's configuration and last image grid (`training_run_files`), which the card then shows."""
    folder = Path(folder)
    files: dict[str, str | bytes] = {name: str(folder / name) for name in MODEL_FILES if (folder / name).is_file()}
    run_files, run_card = training_run_files(folder)
    notes = []
    card, note = card_for_push(model, folder / "README.md", repo_id, defaults=run_card, license=license)
    files["README.md"] = card.encode()
    notes += [note] if note else []
    for subfolder, submodel in model.card_submodels().items():
        card, note = card_for_push(submodel, folder / subfolder / "README.md", repo_id, subfolder=subfolder)
        files[f"{subfolder}/README.md"] = card.encode()
        notes += [note] if note else []
    files.update({name: str(path) for name, path in run_files.items()})
    if run_files:
        notes.append(f"with the training run's {', '.join(f'{path} as {name}' for name, path in run_files.items())}")
    return files, notes


# The Hub datasets of torchvision's datasets (`data.source: torchvision`), for the cards of models trained on them.
HUB_DATASETS = {"MNIST": "ylecun/mnist", "FashionMNIST": "zalando-datasets/fashion_mnist",
                "CIFAR10": "uoft-cs/cifar10", "CIFAR100": "uoft-cs/cifar100"}
# A run's last image grid, uploaded with its model: (name in the repo, what the file holds, the card's caption).
RUN_IMAGES = {
    "tokenizer": ("reconstructions.png", "inputs and their reconstructions, from the training run",
                  "Inputs (top row) and their reconstructions (bottom row)"),
    "prior": ("samples.png", "samples of the prior decoded by its tokenizer, from the training run",
              "Samples of the prior decoded by its tokenizer (a row per class when it is class-conditional)"),
}


def training_run_files(folder: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """When `folder` is the model a vqtok training run exported (tokenizer/ or prior/ beside the run's
    `.vqtok-run.json`): the run's files to upload with it ({name in the repo: local file}: training_config.yaml,
    and reconstructions.png or samples.png, the run's last grid) and the card keywords they give (files, image,
    datasets and eval_dataset from the config). Otherwise nothing."""
    from vqtok.train.run_folder import RUN_MARKER

    folder = folder.resolve()
    run = folder.parent
    try:
        kind = json.loads((run / RUN_MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return {}, {}
    if kind not in RUN_IMAGES or folder.name != kind:
        return {}, {}
    files: dict[str, Path] = {}
    card: dict[str, Any] = {"files": {}}
    if (run / "config.yaml").is_file():
        files["training_config.yaml"] = run / "config.yaml"
        command = "vqtok train" if kind == "tokenizer" else "vqtok train-prior"
        card["files"]["training_config.yaml"] = f"the configuration of the training run (`{command}`'s YAML)"
        card.update(_data_card_inputs(run / "config.yaml"))
    grid = _last_grid(run / "samples", final=kind == "prior")
    if grid is not None:
        name, what, caption = RUN_IMAGES[kind]
        files[name] = grid
        card["files"][name] = what
        card.update(image=name, image_caption=f"{caption}, from the training run ({grid.name})")
    return files, card


def _last_grid(samples: Path, *, final: bool) -> Path | None:
    """A run's newest image grid: samples/final.png (a prior's export), else the step_XXXXXX.png of the last step."""
    if final and (samples / "final.png").is_file():
        return samples / "final.png"
    steps = sorted(samples.glob("step_*.png")) if samples.is_dir() else []
    return steps[-1] if steps else None


def _data_card_inputs(config_yaml: Path) -> dict[str, Any]:
    """`datasets` (Hub ids, where the training data is a torchvision dataset the Hub holds) and `eval_dataset` (a
    description of the evaluation data) from a tokenizer run's config.yaml; nothing for what it cannot tell."""
    import yaml

    try:
        raw = yaml.safe_load(config_yaml.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
        return {}
    data, held_out = raw["data"], raw.get("eval_data") if isinstance(raw.get("eval_data"), dict) else raw["data"]
    out: dict[str, Any] = {}
    if data.get("source") == "torchvision" and data.get("name") in HUB_DATASETS:
        out["datasets"] = [HUB_DATASETS[data["name"]]]
    described = _describe_data(held_out)
    if described:
        limit = raw.get("eval_images")
        out["eval_dataset"] = described + (f", at most {limit} images" if isinstance(limit, int) else "")
    return out


def _describe_data(data: dict[str, Any]) -> str | None:
    split = f"{data.get('split', 'train')} split"
    source, path = data.get("source", "digits"), data.get("path")
    if source == "digits":
        return f"scikit-learn's digits ({split})"
    if source == "torchvision" and data.get("name"):
        return f"{data['name']} ({split})"
    if source in ("folder", "idx", "amat") and isinstance(path, str):
        return f"the images of {Path(path).name} ({source})"
    return None


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
