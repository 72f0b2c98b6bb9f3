"""Training a transformer prior on a token store with Accelerate (`vqtok train-prior CONFIG.yaml`).

The store's codes (and labels) are read straight from its memory-mapped shards, a batch at a time, in the order the
tokenizer loop uses: a function of (seed, step) alone, so resume is exact and N processes see the batches of one.
The loss is the mean negative log-likelihood per code; it is reported in bits per code, on training batches and on
held-out images (`eval_tokens`, or a seeded random 5% of the store's images, which are then not trained on), beside
the unigram entropy of the training codes - what a model that ignores context would reach. Periodic evaluations
use at most `eval_items` held-out images, the final one all of them.

Artefacts under output_dir: config.yaml, run_info.json (run_info.py), metrics.jsonl (and the logs of the trackers
named in `log_with`), samples/step_XXXXXX.png
(codes sampled from the prior and decoded by the store's tokenizer, one row per class for conditional priors),
checkpoints/step_XXXXXX (see run_folder.RunFolder), and prior/ (save_pretrained: the prior, its tokenizer recorded as a
Hub id@commit or copied into prior/tokenizer/, the held-out metrics in its model card).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.tracking import GeneralTracker
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from vqtok.config import ConfigError, PriorConfig, PriorTrainConfig
from vqtok.data.token_store import TokenDataset, TokenStoreError
from vqtok.models import Autoencoder, TransformerPrior
from vqtok.models.prior import code_nll, decode_labels, tokenizer_ref
from vqtok.train.batches import StepBatchSampler
from vqtok.train.engine import (
    Throughput,
    WeightsEMA,
    accelerate_run,
    append_metrics,
    check_skips,
    compile_modules,
    exported,
    finish_step,
    log_images,
    log_metrics,
    make_accelerator,
    make_optimizer,
    micro_batch_flops,
    peak_tflops,
    resolve_precision,
)
from vqtok.train.evaluate import format_table, save_image_grid
from vqtok.train.run_folder import RunFolder

HOLDOUT_FRACTION = 0.05
LN2 = math.log(2.0)


@dataclasses.dataclass
class PriorData:
    """The training and held-out items (store item indices) and the tokenizer that made them."""

    train: TokenDataset
    train_items: np.ndarray
    eval: TokenDataset
    eval_items: np.ndarray
    tokenizer: Autoencoder


def train_prior(config: PriorTrainConfig, *, resume: bool = False, stop_at: int | None = None,
                tokenizer: Autoencoder | None = None, overwrite: bool = False,
                trackers: Sequence[GeneralTracker] = ()) -> Path | None:
    """Run (or resume) a prior training run; returns the folder of the exported prior (None when `stop_at` ends it
    early with a checkpoint). `tokenizer` is needed only for stores made from an in-memory tokenizer. `resume`,
    `overwrite`, `trackers` and signals as in `vqtok.train.train`."""
    with accelerate_run():
        return _train_prior(config, resume=resume, stop_at=stop_at, tokenizer=tokenizer, overwrite=overwrite,
                            trackers=trackers)


def _train_prior(config: PriorTrainConfig, *, resume: bool, stop_at: int | None,
                 tokenizer: Autoencoder | None, overwrite: bool, trackers: Sequence[GeneralTracker]) -> Path | None:
    out = Path(config.output_dir)
    accelerator = make_accelerator(config, out, trackers)
    config = resolve_precision(config, accelerator)
    run = RunFolder(accelerator, config, "prior", resume=resume, overwrite=overwrite)
    data = open_data(config, tokenizer)
    prior_config = resolve_prior_config(config.prior, data)
    set_seed(config.seed)  # the same initial weights on every rank
    model = TransformerPrior(prior_config)
    model.attach_tokenizer(data.tokenizer)
    if config.compile:
        compile_modules(model)  # in place: the same state_dict keys
    set_seed(config.seed, device_specific=True)  # then per-rank streams for dropout and label dropout
    optimizer, scheduler = make_optimizer(config, _param_groups(model, config.weight_decay))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw: TransformerPrior = accelerator.unwrap_model(model)
    ema = WeightsEMA(raw, config.weights_ema) if config.weights_ema > 0 else None
    counters, _ = run.restore(ema)
    data.tokenizer.to(accelerator.device)

    sampler = StepBatchSampler(len(data.train_items), batch_size=config.batch_size, grad_accum=config.grad_accum,
                               rank=accelerator.process_index, world=accelerator.num_processes, seed=config.seed,
                               start_step=counters.step, max_steps=config.max_steps)
    unigram = math.nan  # the baseline in the main process's reports: a pass over the training codes
    if accelerator.is_main_process:
        unigram = unigram_bits(data.train, data.train_items)
        accelerator.print(f"training on {len(data.train_items):,} items, {prior_config.seq_len} codes each; held out: "
                          f"{len(data.eval_items):,}; unigram entropy {unigram:.4f} bits per code")

    run.start()
    batches = iter(sampler)
    started = time.perf_counter()
    end = config.max_steps if stop_at is None else min(stop_at, config.max_steps)
    pin = accelerator.device.type == "cuda"
    throughput = Throughput(counters.step, processes=accelerator.num_processes, peak=peak_tflops(config, accelerator))
    progress = tqdm(total=config.max_steps, initial=counters.step, desc="train-prior",
                    disable=not accelerator.is_local_main_process)
    with progress, run.stoppable(counters) as stop:
        while counters.step < end:
            model.train()
            host = [_host_batch(data, next(batches), pin) for _ in range(config.grad_accum)]
            if throughput.flops_per_step is None:
                throughput.flops_per_step = config.grad_accum * _micro_batch_flops(accelerator, raw, host[0])
            logs = _accumulate_step(config, accelerator, model, host)
            logs.update(finish_step(config, accelerator, model, optimizer, scheduler, counters, ema=ema))
            step = counters.step
            progress.update(1)
            checkpoint = step % config.checkpoint_every == 0 or step == end
            if step % config.log_every == 0 or step == config.max_steps:
                log_metrics(accelerator, out, step, logs, progress, started, shown=("bits_per_code",),
                            throughput=throughput)
            if step % config.log_every == 0 or step == config.max_steps or checkpoint:
                check_skips(config, counters, logs.get("grad_norm"))  # (reads the device counters)
            if step % config.eval_every == 0 or step == config.max_steps:
                _evaluate(accelerator, raw, data, config, out, step, unigram)
            stopping = stop.requested()
            if checkpoint or stopping:
                if stopping:  # as a log or checkpoint step would: the longest run of skips is not saved
                    check_skips(config, counters, logs.get("grad_norm"))
                saved = run.save(counters, ema)
            if stopping:
                raise run.stopped(stopping, saved, step)
            if step % config.eval_every == 0 or checkpoint:
                throughput.restart(step)  # the next interval's speed is the training's alone
    if counters.step < config.max_steps:
        accelerator.end_training()
        return None
    return _export(accelerator, raw, ema, data, config, out, unigram)


# ----------------------------------------------------------------------------------------------------------------
# Data


def open_data(config: PriorTrainConfig, tokenizer: Autoencoder | None) -> PriorData:
    """Open the stores (with `verify_tokens`: checksums too), check that they hold codes of one tokenizer and that
    every code lies in the vocabulary, and split off the held-out items."""
    train = TokenDataset(config.tokens, verify=config.verify_tokens)
    if train.kind != "discrete":
        raise TokenStoreError(f"{config.tokens}: holds continuous latents (a Gaussian tokenizer or "
                              "hierarchical VAE); a prior needs codes")
    if tokenizer is not None and config.tokenizer is not None:
        raise ConfigError(f"tokenizer is set in the config ({config.tokenizer}) and a tokenizer was passed to "
                          "train_prior: give one")
    if tokenizer is None:
        tokenizer = train.load_tokenizer(config.tokenizer)  # the store's record, or where the config says it is now
    else:
        train.check_tokenizer(tokenizer)
    augmentations = len(train.augmentations)
    if config.eval_tokens is None:
        # A seeded random 5% of the images (stores of class folders are sorted by class: not the tail)
        held = max(1, round(HOLDOUT_FRACTION * train.num_images))
        if held >= train.num_images:
            raise TokenStoreError(f"{config.tokens}: {train.num_images} images are too few to hold some out")
        order = np.random.default_rng(config.seed).permutation(train.num_images)
        eval_set, eval_images, train_images = train, np.sort(order[:held]), np.sort(order[held:])
        # item i is image i // A under augmentation i % A: every view of a training image is trained on
        train_items = (train_images[:, None] * augmentations + np.arange(augmentations)).reshape(-1)
    else:
        eval_set = TokenDataset(config.eval_tokens, verify=config.verify_tokens)
        eval_set.check_tokenizer(tokenizer)
        eval_images, train_items = np.arange(eval_set.num_images), np.arange(len(train))
    if tuple(eval_set.grid) != tuple(train.grid):
        raise TokenStoreError(f"{config.eval_tokens}: code grid {eval_set.grid} differs from the training store's "
                              f"{train.grid}")
    eval_items = eval_images * len(eval_set.augmentations)  # the un-augmented view of each held-out image
    train.check_codes()  # every code in the vocabulary: one pass, now rather than at a bad shard's first read
    eval_set.check_codes()  # (once per shard: free when eval_set is train)
    return PriorData(train, train_items, eval_set, eval_items, tokenizer)


def resolve_prior_config(prior: PriorConfig, data: PriorData) -> PriorConfig:
    """Fill vocab_size, grid and num_classes from the store (and refuse values that contradict it), and record the
    tokenizer."""
    store = data.train
    low, high = store.label_range()
    if low < 0 and prior.num_classes != 0 and high >= 0:
        raise ConfigError(f"{store.path}: some images have labels and some do not; set prior.num_classes: 0 for an "
                          "unconditional prior")
    if low < 0 and (prior.num_classes or 0) > 0:
        raise ConfigError(f"prior.num_classes is {prior.num_classes} but {store.path} has images without labels")
    from_store = {"vocab_size": store.vocab_size, "grid": tuple(store.grid),
                  "num_classes": 0 if low < 0 else high + 1}
    values = {}
    for key, found in from_store.items():
        given = getattr(prior, key)
        if given is None:
            values[key] = found
        elif key == "num_classes" and (given == 0 or given >= found):
            values[key] = given  # unconditional on purpose, or room for classes this store lacks
        elif given != found:
            raise ConfigError(f"prior.{key} is {given} but the token store {store.path} has {found}; remove it from "
                              "the config to take the store's")
        else:
            values[key] = given
    if values["num_classes"] and data.eval is not store:
        eval_low, eval_high = data.eval.label_range()
        if eval_low < 0 or eval_high >= values["num_classes"]:
            raise ConfigError(f"{data.eval.path}: held-out labels span [{eval_low}, {eval_high}], outside the "
                              f"prior's {values['num_classes']} classes")
    return dataclasses.replace(prior, **values, tokenizer=tokenizer_ref(data.tokenizer))


def unigram_bits(store: TokenDataset, items: np.ndarray, chunk: int = 8192) -> float:
    """Entropy in bits per code of the codes' marginal distribution over `items`; for a residual VQ's store (grid
    [h, w, depth]) each level's marginal, averaged over the levels (a level's codes mean nothing at another level,
    and the prior knows each token's level from its position)."""
    levels = store.grid[2] if len(store.grid) == 3 else 1
    counts = torch.zeros(levels, store.vocab_size, dtype=torch.float64)
    for start in range(0, len(items), chunk):
        codes, _ = store.gather(items[start : start + chunk])
        for level, level_codes in enumerate(codes.reshape(-1, levels).T):
            counts[level] += torch.bincount(level_codes, minlength=store.vocab_size).double()
    p = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)  # (no items: 0 bits)
    return float(-torch.special.xlogy(p, p).sum(dim=1).mean() / math.log(2))


