"""Training a tokenizer with Accelerate, from one CPU to many GPUs (`vqtok train CONFIG.yaml`).

One optimizer step: `grad_accum` micro-batches (gradients synchronised on the last only), the reconstruction loss
(with the VQGAN recipe's perceptual and adversarial terms when configured, `adversarial.py`) plus the bottleneck's
regulariser (times the KL schedule), then the engine's update-or-skip (`engine.finish_step`), which calls the
bottleneck's once-per-step hook (EMA codebook, restarts) or tells it that the step was skipped; then the
discriminator's own step, if there is one. A class-conditional model (model.num_classes > 0) gets each image's label,
replaced by the null label with probability `class_dropout` (a coin per (seed, step, image), like the flips).

The step never makes the host wait for the device: each micro-batch is prepared on the host first (`_host_batch`:
the loader's uint8 images, their flips, labels and, for dynamically binarized data, the binarization; coins are
plain-Python keyed hashes, `seeds.keyed_uniform`), then copied asynchronously from pinned memory (`_micro_batch`);
the model skips its value checks (`check=False`); the update-or-skip is decided on the device (`engine.finish_step`);
the loss terms stay device tensors until `log_metrics` reads them at log steps. `compile: true` compiles the
encoder, decoder and discriminator in place (`compile_modules`); on CUDA the convolutional models run channels_last.

Artefacts under output_dir: config.yaml, run_info.json (versions, git commit, command line; run_info.py),
metrics.jsonl (and the logs of the trackers named in `log_with`, e.g. TensorBoard's under vqtok/),
samples/step_XXXXXX.png grids, checkpoints/step_XXXXXX (Accelerate state + vqtok's train_state.json, config.json,
weights_ema.safetensors and each rank's bottleneck state; see run_folder.RunFolder), tokenizer/ (save_pretrained, with
the final metrics in its model card) and, with an adversarial term, discriminator/ beside it. A VQ tokenizer whose
codebook was never initialised by k-means, or that used fewer than evaluate.MIN_CODE_USAGE of its codes over its last
`usage_window` steps, is still exported, with a warning in the log and in final_metrics.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate.tracking import GeneralTracker
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from vqtok.bottleneck import image_noise
from vqtok.config import ConfigError, DataConfig, TrainConfig, to_dict
from vqtok.data import build_dataset
from vqtok.data.labels import check_batch_labels, check_dataset_labels
from vqtok.data.sources import WithIndex, dynamic_binarize
from vqtok.images import uint8_to_range
from vqtok.losses import reconstruction_loss
from vqtok.models import Autoencoder, HierarchicalVAE, HierarchicalVAEConfig
from vqtok.seeds import keyed_uniform
from vqtok.train.adversarial import ImageLosses
from vqtok.train.batches import StepBatchSampler
from vqtok.train.engine import (
    Throughput,
    WeightsEMA,
    accelerate_run,
    allow_retained_graphs_through_compiled,
    append_metrics,
    check_finite_weights,
    check_skips,
    compile_modules,
    exported,
    finish_step,
    log_images,
    log_metrics,
    make_accelerator,
    make_optimizer,
    match_state_layout,
    micro_batch_flops,
    peak_tflops,
    resolve_precision,
    to_channels_last,
)
from vqtok.train.evaluate import (
    codebook_health,
    codebook_warnings,
    evaluate,
    format_table,
    save_image_grid,
    save_reconstruction_grid,
)
from vqtok.train.run_folder import RunFolder
from vqtok.train.schedules import kl_weight
from vqtok.train.user_data import UserImages

logger = logging.getLogger(__name__)
CLASS_GRID_ROWS, CLASS_GRID_COLUMNS = 16, 8  # a conditional VAE's prior-sample grid: its first 16 classes, 8 each


def train(config: TrainConfig, *, dataset: Dataset | None = None, trackers: Sequence[GeneralTracker] = (),
          resume: bool = False, stop_at: int | None = None, overwrite: bool = False) -> Path | None:
    """Run (or resume) a training run; returns the folder of the exported tokenizer.

    `dataset`: your own map-style torch Dataset to train on instead of `config.data` (which must then be left at
    its default): item i an image tensor [C, H, W] of the model's channels and resolution, uint8 or float in [0, 1],
    or a tuple (image, label, ...), which a class-conditional model needs - see vqtok.train.user_data. It is also
    the evaluation set unless `config.eval_data` names one. The run records it as 'user dataset CLASS, N items'
    (run_info.json, a comment in config.yaml, the checkpoints), and a resume must be given the same dataset.
    `trackers`: Accelerate tracker objects (GeneralTracker subclasses) to log to, beside those `config.log_with`
    names.

    A fresh run needs a new or empty output_dir; `overwrite` starts afresh in the folder of an earlier vqtok run,
    deleting that run's artefacts (files vqtok did not write stay). `resume` continues from the newest complete
    checkpoint, made with this config (see run_folder.RunFolder). `stop_at` ends the run early after that step with a
    checkpoint (the schedule is still that of max_steps), for jobs split over several time slots: resume continues
    exactly where it stopped. Returns None then. SIGINT or SIGTERM end it after the current step with a checkpoint,
    raising run_folder.TrainingInterrupted.
    """
    if dataset is not None and config.data != DataConfig():
        raise ValueError(f"train: a dataset was given and config.data is set too (source {config.data.source!r}"
                         f"{', path ' + repr(config.data.path) if config.data.path else ''}); the dataset replaces "
                         "config.data: remove data from the config, or do not pass a dataset")
    with accelerate_run():
        return _train(config, dataset=dataset, trackers=trackers, resume=resume, stop_at=stop_at, overwrite=overwrite)


def _train(config: TrainConfig, *, dataset: Dataset | None, trackers: Sequence[GeneralTracker], resume: bool,
           stop_at: int | None, overwrite: bool) -> Path | None:
    out = Path(config.output_dir)
    accelerator = make_accelerator(config, out, trackers)
    config = resolve_precision(config, accelerator)
    model_config = config.model
    num_classes = getattr(model_config, "num_classes", 0)
    if dataset is not None:
        dataset = UserImages(dataset, channels=model_config.in_channels, size=model_config.resolution,
                             labels=num_classes > 0)
    run = RunFolder(accelerator, config, "tokenizer", resume=resume, overwrite=overwrite,
                    data=dataset.describe() if dataset is not None else None)
    set_seed(config.seed)  # the same on every rank while the model is built: DDP with broadcast_buffers=False does
    # not copy rank 0's buffers (the codebook) when it wraps the model
    if dataset is None:
        dataset = build_dataset(config.data, channels=model_config.in_channels, preprocess=model_config.preprocess,
                                size=model_config.resolution)
    eval_dataset = dataset if config.eval_data is None else build_dataset(
        config.eval_data, channels=model_config.in_channels, preprocess=model_config.preprocess,
        size=model_config.resolution)
    if dataset.skipped:
        accelerator.print(f"skipped {dataset.skipped} unreadable images")
    if num_classes:  # before the run writes anything; a user's dataset is checked as it is read
        check_dataset_labels(dataset, num_classes, "data")
        check_dataset_labels(eval_dataset, num_classes, "eval_data")

    model = initial_model(config)
    image_losses = ImageLosses(config, accelerator, model)
    channels_last = use_channels_last(accelerator)
    if channels_last:
        to_channels_last(model)
        if image_losses.discriminator is not None:
            to_channels_last(image_losses.raw)
    if config.compile:
        compile_modules(*tokenizer_networks(model), image_losses.raw if image_losses.adversarial else None)
        if image_losses.adversarial and image_losses.adversarial.adaptive_weight:
            allow_retained_graphs_through_compiled()
    # Then per-rank streams for sampling noise and dropout; data order and flips depend on config.seed alone.
    set_seed(config.seed, device_specific=True)
    optimizer, scheduler = make_optimizer(config, model.parameters())
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    image_losses.prepare()
    raw: Autoencoder = accelerator.unwrap_model(model)
    ema = WeightsEMA(raw, config.weights_ema) if config.weights_ema > 0 else None

    counters, transient = run.restore(ema)
    if transient:
        raw.bottleneck.load_transient_state(transient)  # (a VQ codebook's)
    match_state_layout(optimizer, image_losses.optimizer)  # moments saved contiguous, weights channels_last

    sampler = StepBatchSampler(len(dataset), batch_size=config.batch_size, grad_accum=config.grad_accum,
                               rank=accelerator.process_index, world=accelerator.num_processes, seed=config.seed,
                               start_step=counters.step, max_steps=config.max_steps)
    # Its own generator: starting its iterator draws a seed, which must not come from the random state just restored
    pin = accelerator.device.type == "cuda"
    loader = DataLoader(WithIndex(dataset), batch_sampler=sampler, num_workers=config.num_workers, pin_memory=pin,
                        persistent_workers=config.num_workers > 0, collate_fn=collate_with_indices,
                        generator=torch.Generator().manual_seed(config.seed))
    run.start()
    fixed = [eval_dataset[i] for i in range(min(8, len(eval_dataset)))]
    fixed_images, fixed_labels = torch.stack([image for image, _ in fixed]), torch.tensor([y for _, y in fixed])

    batches = iter(loader)
    started = time.perf_counter()
    end = config.max_steps if stop_at is None else min(stop_at, config.max_steps)

    def on_step(skipped: torch.Tensor | bool) -> dict[str, torch.Tensor]:  # the codebook's once-per-step hook
        return {f"vq/{k}": v for k, v in raw.on_optimizer_step(skipped=skipped).items()}

    throughput = Throughput(counters.step, processes=accelerator.num_processes, peak=peak_tflops(config, accelerator))
    progress = tqdm(total=config.max_steps, initial=counters.step, desc="train",
                    disable=not accelerator.is_local_main_process)
    with progress, run.stoppable(counters) as stop:
        while counters.step < end:
            model.train()
            gan = image_losses.active(counters.step)
            host = [_host_batch(config, next(batches), counters.step, pin) for _ in range(config.grad_accum)]
            if throughput.flops_per_step is None:
                throughput.flops_per_step = config.grad_accum * _micro_batch_flops(
                    config, accelerator, raw, _micro_batch(config, accelerator, host[0], channels_last))
            logs = _accumulate_step(config, accelerator, model, image_losses, host, counters.step, channels_last)
            logs.update(finish_step(config, accelerator, model, optimizer, scheduler, counters, on_step=on_step,
                                    ema=ema))
            if gan:
                logs.update(image_losses.discriminator_step())
            step = counters.step
            progress.update(1)
            checkpoint = step % config.checkpoint_every == 0 or step == end
            if step % config.log_every == 0 or step == config.max_steps:
                log_metrics(accelerator, out, step, logs, progress, started,
                            shown=("loss", "vq/usage", "kl", "d_loss"), throughput=throughput)
            if step % config.log_every == 0 or step == config.max_steps or checkpoint:
                check_skips(config, counters, logs.get("grad_norm"))  # (reads the device counters)
            if step % config.eval_every == 0 or step == config.max_steps:
                _evaluate(accelerator, raw, image_losses, eval_dataset, (fixed_images, fixed_labels), config, out,
                          step)
            stopping = stop.requested()
            if checkpoint or stopping:
                if stopping:  # as a log or checkpoint step would: the longest run of skips is not saved
                    check_skips(config, counters, logs.get("grad_norm"))
                transient = raw.bottleneck.transient_state() if hasattr(raw, "bottleneck") and hasattr(
                    raw.bottleneck, "transient_state") else {}
                saved = run.save(counters, ema, transient=transient)
            if stopping:
                raise run.stopped(stopping, saved, step)
            if step % config.eval_every == 0 or checkpoint:
                throughput.restart(step)  # the next interval's speed is the training's alone
    if counters.step < config.max_steps:
        accelerator.end_training()
        return None
    return _export(accelerator, raw, ema, image_losses, eval_dataset, config, out)


def card_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as a model card shows them: floats to 4 decimals, counts and flags as they are."""
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


