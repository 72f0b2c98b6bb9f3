"""Speed of one tokenizer training step: steps/s, achieved TFLOP/s and MFU of vqtok's step (the loop's own
functions: host batch preparation, pinned copies, forward, backward, the device-side update-or-skip, the codebook's
step hook), eager and with `compile: true`, against a bare PyTorch loop on the same model (forward, MSE + the
bottleneck's loss, backward, clipping, fused AdamW, the codebook hook): the ratio bare / vqtok is the loop's overhead.

The model is configs/cifar10_vq.yaml's (32x32 RGB, f = 4, K = 1024, D = 64) at the sizes of its GPU recipe by
default (base 64, 2 res blocks, attention at 8x8, batch 128, bf16 on CUDA). FLOPs of one step are counted once
(torch.utils.flop_counter); MFU divides by the GPU's dense peak (vqtok.train.engine.PEAK_TFLOPS, or --peak-tflops).

    python scripts/bench_train_step.py --device cuda
    python scripts/bench_train_step.py --device cpu --base 16 --res-blocks 1 --batch 8 --steps 3 --warmup 1  # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vqtok.config import TrainConfig, load_yaml
from vqtok.models import Autoencoder
from vqtok.train import engine, loop
from vqtok.train.adversarial import ImageLosses

ROOT = Path(__file__).resolve().parents[1]


def bench_config(args) -> TrainConfig:
    config = load_yaml(ROOT / "configs" / "cifar10_vq.yaml", TrainConfig)
    model = dict(vars(config.model))
    model.update(base_channels=args.base, num_res_blocks=args.res_blocks,
                 attn_resolutions=tuple(args.attn), norm_groups=min(32, args.base))
    precision = args.precision or ("bf16" if args.device == "cuda" else "no")
    return TrainConfig(**{**vars(config), "model": type(config.model)(**model), "batch_size": args.batch,
                          "mixed_precision": precision, "compile": False, "num_workers": 0,
                          "output_dir": "/tmp/bench_train_step", "log_with": ()})


def host_batches(config: TrainConfig, steps: int, pin: bool) -> list[loop.HostBatch]:
    """Random uint8 images (the step's cost does not depend on them) prepared as the loop prepares a loader batch."""
    g = torch.Generator().manual_seed(0)
    c, r = config.model.in_channels, config.model.resolution
    batches = []
    for step in range(steps):
        images = torch.randint(0, 256, (config.batch_size, c, r, r), dtype=torch.uint8, generator=g)
        indices = list(range(step * config.batch_size, (step + 1) * config.batch_size))
        batches.append(loop._host_batch(config, (images, torch.zeros(config.batch_size), indices), step, pin))
    return batches


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step_fn, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per step, after `warmup` steps (compilation, cuDNN autotuning)."""
    for i in range(warmup):
        step_fn(i)
    synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        step_fn(warmup + i)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def vqtok_step(config: TrainConfig, model: Autoencoder, compiled: bool, batches, device: torch.device):
    """A step function of the training loop's own pieces (one process, Accelerate's prepare)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=config.mixed_precision,
                              step_scheduler_with_optimizer=False)
    channels_last = loop.use_channels_last(accelerator)
    if channels_last:
        engine.to_channels_last(model)
    if compiled:
        engine.compile_modules(*loop.tokenizer_networks(model))
    optimizer, scheduler = engine.make_optimizer(config, model.parameters())
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw = accelerator.unwrap_model(model)
    image_losses = ImageLosses(config, accelerator, raw)
    counters = engine.Counters()

    def step(i: int) -> None:
        host = [batches[i % len(batches)]]
        loop._accumulate_step(config, accelerator, model, image_losses, host, counters.step, channels_last)
        engine.finish_step(config, accelerator, model, optimizer, scheduler, counters,
                           on_step=lambda skipped: raw.on_optimizer_step(skipped=skipped))
    return step, accelerator


def bare_step(config: TrainConfig, model: Autoencoder, device: torch.device, batches):
    """The same model trained by a plain loop: what the step costs without vqtok's loop."""
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=tuple(config.betas), fused=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16")
    lo, hi = config.model.value_range

    def step(i: int) -> None:
        x = batches[i % len(batches)].images.to(device, non_blocking=True).float().div(255).mul(hi - lo).add(lo)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            out = model(x, check=False)
        loss = F.mse_loss(out.reconstruction.float(), x) + out.bottleneck.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.on_optimizer_step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--base", type=int, default=64)
    parser.add_argument("--res-blocks", type=int, default=2)
    parser.add_argument("--attn", type=int, nargs="*", default=[8])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", choices=["no", "bf16"], default=None, help="default: bf16 on CUDA, no on CPU")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled run")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")

    config = bench_config(args)
    device = torch.device(args.device)
    torch.manual_seed(0)
    reference = Autoencoder(config.model).train()
    batches = host_batches(config, 4, pin=device.type == "cuda")

    x = loop.uint8_to_range(batches[0].images, config.model.value_range).to(device)
    counted = copy.deepcopy(reference).to(device).eval()  # eval: no codebook statistics; the same matmuls
    params = list(counted.parameters())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16")

    def forward_backward() -> None:
        with autocast:
            out = counted(x, check=False)
        torch.autograd.grad(out.reconstruction.float().square().mean(), params, allow_unused=True)
    flops = engine.count_flops(forward_backward)
    peak = args.peak_tflops or engine.device_peak_tflops(device, config.mixed_precision)

    rows = {}
    variants = [("vqtok eager", False), ("vqtok compiled", True)][: 1 if args.no_compile else 2]
    for name, compiled in variants:
        step, _ = vqtok_step(config, copy.deepcopy(reference), compiled, batches, device)
        rows[name] = timed(step, device, args.warmup, args.steps)
        engine.AcceleratorState._reset_state(reset_partial_state=False)
    rows["bare PyTorch (eager)"] = timed(bare_step(config, copy.deepcopy(reference), device, batches), device,
                                         args.warmup, args.steps)

    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, precision "
          f"{config.mixed_precision}, batch {config.batch_size}, base {args.base}, res blocks {args.res_blocks}, "
          f"attention at {args.attn}; {flops / 1e9:.2f} GFLOP per step")
    print(f"{'step':<24}{'steps/s':>10}{'TFLOP/s':>10}{'MFU':>8}{'vs bare':>9}")
    results = {}
    for name, seconds in rows.items():
        tflops = flops / seconds / 1e12
        mfu = tflops / peak if peak else None
        ratio = rows["bare PyTorch (eager)"] / seconds
        results[name] = {"steps_per_s": 1 / seconds, "tflops": tflops, "mfu": mfu, "speed_vs_bare": ratio}
        print(f"{name:<24}{1 / seconds:>10.2f}{tflops:>10.3f}{(f'{mfu:.1%}' if mfu else '-'):>8}{ratio:>8.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "flops_per_step": flops,
                                         "peak_tflops": peak, "results": results}, indent=2))


if __name__ == "__main__":
    main()
