"""Training a tokenizer with Accelerate, from one CPU to many GPUs (`vqtok train CONFIG.yaml`).

One optimizer step: `grad_accum` micro-batches (gradients synchronised on the last only), the reconstruction loss
plus the bottleneck's regulariser (times the KL schedule), gradient clipping, then either the update - AdamW, the
warm-up + cosine schedule, the bottleneck's once-per-step hook, the weights' EMA - or a skip when the gradient norm
is not finite or above `skip_grad_norm` (the hook then drops what it gathered). Too many skips in a row stop the run
with an error instead of spinning (vdvae #25).

Artefacts under output_dir: config.yaml, metrics.jsonl (and TensorBoard logs when tensorboard is installed),
samples/step_XXXXXX.png grids, checkpoints/step_XXXXXX (Accelerate state + vqtok's train_state.json and
weights_ema.safetensors), and tokenizer/ (save_pretrained, with the final metrics in its model card).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vqtok.config import TrainConfig, save_yaml
from vqtok.data import build_dataset
from vqtok.images import uint8_to_range
from vqtok.losses import kl_weight, lr_factor, reconstruction_loss
from vqtok.models import Autoencoder
from vqtok.train.batches import StepBatchSampler
from vqtok.train.evaluate import evaluate, format_table, save_prior_samples, save_reconstruction_grid


class TooManySkippedSteps(RuntimeError):
    """Every recent update had a non-finite or huge gradient norm: the run diverged."""


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


def train(config: TrainConfig, *, resume: bool = False, stop_at: int | None = None) -> Path | None:
    """Run (or resume) a training run; returns the folder of the exported tokenizer.

    `stop_at` ends the run early after that step with a checkpoint (the schedule is still that of max_steps), for
    jobs split over several time slots: resume continues exactly where it stopped. Returns None then.
    """
    try:
        return _train(config, resume=resume, stop_at=stop_at)
    finally:
        # Accelerate's state is process-wide: release it so a later run in this process may choose its own precision
        # (the process group, if any, stays).
        AcceleratorState._reset_state(reset_partial_state=False)


def _train(config: TrainConfig, *, resume: bool, stop_at: int | None) -> Path | None:
    out = Path(config.output_dir)
    if config.mixed_precision == "fp16" and not _has_accelerator():
        raise ValueError("mixed_precision 'fp16' needs a GPU (on CPU it would silently run in float32); use 'bf16' or 'no'")
    accelerator = Accelerator(
        cpu=not _has_accelerator(),  # without it, torchrun on a CPU-only machine silently gives one process per rank
        mixed_precision=config.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        step_scheduler_with_optimizer=False,  # else Accelerate steps the schedule once per process per update
        log_with=_trackers(),
        project_dir=str(out),
    )
    set_seed(config.seed)  # the same on every rank while the model is built: DDP with broadcast_buffers=False does
    # not copy rank 0's buffers (the codebook) when it wraps the model
    model_config = config.model
    dataset = build_dataset(config.data, channels=model_config.in_channels, preprocess=model_config.preprocess,
                            size=model_config.resolution)
    eval_dataset = dataset if config.eval_data is None else build_dataset(
        config.eval_data, channels=model_config.in_channels, preprocess=model_config.preprocess,
        size=model_config.resolution)
    if dataset.skipped:
        accelerator.print(f"skipped {dataset.skipped} unreadable images")

    model = Autoencoder(model_config)
    # Then per-rank streams for sampling noise and dropout; data order and flips depend on config.seed alone.
    set_seed(config.seed, device_specific=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=tuple(config.betas),
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps=config.warmup_steps, max_steps=config.max_steps,
                                       min_ratio=config.min_lr_ratio))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw: Autoencoder = accelerator.unwrap_model(model)
    ema = WeightsEMA(raw, config.weights_ema) if config.weights_ema > 0 else None

    step, skipped_total, consecutive_skips = 0, 0, 0
    if resume:
        step, skipped_total, consecutive_skips = _load_checkpoint(accelerator, out, raw, ema)

    sampler = StepBatchSampler(len(dataset), batch_size=config.batch_size, grad_accum=config.grad_accum,
                               rank=accelerator.process_index, world=accelerator.num_processes, seed=config.seed,
                               start_step=step, max_steps=config.max_steps)
    loader = DataLoader(_Indexed(dataset), batch_sampler=sampler, num_workers=config.num_workers,
                        pin_memory=accelerator.device.type == "cuda", persistent_workers=config.num_workers > 0)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(config, out / "config.yaml")
        accelerator.init_trackers("vqtok")
    fixed_images = torch.stack([eval_dataset[i][0] for i in range(min(8, len(eval_dataset)))])

    batches = iter(loader)
    progress = tqdm(total=config.max_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    started = time.perf_counter()
    end = config.max_steps if stop_at is None else min(stop_at, config.max_steps)
    while step < end:
        model.train()
        logs = _accumulate_step(config, accelerator, model, batches, step)
        max_norm = config.clip_grad_norm if config.clip_grad_norm > 0 else math.inf
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
        finite = math.isfinite(grad_norm)
        scaler = accelerator.scaler
        if not finite and scaler is not None:
            # fp16: an overflow is the GradScaler's business - its step skips the update and lowers the scale.
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            raw.on_optimizer_step(skipped=True)
            logs["fp16_overflow"] = 1.0
        elif not finite or (config.skip_grad_norm is not None and grad_norm > config.skip_grad_norm):
            if scaler is not None:
                scaler.update()  # close the unscale_ done by clipping, or the next step's clipping fails
            optimizer.zero_grad(set_to_none=True)
            raw.on_optimizer_step(skipped=True)
            consecutive_skips += 1
            skipped_total += 1
            if consecutive_skips > config.max_consecutive_skips:
                raise TooManySkippedSteps(
                    f"{consecutive_skips} consecutive updates skipped at step {step} (last gradient norm {grad_norm:.3g}): "
                    "the run diverged; lower lr, raise skip_grad_norm, or check the data"
                )
        else:
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            logs.update({f"vq/{k}": v for k, v in raw.on_optimizer_step().items()})
            if ema is not None:
                ema.update(raw)
            consecutive_skips = 0
        step += 1
        progress.update(1)
        logs.update(grad_norm=grad_norm, lr=scheduler.get_last_lr()[0], skipped_total=skipped_total)
        if step % config.log_every == 0 or step == config.max_steps:
            _log(accelerator, out, step, logs, progress, started)
        if step % config.eval_every == 0 or step == config.max_steps:
            _evaluate(accelerator, raw, eval_dataset, fixed_images, config, out, step)
        if step % config.checkpoint_every == 0 or step == end:
            _save_checkpoint(accelerator, out, raw, ema, step=step, skipped_total=skipped_total,
                             consecutive_skips=consecutive_skips)
    progress.close()
    if step < config.max_steps:
        accelerator.end_training()
        return None
    return _export(accelerator, raw, ema, eval_dataset, config, out)


def _accumulate_step(config, accelerator, model, batches, step: int) -> dict[str, Any]:
    """Forward and backward over the micro-batches of one optimizer step; returns the averaged loss terms."""
    value_range = config.model.value_range
    factor = kl_weight(config.kl_schedule, step, warmup_steps=config.kl_warmup_steps, cycle_steps=config.kl_cycle_steps)
    logs: dict[str, Any] = {}
    for micro in range(config.grad_accum):
        images, _, indices = next(batches)
        x = uint8_to_range(images.to(accelerator.device, non_blocking=True), value_range)
        if config.hflip:  # a coin per (seed, step, image): the same flips whatever the world size
            flip = torch.tensor([_coin(config.seed, step, int(i)) for i in indices], device=x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        last = micro == config.grad_accum - 1
        with nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                out = model(x)
            recon = reconstruction_loss(config.loss, out.reconstruction, x)
            loss = (recon + factor * out.bottleneck.loss) / config.grad_accum
            accelerator.backward(loss)
        terms = {"loss": loss.detach() * config.grad_accum, "recon": recon.detach(),
                 **{k: v.detach() for k, v in out.bottleneck.terms.items()},
                 **{k: v for k, v in out.bottleneck.stats.items()}}
        for k, v in terms.items():
            logs[k] = logs.get(k, 0.0) + v.float() / config.grad_accum  # tensors: read only at log steps
    if config.model.bottleneck.kind == "gaussian":
        logs["kl_weight"] = factor
    return logs


class _Indexed(torch.utils.data.Dataset):
    """Items as (image, label, index), so per-image randomness can be keyed by the global index."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, label, index


