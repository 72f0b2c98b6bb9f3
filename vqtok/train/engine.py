"""What every vqtok training run shares (tokenizers and priors): the Accelerator, AdamW with its schedule, the
update-or-skip step, the weights' EMA, throughput (TFLOP/s, MFU) and the metrics file (the run folder and its
checkpoints: run_folder.py).

One optimizer step ends in `finish_step`: gradient clipping, then the update (AdamW, the model's once-per-step hook,
the weights' EMA) or a skip when the gradient norm is not finite or above `skip_grad_norm` (the hook then drops what
it gathered). The decision is made on the device, without a host-device synchronisation: fused AdamW takes it as
its `found_inf` tensor (the kernel leaves weights, moments and step counts untouched when it is 1), the hook gets it
as a 0-d bool tensor, the EMA's weight is masked to 0, and the skip counters are device tensors. The learning-rate
schedule advances at every optimizer step, skipped or not (it is a function of the step alone, which a resume
reproduces). Too many skips in a row stop the run with an error instead of spinning (vdvae #25); the counters are
read at log and checkpoint steps only, so the error comes at the first of those after the limit is passed. Under fp16
(a GradScaler) and with an optimizer that has no fused kernel for the parameters' device, the decision is read on
the host, as the scaler's own step does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
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
StepHook = Callable[[bool | torch.Tensor], dict[str, torch.Tensor]]  # on_optimizer_step(skipped) -> stats to log


class TooManySkippedSteps(RuntimeError):
    """Every recent update had a non-finite or huge gradient norm: the run diverged."""


class Counters:
    """The loop's own state, saved in each checkpoint's train_state.json: the step (a host int) and the skip counters,
    which the sync-free step keeps as device tensors (`record`). Reading `skipped_total` or `consecutive_skips` waits
    for the device: the loops read them at log and checkpoint steps only."""

    def __init__(self, step: int = 0, skipped_total: int = 0, consecutive_skips: int = 0):
        self.step = step
        self._skipped: int | torch.Tensor = skipped_total
        self._consecutive: int | torch.Tensor = consecutive_skips
        self._worst: int | torch.Tensor = consecutive_skips  # the longest run of skips since the last `check_skips`

    @property
    def skipped_total(self) -> int:
        return int(self._skipped)

    @property
    def consecutive_skips(self) -> int:
        return int(self._consecutive)

    def skipped_tensor(self) -> int | torch.Tensor:
        """skipped_total as it is held (a device tensor once a step ran): for the logs, read at log steps."""
        return self._skipped

    def take_longest_run(self) -> int:
        """The longest run of consecutive skips since the last call (reads the device), then starts counting afresh
        from the current run."""
        worst = int(self._worst)
        self._worst = self._consecutive
        return worst

    def record(self, skipped: torch.Tensor | bool) -> None:
        """Count one optimizer step, skipped or not (`skipped`: a 0-d bool tensor on the device, or a bool), without
        reading it on the host."""
        if isinstance(skipped, torch.Tensor):
            s = skipped.to(torch.int64)
            held = [torch.full((), v, dtype=torch.int64, device=s.device) if isinstance(v, int) else v
                    for v in (self._skipped, self._consecutive, self._worst)]  # once: ints from a checkpoint
            self._skipped = held[0] + s
            self._consecutive = (held[1] + s) * s
            self._worst = torch.maximum(held[2], self._consecutive)
        else:  # the host path (fp16): plain ints
            self._skipped = self.skipped_total + int(skipped)
            self._consecutive = (self.consecutive_skips + 1) * int(skipped)
            self._worst = max(int(self._worst), self._consecutive)


def check_skips(config: RunConfig, counters: Counters, grad_norm: Any = None) -> None:
    """Raise TooManySkippedSteps if more than `max_consecutive_skips` updates in a row were skipped since the last
    check (reads the device counters: call it at log and checkpoint steps)."""
    worst = counters.take_longest_run()
    if worst > config.max_consecutive_skips:
        last = f" (last gradient norm {float(grad_norm):.3g})" if grad_norm is not None else ""
        raise TooManySkippedSteps(
            f"{worst} consecutive updates skipped by step {counters.step}{last}: the run diverged; lower lr, raise "
            "skip_grad_norm, or check the data")


class WeightsEMA:
    """Exponential moving average of the parameters (float32), exported instead of the raw weights when enabled."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        # contiguous whatever the weights' memory format (channels_last on CUDA): safetensors saves these as they are
        self.shadow = {n: p.detach().float().clone(memory_format=torch.contiguous_format)
                       for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, skipped: torch.Tensor | None = None) -> None:
        """One EMA step towards the model's weights; a masked no-op where `skipped` (a 0-d bool tensor on the
        device) is true, decided without reading it on the host."""
        weight: float | torch.Tensor = 1 - self.decay
        if skipped is not None:
            weight = torch.where(skipped, 0.0, 1 - self.decay).to(torch.float32)
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), weight)

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


