"""Train the same tokenizer twice on CIFAR-10, once with vqtok's VQ bottleneck and once with
`vector_quantize_pytorch.VectorQuantize` (its defaults) dropped in, and compare codebook usage, test PSNR and time.

Both runs share everything but the bottleneck: the encoder, decoder and 1x1 projections start from the same weights
(one model is built, then copied and given the peer's quantizer), and they see the same batches and flips, the
same AdamW (warm-up + cosine), gradient clipping and loss (MSE + the bottleneck's own loss). vqtok's quantizer is
the library default for K = 1024, D = 64 (EMA 0.99, k-means initialisation, dead-code restarts, beta 0.25); the
peer's is `VectorQuantize(dim=64, codebook_size=1024, accept_image_fmap=True)` - its defaults (EMA decay 0.8,
commitment weight 1, no k-means, no dead-code expiry, and the rotation trick instead of the straight-through
estimator), the last argument only tells it the [B, D, h, w] layout.
The two models' steps alternate (vqtok, peer, vqtok, ...) so that both see the same machine conditions, and the
time of each step (data excluded) is kept; the table gives medians.

Evaluation, after training, on the CIFAR-10 test split (10,000 images unless --eval-images says fewer):
`vqtok.train.evaluate.evaluate` for both - PSNR and SSIM on 8-bit images, codebook usage (fraction of the 1024
codes the test images use) and the codes' perplexity.

Usage (the JPEG folders of ../shared/datasets/cifar10; see configs/cifar10_vq.yaml)::

    mkdir -p data && tar -xf ../shared/datasets/cifar10/cifar10-jpeg.tar -C data
    pip install -e ".[bench]"            # pins vector-quantize-pytorch==1.32.0
    python scripts/bench_vq_training.py --steps 1500 --json bench_vq_training.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from importlib.metadata import version

import torch
import torch.nn.functional as F
from einops import rearrange
from vector_quantize_pytorch import VectorQuantize

from vqtok.bottleneck import Bottleneck, BottleneckOutput
from vqtok.config import AutoencoderConfig, DataConfig, VQConfig
from vqtok.data import build_dataset
from vqtok.images import uint8_to_range
from vqtok.models import Autoencoder
from vqtok.train.evaluate import evaluate, format_table
from vqtok.train.schedules import lr_factor


class PeerVQ(Bottleneck):
    """`vector_quantize_pytorch.VectorQuantize` behind vqtok's bottleneck interface, so the same Autoencoder and
    the same `evaluate` serve both. Its EMA update happens inside its forward in training mode (its design)."""

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        self.dim = self.in_channels = dim
        self.vocab_size = codebook_size
        self.vq = VectorQuantize(dim=dim, codebook_size=codebook_size, accept_image_fmap=True)

    def forward(self, h: torch.Tensor) -> BottleneckOutput:
        quantized, codes, loss = self.vq(h)
        return BottleneckOutput(z=quantized, loss=loss.sum(), terms={"commitment": loss.detach().sum()}, codes=codes)

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        return self.vq(h)[1]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return rearrange(self.vq.codebook[codes], "b h w d -> b d h w")


def model_config(args: argparse.Namespace) -> AutoencoderConfig:
    """f = 4 on 32x32 (8x8 codes), K = 1024, D = 64: configs/cifar10_vq.yaml's code space in a CPU-sized network."""
    return AutoencoderConfig(
        in_channels=3, resolution=32, base_channels=args.base_channels, channel_mult=(1, 2, 2),
        num_res_blocks=args.res_blocks, attn_resolutions=(), latent_channels=64, norm_groups=32,
        bottleneck=VQConfig(codebook_size=1024, dim=64))


