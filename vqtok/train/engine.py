"""What every vqtok training run shares (tokenizers and priors): the Accelerator, AdamW with its schedule, the
update-or-skip step, the weights' EMA, and the metrics file (the run folder and its checkpoints: run_folder.py).

One optimizer step ends in `finish_step`: gradient clipping, then either the update (AdamW, the warm-up + cosine
schedule, the model's once-per-step hook, the weights' EMA) or a skip when the gradient norm is not finite or above
`skip_grad_norm` (the hook then drops what it gathered). Too many skips in a row stop the run with an error instead
of spinning (vdvae #25).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs

from vqtok.config import RunConfig
from vqtok.train.schedules import lr_factor

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


def make_accelerator(config: RunConfig, out: Path) -> Accelerator:
    if config.mixed_precision == "fp16" and not has_accelerator():
        raise ValueError("mixed_precision 'fp16' needs a GPU (on CPU it would silently run in float32); use 'bf16' or 'no'")
    return Accelerator(
        cpu=not has_accelerator(),  # without it, torchrun on a CPU-only machine silently gives one process per rank
        mixed_precision=config.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        step_scheduler_with_optimizer=False,  # else Accelerate steps the schedule once per process per update
        log_with=_trackers(),
        project_dir=str(out),
    )


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
    """One line of metrics.jsonl (split 'train'), the trackers, and the progress bar's postfix."""
    logs = {k: float(v) for k, v in logs.items()}
    progress.set_postfix({k.split("/")[-1]: f"{logs[k]:.4g}" for k in shown if k in logs})
    accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=step)
    if accelerator.is_main_process:
        record = {"step": step, "split": "train", "elapsed_s": round(time.perf_counter() - started, 2), **logs}
        append_metrics(out, record)


def append_metrics(out: Path, record: dict[str, Any]) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def _trackers() -> list[str] | None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return None
    return ["tensorboard"]