def make_adamw(params, *, lr: float, betas: tuple[float, ...], weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused (one kernel per device and dtype; it takes the sync-free skip as `found_inf`) - torch has fused
    kernels on CPU, CUDA, MPS and XPU in every version vqtok supports; the parameters then move to the device, where
    the kernel is chosen at each step."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=True)


def make_optimizer(config: RunConfig, param_groups) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `param_groups` (parameters, or groups that set their own weight decay) and its schedule, a function
    of the optimizer step (skipped steps included)."""
    optimizer = make_adamw(param_groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps=config.warmup_steps, max_steps=config.max_steps,
                                       min_ratio=config.min_lr_ratio))
    return optimizer, scheduler


def _inner(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's wrapper."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def takes_device_skip(optimizer) -> bool:
    """Whether `optimizer` can skip an update decided on the device: fused Adam(W) on a device with fused kernels."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    inner = _inner(optimizer)
    supported = _get_fused_kernels_supported_devices()
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and all(  # AdamW subclasses Adam from torch 2.7
        group.get("fused") and all(p.device.type in supported for p in group["params"]) for group in inner.param_groups)


def step_unless(optimizer, skipped: torch.Tensor) -> None:
    """optimizer.step(), a no-op where the 0-d bool tensor `skipped` is true, without reading it on the host: fused
    Adam(W) takes it as `found_inf` (the kernel then leaves weights, moments and step counts as they were; see
    torch.optim.adam._fused_adam). Needs `takes_device_skip(optimizer)`."""
    inner = _inner(optimizer)
    inner.found_inf = skipped.to(torch.float32)
    try:
        optimizer.step()
    finally:
        inner.__dict__.pop("found_inf", None)


def grad_norm_of(accelerator: Accelerator, parameters, clip: float) -> torch.Tensor:
    """Clip the gradients to norm `clip` (0: no clipping) and return their norm before clipping, a 0-d device tensor."""
    return accelerator.clip_grad_norm_(parameters, clip if clip > 0 else math.inf)


def finish_step(config: RunConfig, accelerator: Accelerator, model, optimizer, scheduler, counters: Counters, *,
                on_step: StepHook | None = None, ema: WeightsEMA | None = None) -> dict[str, Any]:
    """Clip, then update or skip (see the module docstring); advances `counters` and returns what to log (device
    tensors, read at log steps)."""
    on_step = on_step or (lambda skipped: {})
    grad_norm = grad_norm_of(accelerator, model.parameters(), config.clip_grad_norm)
    if accelerator.scaler is not None or not takes_device_skip(optimizer):
        return _finish_step_on_host(config, accelerator, model, optimizer, scheduler, counters, grad_norm,
                                    on_step=on_step, ema=ema)
    ok = torch.isfinite(grad_norm)
    if config.skip_grad_norm is not None:
        ok = ok & (grad_norm <= config.skip_grad_norm)
    skipped = ~ok
    step_unless(optimizer, skipped)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    logs: dict[str, Any] = dict(on_step(skipped))
    if ema is not None:
        ema.update(accelerator.unwrap_model(model), skipped)
    counters.record(skipped)
    counters.step += 1
    logs.update(grad_norm=grad_norm, lr=scheduler.get_last_lr()[0], skipped_total=counters.skipped_tensor())
    return logs


def _finish_step_on_host(config: RunConfig, accelerator: Accelerator, model, optimizer, scheduler,
                         counters: Counters, grad_norm: torch.Tensor, *, on_step: StepHook,
                         ema: WeightsEMA | None) -> dict[str, Any]:
    """The update-or-skip decided on the host (one synchronisation per step): fp16, whose GradScaler reads its
    overflow flag on the host anyway, and optimizers without a fused kernel for the parameters' device."""
    logs: dict[str, Any] = {}
    grad_norm = float(grad_norm)
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
        counters.record(True)
    else:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        logs.update(on_step(False))
        if ema is not None:
            ema.update(accelerator.unwrap_model(model))
        counters.record(False)
    scheduler.step()
    counters.step += 1
    check_skips(config, counters, grad_norm)  # read on the host anyway: stop at once
    logs.update(grad_norm=grad_norm, lr=scheduler.get_last_lr()[0], skipped_total=counters.skipped_total)
    return logs


def log_metrics(accelerator: Accelerator, out: Path, step: int, logs: dict[str, Any], progress, started: float,
                shown: tuple[str, ...] = ("loss",), throughput: Throughput | None = None) -> None:
    """One line of metrics.jsonl (split 'train'), the trackers, and the progress bar's postfix. Tensors become
    Python numbers of their kind: counts stay integers. This is where the step's device tensors are read (the one
    host-device synchronisation of a log interval); `throughput` adds steps/s, TFLOP/s and MFU since the last log."""
    logs = {k: plain_number(v) for k, v in logs.items()}
    if throughput is not None:
        logs.update(throughput.interval(step))
    progress.set_postfix({k.split("/")[-1]: f"{logs[k]:.4g}" for k in shown if k in logs})
    accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=step)
    if accelerator.is_main_process:
        record = {"step": step, "split": "train", "elapsed_s": round(time.perf_counter() - started, 2), **logs}
        append_metrics(out, record)