def batches(dataset, *, steps: int, batch_size: int, seed: int):
    """The same (images, flips) sequence for both runs: a seeded permutation per epoch, a seeded coin per image."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(len(dataset), generator=generator).tolist()
        indices, order = order[:batch_size], order[batch_size:]
        images = torch.stack([dataset[i][0] for i in indices])
        flips = torch.rand(batch_size, generator=generator) < 0.5
        yield torch.where(flips[:, None, None, None], images.flip(-1), images)


def optimizers_for(models: dict[str, Autoencoder], args: argparse.Namespace, device: torch.device) -> dict:
    """Each model moved to `device` in training mode, with its own AdamW (lr, betas 0.9/0.99, no weight decay) and
    warm-up + cosine schedule to 0.1x: name -> (optimizer, scheduler), as `train_step` takes them."""
    optimizers = {}
    for name, model in models.items():
        model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
            s, warmup_steps=args.warmup_steps, max_steps=args.steps, min_ratio=0.1))
        optimizers[name] = (optimizer, scheduler)
    return optimizers


def train_step(model: Autoencoder, optimizer, scheduler, x: torch.Tensor, clip: float) -> tuple[float, float]:
    """One update; returns (seconds, loss)."""
    _synchronize(x.device)
    start = time.perf_counter()
    out = model(x)
    loss = F.mse_loss(out.reconstruction, x) + out.bottleneck.loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    model.on_optimizer_step()
    _synchronize(x.device)
    return time.perf_counter() - start, loss.item()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # so that one model's queued GPU work is not timed as the other's
        torch.cuda.synchronize(device)


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The data, budget, network size, evaluation and device options of the CIFAR-10 training comparisons (this
    script's and bench_quantizers.py's)."""
    parser.add_argument("--train", default="data/train", help="CIFAR-10 training image folder")
    parser.add_argument("--test", default="data/test", help="CIFAR-10 test image folder")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--base-channels", type=int, default=32)
    parser.add_argument("--res-blocks", type=int, default=1)
    parser.add_argument("--eval-images", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_training_arguments(parser)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)

    config = model_config(args)
    torch.manual_seed(args.seed)
    models = {"vqtok": Autoencoder(config)}
    models["peer"] = copy.deepcopy(models["vqtok"])
    torch.manual_seed(args.seed)
    models["peer"].bottleneck = PeerVQ(64, 1024)
    optimizers = optimizers_for(models, args, device)
    params = sum(p.numel() for n, p in models["vqtok"].named_parameters() if not n.startswith("bottleneck."))
    print(f"encoder + decoder: {params / 1e6:.2f} M parameters, shared initial weights; {args.steps} steps at batch "
          f"{args.batch_size} on {device}")

    train = build_dataset(DataConfig(source="folder", path=args.train), channels=3, preprocess=config.preprocess, size=32)
    test = build_dataset(DataConfig(source="folder", path=args.test), channels=3, preprocess=config.preprocess, size=32)
    times: dict[str, list[float]] = {name: [] for name in models}
    losses: dict[str, list[float]] = {name: [] for name in models}
    started = time.perf_counter()
    for step, images in enumerate(batches(train, steps=args.steps, batch_size=args.batch_size, seed=args.seed)):
        x = uint8_to_range(images.to(device), config.value_range)
        for name, model in models.items():
            seconds, loss = train_step(model, *optimizers[name], x, clip=1.0)
            times[name].append(seconds)
            losses[name].append(loss)
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            recent = {n: statistics.mean(v[-50:]) for n, v in losses.items()}
            print(f"step {step + 1}/{args.steps}  loss vqtok {recent['vqtok']:.4f}  peer {recent['peer']:.4f}  "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)

    results = {"steps": args.steps, "batch_size": args.batch_size, "device": str(device), "params": params,
               "vector_quantize_pytorch": version("vector-quantize-pytorch"), "torch": torch.__version__}
    for name, model in models.items():
        metrics = evaluate(model, test, limit=args.eval_images, batch_size=250)
        metrics["ms_per_step"] = 1000 * statistics.median(times[name])
        metrics["final_train_loss"] = statistics.mean(losses[name][-50:])
        results[name] = metrics
        print(f"\n{name}\n{format_table(metrics)}")
    v, p = results["vqtok"], results["peer"]
    results["psnr_gain_db"] = v["psnr"] - p["psnr"]
    results["time_ratio_peer_over_vqtok"] = p["ms_per_step"] / v["ms_per_step"]
    print(f"\n| | vqtok | peer |\n|---|---|---|\n"
          f"| test PSNR (dB) | {v['psnr']:.2f} | {p['psnr']:.2f} |\n"
          f"| test SSIM | {v['ssim']:.3f} | {p['ssim']:.3f} |\n"
          f"| codebook usage (test) | {100 * v['code_usage']:.1f}% | {100 * p['code_usage']:.1f}% |\n"
          f"| code perplexity (test) | {v['code_perplexity']:.1f} | {p['code_perplexity']:.1f} |\n"
          f"| ms per step (median) | {v['ms_per_step']:.1f} | {p['ms_per_step']:.1f} |\n"
          f"PSNR gain {results['psnr_gain_db']:+.2f} dB (target >= +0.5); vqtok usage "
          f"{100 * v['code_usage']:.1f}% (target >= 99%); peer/vqtok time per step "
          f"{results['time_ratio_peer_over_vqtok']:.2f}x")
    assert math.isfinite(v["psnr"]) and math.isfinite(p["psnr"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
