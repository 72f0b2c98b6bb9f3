"""What every vqtok training run shares (tokenizers and priors): the Accelerator, AdamW with its schedule, the
update-or-skip step, the weights' EMA, and the metrics file (the run folder and its checkpoints: run_folder.py).

One optimizer step ends in `finish_step`: gradient clipping, then either the update (AdamW, the warm-up + cosine
schedule, the model's once-per-step hook, the weights' EMA) or a skip when the gradient norm is not finite or above
`skip_grad_norm` (the hook then drops what it gathered). Too many skips in a row stop the run with an error instead
of spinning (vdvae #25).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.tracking import GeneralTracker
from accelerate.utils import DistributedDataParallelKwargs

from vqtok.config import ConfigError, RunConfig, to_dict
from vqtok.train.schedules import lr_factor

C = TypeVar("C", bound=RunConfig)
StepHook = Callable[[bool], dict[str, torch.Tensor]]  # on_optimizer_step(skipped) -> stats to log


class TooManySkippedSteps(RuntimeError):
    """Every recent update had a non-finite or huge gradient norm: the run diverged."""


@dataclass
class Counters:
    """The loop's own state, saved in each checkpoint's train_state.json."""

    step: int = 0
    skipped_total: int = 0
    consecutive_skips: int = 0


class WeightsEMA:
    """Exponential moving average of the parameters (float32), exported instead of the raw weights when enabled."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1 - self.decay)

    def copy_to(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(self.shadow[name])


def exported(model, ema: WeightsEMA | None):
    """What a run saves: the model itself, or a copy (same config and buffers) holding the EMA of its weights."""
    if ema is None:
        return model
    export = type(model)(model.config).to(next(model.parameters()).device)
    export.load_state_dict(model.state_dict())
    ema.copy_to(export)
    return export


class NonFiniteWeights(RuntimeError):
    """A model about to be exported holds NaN or infinite weights: the run diverged."""


def check_finite_weights(model: torch.nn.Module) -> None:
    """Refuse to export a model with non-finite tensors (naming them): a diverged run must stop, not publish NaNs."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteWeights(f"{len(bad)} tensor(s) hold NaN or infinite values ({', '.join(bad[:3])}"
                               f"{', ...' if len(bad) > 3 else ''}): the run diverged; nothing was exported")


@contextmanager
def accelerate_run() -> Iterator[None]:
    """Accelerate's state is process-wide: release it after a run so a later run in this process may choose its
    own precision (the process group, if any, stays)."""
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)


PRECISIONS = ("no", "bf16", "fp16")
FROM_ACCELERATE = ("Accelerate's setting: ACCELERATE_MIXED_PRECISION, which accelerate launch sets from its "
                   "--mixed_precision or from accelerate config")


def make_accelerator(config: RunConfig, out: Path, trackers: Sequence[GeneralTracker] = ()) -> Accelerator:
    """The run's Accelerator: `config.mixed_precision` when set, else Accelerate's own setting (see RunConfig), and
    the trackers `config.log_with` names plus the tracker objects in `trackers` (the Python API's)."""
    _check_trackers(config.log_with)
    wanted = os.environ.get("ACCELERATE_MIXED_PRECISION") if config.mixed_precision is None else None
    if wanted is not None and wanted.lower() not in PRECISIONS:  # before Accelerate fails on it in its own words
        raise ValueError(f"mixed_precision {wanted!r} (from {FROM_ACCELERATE}) is not supported by vqtok; use one of "
                         f"{list(PRECISIONS)}")
    return Accelerator(
        cpu=not has_accelerator(),  # without it, torchrun on a CPU-only machine silently gives one process per rank
        mixed_precision=config.mixed_precision,  # None: ACCELERATE_MIXED_PRECISION (set by accelerate launch) or 'no'
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        step_scheduler_with_optimizer=False,  # else Accelerate steps the schedule once per process per update
        log_with=[*config.log_with, *trackers] or None,
        project_dir=str(out),
    )


def resolve_precision(config: C, accelerator: Accelerator) -> C:
    """`config` with mixed_precision set to what `accelerator` uses, checked as if the config had said it: a run
    records (config.yaml, its checkpoints' config) and resumes with the precision it really ran in."""
    used = accelerator.mixed_precision
    from_accelerate = config.mixed_precision is None and os.environ.get("ACCELERATE_MIXED_PRECISION") is not None
    source = (FROM_ACCELERATE if from_accelerate
              else "the config" if config.mixed_precision is not None else "the default")
    if used not in PRECISIONS:
        raise ValueError(f"mixed_precision {used!r} (from {source}) is not supported by vqtok; use one of "
                         f"{list(PRECISIONS)}")
    try:
        resolved = dataclasses.replace(config, mixed_precision=used)
    except ConfigError as e:
        raise ConfigError(f"{e} (mixed_precision {used!r} came from {source})") from None
    if used == "fp16" and not has_accelerator():
        raise ValueError(f"mixed_precision 'fp16' (from {source}) needs a GPU (on CPU it would silently run in "
                         "float32); use 'bf16' or 'no'")
    if from_accelerate:
        accelerator.print(f"mixed precision: {used} (from {source})")
    return resolved


def _check_trackers(names: Sequence[str]) -> None:
    """Refuse a tracker name Accelerate does not know, or one whose package is not installed (Accelerate itself
    drops those silently)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name == "all":
            continue
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(f"log_with: {name!r} is not a tracker Accelerate knows; use one of "
                             f"{sorted(LOGGER_TYPE_TO_CLASS)}")
        if name not in available:
            package = {"tensorboard": "tensorboard (pip install 'vqtok[tensorboard]')"}.get(name, name)
            raise ValueError(f"log_with: the {name!r} tracker's package is not installed: install {package}, or "
                             "remove it from log_with")


def tracker_config(config: RunConfig, **extra: Any) -> dict[str, Any]:
    """The run's hyperparameters for the trackers (`init_trackers`): the config flattened to dotted keys, each value
    a bool, int, float or str as every tracker accepts (lists and null as their YAML text), plus `extra`."""
    flat: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{prefix}{key}.")
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix[:-1]] = value
        else:
            flat[prefix[:-1]] = json.dumps(value)
    walk({**to_dict(config), **extra}, "")
    return flat


def make_optimizer(config: RunConfig, param_groups) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `param_groups` (parameters, or groups that set their own weight decay) and its schedule."""
    optimizer = torch.optim.AdamW(param_groups, lr=config.lr, betas=tuple(config.betas),
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps=config.warmup_steps, max_steps=config.max_steps,
                                       min_ratio=config.min_lr_ratio))
    return optimizer, scheduler


def finish_step(config: RunConfig, accelerator: Accelerator, model, optimizer, scheduler, counters: Counters, *,
                on_step: StepHook | None = None, ema: WeightsEMA | None = None) -> dict[str, Any]:
    """Clip, then update or skip (see the module docstring); advances `counters` and returns what to log."""
    on_step = on_step or (lambda skipped: {})
    logs: dict[str, Any] = {}
    max_norm = config.clip_grad_norm if config.clip_grad_norm > 0 else math.inf
    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    finite = math.isfinite(grad_norm)
    scaler = accelerator.scaler
    if not finite and scaler is not None:
        # fp16: an overflow is the GradScaler's business - its step skips the update and lowers the scale.
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        on_step(True)
        logs["fp16_overflow"] = 1.0
    elif not finite or (config.skip_grad_norm is not None and grad_norm > config.skip_grad_norm):
        if scaler is not None:
            scaler.update()  # close the unscale_ done by clipping, or the next step's clipping fails
        optimizer.zero_grad(set_to_none=True)
        on_step(True)
        counters.consecutive_skips += 1
        counters.skipped_total += 1
        if counters.consecutive_skips > config.max_consecutive_skips:
            raise TooManySkippedSteps(
                f"{counters.consecutive_skips} consecutive updates skipped at step {counters.step} (last gradient "
                f"norm {grad_norm:.3g}): the run diverged; lower lr, raise skip_grad_norm, or check the data"
            )
    else:
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        logs.update(on_step(False))
        if ema is not None:
            ema.update(accelerator.unwrap_model(model))
        counters.consecutive_skips = 0
    counters.step += 1
    logs.update(grad_norm=grad_norm, lr=scheduler.get_last_lr()[0], skipped_total=counters.skipped_total)
    return logs


def log_metrics(accelerator: Accelerator, out: Path, step: int, logs: dict[str, Any], progress, started: float,
                shown: tuple[str, ...] = ("loss",)) -> None:
    """One line of metrics.jsonl (split 'train'), the trackers, and the progress bar's postfix. Tensors become
    Python numbers of their kind: counts stay integers."""
    logs = {k: plain_number(v) for k, v in logs.items()}
    progress.set_postfix({k.split("/")[-1]: f"{logs[k]:.4g}" for k in shown if k in logs})
    accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=step)
    if accelerator.is_main_process:
        record = {"step": step, "split": "train", "elapsed_s": round(time.perf_counter() - started, 2), **logs}
        append_metrics(out, record)


def plain_number(value: Any) -> int | float | bool:
    """A logged value as JSON writes it: a tensor's item (an integer tensor gives an int), ints and bools kept."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    return value if isinstance(value, (bool, int)) else float(value)


def log_images(accelerator: Accelerator, grids: dict[str, Path], step: int) -> None:
    """PNG grids (as saved under samples/) to every tracker that takes images (TensorBoard, W&B, ...): an RGB uint8
    array [H, W, 3] each; the main process only."""
    trackers = [t for t in accelerator.trackers if callable(getattr(t, "log_images", None))]
    if not trackers or not accelerator.is_main_process:
        return
    import numpy as np
    from PIL import Image

    arrays = {}
    for key, path in grids.items():
        with Image.open(path) as image:
            arrays[key] = np.asarray(image.convert("RGB"))
    for tracker in trackers:
        if tracker.name == "tensorboard":  # SummaryWriter.add_images: a batch, with its layout named
            tracker.log_images({k: a[None] for k, a in arrays.items()}, step=step, dataformats="NHWC")
        else:
            tracker.log_images({k: [a] for k, a in arrays.items()}, step=step)


def append_metrics(out: Path, record: dict[str, Any]) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())