# Dense peak TFLOP/s of one GPU (NVIDIA's data sheets, without sparsity): 16-bit tensor cores (bf16 / fp16), TF32
# tensor cores, plain fp32. The first name contained in torch.cuda.get_device_name wins.
PEAK_TFLOPS: dict[str, tuple[float, float, float]] = {
    "H200": (989.4, 494.7, 66.9),
    "H100 PCIe": (756.0, 378.0, 51.2),
    "H100 NVL": (835.0, 417.5, 60.0),
    "H100": (989.4, 494.7, 66.9),  # SXM
    "A100": (312.0, 156.0, 19.5),
}


def peak_tflops(config: RunConfig, accelerator: Accelerator) -> float | None:
    """The peak TFLOP/s that MFU divides by: `config.peak_tflops` when set, else `device_peak_tflops` for the run's
    device and precision (None on a CPU or an unknown GPU: no MFU)."""
    if config.peak_tflops is not None:
        return config.peak_tflops
    return device_peak_tflops(accelerator.device, accelerator.mixed_precision)


def device_peak_tflops(device: torch.device, mixed_precision: str | None) -> float | None:
    """The table's dense peak for this GPU: 16-bit under bf16/fp16 autocast, TF32 when torch lets float32 matmuls
    use it, else fp32; None on a CPU or a GPU the table lacks."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32, fp32) in PEAK_TFLOPS.items():
        if key in name:
            if mixed_precision in ("bf16", "fp16"):
                return half
            return tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
    return None


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of `fn()` (torch.utils.flop_counter: matmuls, convolutions, attention, forward and
    backward), run eagerly even where modules are compiled."""
    from torch.utils.flop_counter import FlopCounterMode

    stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6: run compiled modules eagerly here
    with FlopCounterMode(display=False) as counter, stance("force_eager") if stance else nullcontext():
        fn()
    return counter.get_total_flops()