def _coin(seed: int, step: int, index: int) -> bool:
    return torch.rand((), generator=torch.Generator().manual_seed(hash((seed, step, index)) & ((1 << 63) - 1))) < 0.5


def _log(accelerator, out: Path, step: int, logs: dict[str, Any], progress, started: float) -> None:
    logs = {k: float(v) for k, v in logs.items()}
    shown = {"loss": logs["loss"]}
    if "vq/usage" in logs:
        shown["usage"] = logs["vq/usage"]
    if "kl" in logs:
        shown["kl"] = logs["kl"]
    progress.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})
    accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=step)
    if accelerator.is_main_process:
        record = {"step": step, "split": "train", "elapsed_s": round(time.perf_counter() - started, 2), **logs}
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def _evaluate(accelerator, raw: Autoencoder, dataset, fixed_images, config: TrainConfig, out: Path, step: int):
    if not accelerator.is_main_process:
        return None
    metrics = evaluate(raw, dataset, limit=config.eval_images, num_workers=0)
    save_reconstruction_grid(raw, fixed_images, out / "samples" / f"step_{step:06d}.png")
    if raw.is_gaussian:
        save_prior_samples(raw, 16, out / "samples" / f"prior_step_{step:06d}.png")
    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "split": "eval", **metrics}) + "\n")
    return metrics