def initial_model(config: TrainConfig) -> Autoencoder | HierarchicalVAE:
    """A new tokenizer (an autoencoder or a hierarchical VAE, as `config.model` says), or the saved one `init_from`
    names (to fine-tune), whose config must be `config.model`."""
    model_class = HierarchicalVAE if isinstance(config.model, HierarchicalVAEConfig) else Autoencoder
    if config.init_from is None:
        return model_class(config.model)
    model = model_class.from_pretrained(config.init_from)
    if model.config != config.model:
        saved, wanted = to_dict(model.config), to_dict(config.model)
        differ = sorted(k for k in saved if saved[k] != wanted[k])
        raise ConfigError(f"init_from {config.init_from!r} holds a tokenizer whose config differs from model in "
                          f"{', '.join(differ)}: copy its config.json's values into model")
    return model.train()


def tokenizer_networks(model: Autoencoder | HierarchicalVAE) -> list[torch.nn.Module]:
    """What `compile: true` compiles of a tokenizer: an autoencoder's encoder and decoder (its bottleneck, with its
    host-side bookkeeping, stays eager), a hierarchical VAE's stem, encoder cells, head and the networks of its
    latent groups."""
    if isinstance(model, HierarchicalVAE):
        groups = [m for group in model.groups for m in group.children()]
        return [model.stem, *model.encoder, *model.refine.values(), *groups, model.head]
    return [model.encoder, model.decoder]