def micro_batch_flops(accelerator: Accelerator, model: torch.nn.Module, loss: Callable[[], torch.Tensor]) -> int:
    """FLOPs of one micro-batch's forward (`loss()`, a scalar) and backward, counted once without touching the run:
    evaluation mode (no codebook statistics, no posterior noise, no dropout), the random state restored, gradients
    taken with autograd.grad (none accumulated, no DDP hook)."""
    params = [p for p in model.parameters() if p.requires_grad]
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            return count_flops(lambda: torch.autograd.grad(loss(), params, allow_unused=True))
    finally:
        model.train(was_training)


class Throughput:
    """Steps per second, achieved TFLOP/s and MFU (model FLOPs utilisation) over each log interval. `flops_per_step`:
    one optimizer step's FLOPs on one process (counted once, `count_flops`); TFLOP/s are those of all `processes`,
    MFU their fraction of `processes` x `peak` TFLOP/s (absent without a known peak). Intervals that contain an
    evaluation or a checkpoint start after it (`restart`)."""

    def __init__(self, step: int, *, processes: int = 1, peak: float | None = None):
        self.flops_per_step: int | None = None
        self.processes, self.peak = processes, peak
        self.restart(step)

    def restart(self, step: int) -> None:
        self.step, self.time = step, time.perf_counter()

    def interval(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps, seconds = step - self.step, now - self.time
        self.step, self.time = step, now
        if steps <= 0 or seconds <= 0:
            return {}
        logs = {"steps_per_s": steps / seconds}
        if self.flops_per_step:
            tflops = self.flops_per_step * self.processes * logs["steps_per_s"] / 1e12
            logs["tflops"] = tflops
            if self.peak:
                logs["mfu"] = tflops / (self.peak * self.processes)
        return logs


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



# ----------------------------------------------------------------------------------------------------------------
# Fast on a GPU: compiled networks, channels_last


def compile_modules(*modules: torch.nn.Module | None) -> None:
    """torch.compile each module in place (`nn.Module.compile`: its state_dict keys, and so checkpoints and exports,
    stay as they are); None entries are skipped."""
    for module in modules:
        if module is not None:
            module.compile()


def allow_retained_graphs_through_compiled() -> None:
    """Let compiled modules be backpropagated twice through one graph (`retain_graph=True`, as the VQGAN's adaptive
    weight does through the decoder's last layer): AOTAutograd frees "donated" buffers after the first backward
    (torch >= 2.6's `donated_buffer`) and then refuses the second. Process-wide; it costs only that memory saving."""
    functorch_config = getattr(getattr(torch, "_functorch", None), "config", None)
    if functorch_config is not None and hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False


def to_channels_last(model: torch.nn.Module) -> None:
    """The model's 4-d weights in channels_last memory format, and its state_dict contiguous again (safetensors
    refuses other layouts), so checkpoints and exports are unchanged."""
    model.to(memory_format=torch.channels_last)

    def contiguous(module, state_dict, prefix, local_metadata):
        for key, value in state_dict.items():
            if isinstance(value, torch.Tensor) and not value.is_contiguous():
                state_dict[key] = value.contiguous()

    register = getattr(model, "register_state_dict_post_hook", None) or model._register_state_dict_hook
    register(contiguous)


def match_state_layout(*optimizers) -> None:
    """Give each optimizer state tensor its parameter's memory layout (a checkpoint's moments load contiguous; fused
    kernels read parameters and moments as flat arrays, so their strides must agree)."""
    for optimizer in optimizers:
        if optimizer is None:
            continue
        inner = _inner(optimizer)
        for p, state in inner.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