def _labels_for(model: TransformerPrior, labels: torch.Tensor) -> torch.Tensor | None:
    return labels if model.config.num_classes else None


# ----------------------------------------------------------------------------------------------------------------
# Steps


def _host_batch(data: PriorData, indices: list[int], pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch's codes and labels read from the store on the host, pinned when the device is a GPU."""
    codes, labels = data.train.gather(data.train_items[indices])
    return (codes.pin_memory(), labels.pin_memory()) if pin else (codes, labels)


def _accumulate_step(config: PriorTrainConfig, accelerator, model,
                     host: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """Forward and backward over the step's micro-batches (`host`: `_host_batch`'s), copied to the device
    asynchronously; the loss terms stay device tensors (read at log steps)."""
    raw = accelerator.unwrap_model(model)
    logs: dict[str, Any] = {}
    for micro, (codes, labels) in enumerate(host):
        codes = codes.to(accelerator.device, non_blocking=True)
        labels = labels.to(accelerator.device, non_blocking=True)
        last = micro == config.grad_accum - 1
        with nullcontext() if last else accelerator.no_sync(model):
            # check=False: open_data checked every code against the vocabulary (TokenDataset.check_codes) and
            # resolve_prior_config the labels against num_classes
            with accelerator.autocast():
                logits = model(codes, _labels_for(raw, labels), check=False)
            loss = code_nll(logits, codes)
            accelerator.backward(loss / config.grad_accum)
        logs["loss"] = logs.get("loss", 0.0) + loss.detach() / config.grad_accum
    logs["bits_per_code"] = logs["loss"] / LN2
    return logs


def _micro_batch_flops(accelerator, raw: TransformerPrior, host: tuple[torch.Tensor, torch.Tensor]) -> int:
    """FLOPs of one micro-batch's forward and backward (`engine.micro_batch_flops`)."""
    codes, labels = (t.to(accelerator.device) for t in host)

    def loss() -> torch.Tensor:
        with accelerator.autocast():
            return code_nll(raw(codes, _labels_for(raw, labels), check=False), codes)

    return micro_batch_flops(accelerator, raw, loss)


def _micro_batch(config: PriorTrainConfig, accelerator) -> int:
    """One process's micro-batch: what fits in memory during training (evaluation runs on the main process)."""
    return max(1, config.batch_size // (config.grad_accum * accelerator.num_processes))


def _param_groups(model: TransformerPrior, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and embeddings only, not on biases and LayerNorm gains (GPT-2, nanoGPT)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@torch.inference_mode()
def held_out_bits(model: TransformerPrior, store: TokenDataset, items: np.ndarray, *, batch_size: int = 256,
                  autocast=nullcontext) -> float:
    """Mean negative log-likelihood of the codes of `items`, in bits per code."""
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    total, count = 0.0, 0
    for start in range(0, len(items), batch_size):
        codes, labels = store.gather(items[start : start + batch_size])
        codes, labels = codes.to(device), labels.to(device)
        with autocast():
            logits = model(codes, _labels_for(model, labels))
        total += F.cross_entropy(logits.float().flatten(0, 1), codes.reshape(-1), reduction="sum").item()
        count += codes.numel()
    model.train(was_training)
    return total / count / LN2


@torch.inference_mode()
def save_sample_grid(model: TransformerPrior, tokenizer: Autoencoder, n: int, path: str | Path, *, seed: int = 0,
                     **sampling: Any) -> Path:
    """PNG of about n images sampled from the prior and decoded by the tokenizer; a conditional prior gets one row
    per class for its first min(classes, n) classes, ceil(n / rows) samples each. A class-conditional tokenizer
    decodes them with their labels, or the null label (see `vqtok.models.prior.decode_labels`)."""
    classes = min(model.config.num_classes, n)
    if classes:
        per_class = -(-n // classes)
        labels = torch.arange(classes).repeat_interleave(per_class)
        codes = model.generate(len(labels), labels=labels, seed=seed, **sampling)
        nrow = per_class
    else:
        codes, nrow, labels = model.generate(n, seed=seed, **sampling), None, None
    device = next(tokenizer.parameters()).device
    images = tokenizer.postprocess(tokenizer.decode(codes.to(device), **decode_labels(model, tokenizer, labels)))
    return save_image_grid(images, path, nrow=nrow)


def _evaluate(accelerator, raw: TransformerPrior, data: PriorData, config: PriorTrainConfig, out: Path, step: int,
              unigram: float) -> None:
    if not accelerator.is_main_process:
        return
    bits = held_out_bits(raw, data.eval, data.eval_items[: config.eval_items], batch_size=_micro_batch(config, accelerator),
                         autocast=accelerator.autocast)
    grid = save_sample_grid(raw, data.tokenizer, config.num_samples, out / "samples" / f"step_{step:06d}.png")
    metrics = {"held_out_bits_per_code": bits, "unigram_bits_per_code": unigram}
    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    log_images(accelerator, {"eval/samples": grid}, step)
    append_metrics(out, {"step": step, "split": "eval", **metrics})


def _export(accelerator, raw: TransformerPrior, ema: WeightsEMA | None, data: PriorData, config: PriorTrainConfig,
            out: Path, unigram: float) -> Path:
    folder = out / "prior"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        export = exported(raw, ema)
        export.attach_tokenizer(data.tokenizer)
        bits = held_out_bits(export, data.eval, data.eval_items, batch_size=_micro_batch(config, accelerator),
                             autocast=accelerator.autocast)
        metrics = {"held_out_bits_per_code": bits, "unigram_bits_per_code": unigram,
                   "held_out_images": len(data.eval_items), "steps": config.max_steps,
                   "processes": accelerator.num_processes}
        export.save_pretrained(folder, model_card_kwargs={"metrics": {k: round(v, 4) if isinstance(v, float) else v
                                                                      for k, v in metrics.items()}})
        save_sample_grid(export, data.tokenizer, config.num_samples, out / "samples" / "final.png")
        (out / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
        accelerator.print(format_table(metrics))
    accelerator.end_training()
    return folder