def use_channels_last(accelerator) -> bool:
    """Whether the convolutional models train in channels_last memory format: on CUDA (where cuDNN's kernels for
    it are the fast ones)."""
    return accelerator.device.type == "cuda"


@dataclasses.dataclass
class HostBatch:
    """One micro-batch as prepared on the host, before any device work: uint8 images (binarized already for
    dynamically binarized data), the dataset indices (Python ints), the labels a conditional model trains on (after
    class dropout; else None) and the flips (hflip; else None), pinned when the device is a GPU."""

    images: torch.Tensor
    indices: list[int]
    labels: torch.Tensor | None
    flips: torch.Tensor | None


def collate_with_indices(items: list[tuple[torch.Tensor, Any, int]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The loader's batches: images [B, C, H, W], labels [B] and the indices as a list of Python ints (not a tensor,
    whose entries the host would have to read)."""
    images, labels, indices = zip(*items)
    return default_collate(list(images)), default_collate(list(labels)), [int(i) for i in indices]


def _host_batch(config: TrainConfig, batch, step: int, pin: bool) -> HostBatch:
    """A loader batch prepared on the host (see `HostBatch`): every per-image coin is a plain-Python keyed hash of
    (seed, step, image), the same whatever the world size, micro-batch or resume point."""
    images, labels, indices = batch
    if config.data.binarize == "dynamic":
        images = dynamic_binarize(images, config.data.binarize_seed, step, indices)
    flips = torch.tensor([_coin(config.seed, step, i) for i in indices]) if config.hflip else None
    labels = _labels(config, labels, indices, step)
    pinned = lambda t: t.pin_memory() if pin and t is not None and not t.is_pinned() else t  # noqa: E731
    return HostBatch(pinned(images), indices, pinned(labels), pinned(flips))


def _accumulate_step(config, accelerator, model, image_losses: ImageLosses, host: list[HostBatch], step: int,
                     channels_last: bool = False) -> dict[str, Any]:
    """Forward and backward over the micro-batches of one optimizer step (`host`, prepared by `_host_batch`);
    returns the averaged loss terms, device tensors read only at log steps.

    The KL regulariser is that of the step's whole batch: where it depends on the batch's average KL per unit (free
    bits, KL balancing), that average is first computed over every micro-batch and process (`_step_kl_mean`)."""
    raw = accelerator.unwrap_model(model)
    factor = kl_weight(config.kl_schedule, step, warmup_steps=config.kl_warmup_steps, cycle_steps=config.kl_cycle_steps)
    micro_batches = [_micro_batch(config, accelerator, batch, channels_last) for batch in host]
    objective = raw.kl_objective

    def inputs(indices: list[int], labels: torch.Tensor | None) -> dict[str, Any]:  # the forward's keywords
        return {**_posterior_noise(raw, config.seed, step, indices), **({} if labels is None else {"labels": labels}),
                "check": False}  # images from uint8 (finite), labels checked on the host

    step_kl_mean = None
    if objective is not None and objective.needs_step_mean(factor) and config.grad_accum * accelerator.num_processes > 1:
        step_kl_mean = _step_kl_mean(accelerator, raw, [(x, inputs(*rest)) for x, *rest in micro_batches])
    logs: dict[str, Any] = {}
    for micro, (x, indices, labels) in enumerate(micro_batches):
        last = micro == config.grad_accum - 1
        gan = image_losses.active(step)
        with nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                out = model(x, **inputs(indices, labels))
            recon = reconstruction_loss(config.loss, out.reconstruction, x)
            objective_value, image_terms = image_losses.generator_loss(x, out.reconstruction, recon, step)
            regulariser = raw.regularisation(out, kl_weight=factor, step_kl_mean=step_kl_mean)
            loss = (objective_value + regulariser) / config.grad_accum
            accelerator.backward(loss)
        if gan:
            with nullcontext() if last else image_losses.no_sync():
                image_terms.update(image_losses.discriminator_backward(x, out.reconstruction))
        terms = {"loss": loss.detach() * config.grad_accum, "recon": recon.detach(), **image_terms,
                 **{k: v.detach() for k, v in out.bottleneck.terms.items()},
                 # a batch's perplexity does not average over micro-batches: the step's comes from the step hook
                 **{k: v for k, v in out.bottleneck.stats.items() if k != "perplexity"}}
        for k, v in terms.items():
            logs[k] = logs.get(k, 0.0) + v.float() / config.grad_accum  # tensors: read only at log steps
    if config.variational:
        logs["kl_weight"] = factor
    return logs


def _micro_batch(config: TrainConfig, accelerator, batch: HostBatch, channels_last: bool = False
                 ) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
    """One micro-batch in the model's range on the device (copied asynchronously from pinned memory on a GPU, then
    flipped where its coin said so), its images' indices and, for a class-conditional model, its labels (else
    None). VAEs draw their posterior samples per image too (`image_noise`), so one process equals several and
    accumulated micro-batches equal one batch."""
    device = accelerator.device
    x = uint8_to_range(batch.images.to(device, non_blocking=True), config.model.value_range)
    if batch.flips is not None:
        flip = batch.flips.to(device, non_blocking=True)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = None if batch.labels is None else batch.labels.to(device, non_blocking=True)
    return x, batch.indices, labels


def _labels(config: TrainConfig, labels: torch.Tensor, indices: list[int], step: int) -> torch.Tensor | None:
    """A conditional model's labels for a micro-batch (None for an unconditional one), on the host: each checked
    (a user's dataset is checked only here) and replaced by the null label when its coin (seed, step, image) falls
    below class_dropout."""
    num_classes = getattr(config.model, "num_classes", 0)
    if not num_classes:
        return None
    check_batch_labels(labels, num_classes, lambda j: f"data: item {indices[j]}")
    labels = labels.long()
    if config.class_dropout > 0:
        dropped = torch.tensor([_label_dropped(config.seed, step, i, config.class_dropout) for i in indices])
        labels = labels.masked_fill(dropped, num_classes)
    return labels


def _posterior_noise(raw, seed: int, step: int, indices: list[int]) -> dict[str, Any]:
    """The forward's keyword for a VAE's posterior samples: one generator per image, keyed by (seed, step, index)
    (`image_noise`); nothing for a VQ tokenizer."""
    return {} if raw.kl_objective is None else {"generator": image_noise(seed, step, indices)}


@torch.no_grad()
def _step_kl_mean(accelerator, raw, micro_batches: list[tuple[torch.Tensor, dict[str, Any]]]) -> torch.Tensor:
    """The average KL per unit over the optimizer step's whole batch (every micro-batch, every process), from a
    forward pass without gradients that draws the same posterior samples (the same per-image noise, and with the
    random state restored afterwards the same dropout) as the training pass that follows; `micro_batches` are
    (x, the forward's keywords: the noise, and the labels of a conditional model)."""
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    total = None
    with torch.random.fork_rng(devices=devices):
        for x, inputs in micro_batches:
            with accelerator.autocast():
                kl_units = raw(x, **inputs).bottleneck.kl_units
            total = kl_units.float().sum(dim=0) if total is None else total + kl_units.float().sum(dim=0)
    count = torch.full((), float(sum(len(x) for x, _ in micro_batches)), device=total.device)  # (no host copy)
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return total / count


def _micro_batch_flops(config: TrainConfig, accelerator, raw, micro_batch) -> int:
    """FLOPs of one micro-batch's forward and backward through the tokenizer, not LPIPS or the discriminator
    (`engine.micro_batch_flops`)."""
    x, _, labels = micro_batch

    def loss() -> torch.Tensor:
        with accelerator.autocast():
            out = raw(x, check=False, **({} if labels is None else {"labels": labels}))
        return out.reconstruction.float().square().mean()

    return micro_batch_flops(accelerator, raw, loss)


def _coin(seed: int, step: int, index: int) -> bool:
    """Whether image `index` is flipped at `step` (hflip): a fair coin keyed by (seed, step, index)."""
    return keyed_uniform(seed, step, index) < 0.5


LABEL_DROPOUT_KEY = 3  # keys the class-dropout coins apart from the flips (no key) and posterior noise (NOISE_KEY 2)


def _label_dropped(seed: int, step: int, index: int, p: float) -> bool:
    """Whether image `index`'s label is replaced by the null label at `step`: a coin of probability p keyed by
    (seed, step, index), the same whatever the process, micro-batch or resume point the image is drawn in."""
    return keyed_uniform(seed, step, index, LABEL_DROPOUT_KEY) < p


def _evaluate(accelerator, raw: Autoencoder, image_losses: ImageLosses, dataset,
              fixed: tuple[torch.Tensor, torch.Tensor], config: TrainConfig, out: Path, step: int):
    """Metrics on the evaluation set, the reconstructions of the `fixed` (images, labels) and, for Gaussian models,
    a grid of prior samples: 16, or for a class-conditional model one row of 8 per class (the first 16 classes)."""
    if not accelerator.is_main_process:
        return None
    metrics = evaluate(raw, dataset, limit=config.eval_images, num_workers=0, perceptual=image_losses.perceptual)
    conditional = getattr(raw.config, "num_classes", 0) > 0
    images, labels = fixed
    grid = save_reconstruction_grid(raw, images, out / "samples" / f"step_{step:06d}.png",
                                    labels=labels if conditional else None)
    grids = {"eval/reconstructions": grid}
    if raw.is_gaussian:
        if conditional:  # the class-conditional grid: row c holds samples of class c
            rows = torch.arange(min(raw.config.num_classes, CLASS_GRID_ROWS)).repeat_interleave(CLASS_GRID_COLUMNS)
            samples, nrow = raw.sample(len(rows), labels=rows, seed=0), CLASS_GRID_COLUMNS
        else:
            samples, nrow = raw.sample(16, seed=0), None
        grids["eval/prior_samples"] = save_image_grid(raw.postprocess(samples),
                                                      out / "samples" / f"prior_step_{step:06d}.png", nrow=nrow)
    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    log_images(accelerator, grids, step)
    append_metrics(out, {"step": step, "split": "eval", **metrics})
    return metrics


def _export(accelerator, raw: Autoencoder, ema: WeightsEMA | None, image_losses: ImageLosses, eval_dataset,
            config: TrainConfig, out: Path) -> Path:
    folder = out / "tokenizer"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        export = exported(raw, ema)
        check_finite_weights(export)
        metrics = evaluate(export, eval_dataset, limit=config.eval_images, perceptual=image_losses.perceptual)
        health = codebook_health(export)
        metrics.update(health)
        export.save_pretrained(folder, model_card_kwargs={"metrics": card_metrics(metrics)})
        image_losses.save(out / "discriminator")
        (out / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
        accelerator.print(format_table(metrics))
        for warning in codebook_warnings(health, getattr(export.config, "bottleneck", None), config.max_steps):
            logger.warning("exported %s with a warning: %s", folder, warning)
    accelerator.end_training()
    return folder