def _save_checkpoint(accelerator, out: Path, raw: Autoencoder, ema: WeightsEMA | None, *, step: int,
                     skipped_total: int, consecutive_skips: int) -> None:
    """Accelerate's state (model, optimizer, scheduler, RNGs), plus vqtok's counters, the weights' EMA and each
    rank's bottleneck state that lives between steps (the k-means reservoir before initialisation)."""
    path = out / "checkpoints" / f"step_{step:06d}"
    accelerator.save_state(str(path))
    transient = raw.bottleneck.transient_state() if hasattr(raw.bottleneck, "transient_state") else {}
    if transient:
        save_file(transient, str(path / f"bottleneck_rank{accelerator.process_index}.safetensors"))
    if accelerator.is_main_process and ema is not None:
        save_file(ema.shadow, str(path / "weights_ema.safetensors"))
    accelerator.wait_for_everyone()  # every rank's files are on disk
    if accelerator.is_main_process:  # written last: marks the checkpoint complete
        state = {"step": step, "skipped_total": skipped_total, "consecutive_skips": consecutive_skips,
                 "world_size": accelerator.num_processes}
        (path / "train_state.json").write_text(json.dumps(state))
    accelerator.wait_for_everyone()


def _load_checkpoint(accelerator, out: Path, raw: Autoencoder, ema: WeightsEMA | None) -> tuple[int, int, int]:
    """Restore the newest complete checkpoint under out/checkpoints; zeros when there is none."""
    complete = [p for p in (out / "checkpoints").glob("step_*") if (p / "train_state.json").is_file()]
    if not complete:
        accelerator.print(f"no checkpoint under {out / 'checkpoints'}: starting from step 0")
        return 0, 0, 0
    path = max(complete, key=lambda p: int(p.name.split("_")[1]))
    accelerator.load_state(str(path))
    state = json.loads((path / "train_state.json").read_text())
    if ema is not None:
        saved = load_file(str(path / "weights_ema.safetensors"), device=str(accelerator.device))
        if saved.keys() != ema.shadow.keys():
            raise ValueError(f"{path}: weights_ema.safetensors does not match the model's parameters")
        for name, tensor in saved.items():
            ema.shadow[name].copy_(tensor)
    transient = path / f"bottleneck_rank{accelerator.process_index}.safetensors"
    if transient.is_file():
        if state.get("world_size", 1) != accelerator.num_processes:
            raise ValueError(f"{path} was saved by {state['world_size']} processes during codebook initialisation; "
                             f"resume it with the same number, not {accelerator.num_processes}")
        raw.bottleneck.load_transient_state(load_file(str(transient)))
    if accelerator.is_main_process:
        _truncate_metrics(out / "metrics.jsonl", state["step"])
    accelerator.print(f"resumed from {path} at step {state['step']}")
    return int(state["step"]), int(state["skipped_total"]), int(state.get("consecutive_skips", 0))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint being resumed, so the file reads as one run."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def _export(accelerator, raw: Autoencoder, ema: WeightsEMA | None, eval_dataset, config: TrainConfig, out: Path) -> Path:
    folder = out / "tokenizer"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        export = raw
        if ema is not None:
            export = Autoencoder(config.model).to(accelerator.device)
            export.load_state_dict(raw.state_dict())
            ema.copy_to(export)
        metrics = evaluate(export, eval_dataset, limit=config.eval_images)
        export.save_pretrained(folder, model_card_kwargs={"metrics": {k: round(v, 4) for k, v in metrics.items()}})
        (out / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
        accelerator.print(format_table(metrics))
    accelerator.end_training()
    return folder


def _has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def _trackers() -> list[str] | None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return None
    return ["tensorboard"]
